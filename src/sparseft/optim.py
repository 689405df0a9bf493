"""``SparseAdamW``: AdamW whose updates touch only the selected entries of dynamic-selection
parameters, with optimizer state kept for a bounded set of entries.

For a parameter marked by SparseGrad's dynamic mode (attribute ``_sparseft_k = k``) each step:

    I = top-k of |grad|;   for i in I:  m_i ← β1 m_i + (1-β1) g_i,  v_i ← β2 v_i + (1-β2) g_i²,
    θ_i ← θ_i (1 - lr·wd) - lr · (m_i / (1-β1^{c_i})) / (sqrt(v_i / (1-β2^{c_i})) + ε)

where c_i counts the steps at which entry i was selected (a per-entry bias correction, so an
entry selected for the first time gets a full-size step). Entries not in I are not touched,
neither their value nor their moments ("lazy" Adam). The state is stored sparsely (sorted flat
indices plus moments) in ``state_factor·k`` fixed slots; when more entries have been selected,
the least recently selected ones are forgotten (ties: the larger flat index stays). Every shape
is fixed, so a step never waits for the GPU (no data-dependent sizes). ``state_factor=None``
keeps every entry ever selected (this can grow to a dense state: ask for it knowingly). Other
parameters (a dense task head) get ordinary AdamW updates through torch's own ``adamw``
(foreach, fused on GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim.adamw import adamw

from .distributed import SHARDED_DYNAMIC, is_sharded
from .errors import ConfigError


def fused_on_gpu(params: list[torch.Tensor]) -> bool | None:
    """True where torch's fused AdamW takes every parameter (all on CUDA, in float32, float16 or
    bfloat16): one kernel per step, and the step count stays on the device (no host read). None
    elsewhere: torch's own choice (foreach). transformers' Trainer defaults to the fused form too."""
    return (bool(params) and all(p.is_cuda and p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)) or None


class SparseAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_factor: int | None = 8,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be non-negative.")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}.")
        if state_factor is not None and state_factor < 1:
            raise ValueError("state_factor must be ≥ 1 (state for state_factor·k entries) or None (unbounded).")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_factor=state_factor))
        for group in self.param_groups:
            for p in group["params"]:
                if getattr(p, "_sparseft_k", None) is not None:
                    # the top-k is taken here, from the whole (under DDP: all-reduced) gradient,
                    # so the layer's per-backward masking must not cut it first
                    p._sparseft_optimizer_selects = True

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keep the integer state (entry indices, last-selected steps) integer:
        torch casts every non-step state tensor to the parameter's float dtype on load, which
        would round indices above 2**24 (resume_from_checkpoint on large layers)."""
        integer = {
            pid: {key: v for key, v in s.items() if isinstance(v, torch.Tensor) and not v.is_floating_point()}
            for pid, s in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(ids, params):
            for key, value in integer.get(pid, {}).items():
                self.state[p][key] = value.to(p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            dense = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                k = getattr(p, "_sparseft_k", None)
                if k is None:
                    dense.append(p)
                else:
                    self._sparse_step(p, int(k), group)
            if dense:
                self._dense_step(dense, group)
        return loss

    def _dense_step(self, params: list[torch.Tensor], group: dict) -> None:
        """Ordinary AdamW for the dense parameters (a task head), through torch's own
        implementation: foreach by default, fused on GPU."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        steps = []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif not isinstance(state["step"], torch.Tensor):  # a state saved by an older version
                state["step"] = torch.tensor(float(state["step"]))
            steps.append(state["step"])
        fused = fused_on_gpu(params)
        adamw(
            params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params], [], steps, fused=fused,
            amsgrad=False, beta1=b1, beta2=b2, lr=lr, weight_decay=wd, eps=eps, maximize=False,
        )

    def _sparse_step(self, p: torch.Tensor, k: int, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if is_sharded(p.grad):
            raise ConfigError(SHARDED_DYNAMIC)
        flat_grad = p.grad.reshape(-1)
        # index_select/index_copy_ throughout: advanced indexing is much slower on CPU
        selected_by_layer = getattr(p, "_sparseft_selected", None)
        if selected_by_layer is not None and selected_by_layer[0] is p.grad and selected_by_layer[1] == p.grad._version:
            idx = selected_by_layer[2]  # the layer already cut this gradient to its top-k
        else:
            idx = torch.topk(flat_grad.abs(), min(k, flat_grad.numel()), sorted=False).indices.sort().values
        g = flat_grad.index_select(0, idx).float()
        state = self.state[p]
        cap = group["state_factor"]
        capacity = None if cap is None else min(cap * k, flat_grad.numel())
        if not state:
            self._init_sparse_state(state, p, capacity)
        elif capacity is not None and state["index"].numel() != capacity:
            self._to_capacity(state, p, capacity)  # a state saved by an older version
        state["step"] += 1
        if capacity is None:
            pos = self._positions(state, idx)
            slots = state
        else:
            pos, slots = self._slots(state, idx, p.numel())
        m, v, c = slots["exp_avg"], slots["exp_avg_sq"], slots["count"]
        m_pos = m.index_select(0, pos).mul_(b1).add_(g, alpha=1 - b1)
        v_pos = v.index_select(0, pos).mul_(b2).addcmul_(g, g, value=1 - b2)
        c_pos = c.index_select(0, pos).add_(1)
        m.index_copy_(0, pos, m_pos)
        v.index_copy_(0, pos, v_pos)
        c.index_copy_(0, pos, c_pos)
        slots["last"].index_fill_(0, pos, state["step"])
        m_hat = m_pos / (1 - torch.pow(b1, c_pos))
        v_hat = v_pos / (1 - torch.pow(b2, c_pos))
        update = m_hat / (v_hat.sqrt() + eps)
        flat = p.view(-1)
        selected = flat.index_select(0, idx).float()
        if wd:
            selected = selected * (1 - lr * wd)
        flat.index_copy_(0, idx, (selected - lr * update).to(p.dtype))
        if capacity is not None:
            self._evict(state, slots, capacity, p.numel())

    _SLOTS = ("index", "exp_avg", "exp_avg_sq", "count", "last")

    @staticmethod
    def _init_sparse_state(state: dict, p: torch.Tensor, capacity: int | None) -> None:
        dev, size = p.device, capacity or 0
        state["step"] = 0
        # empty slots hold the sentinel index p.numel() (sorted last) and last = -1 (evicted first)
        state["index"] = torch.full((size,), p.numel(), dtype=torch.long, device=dev)
        state["exp_avg"] = torch.zeros(size, dtype=torch.float32, device=dev)
        state["exp_avg_sq"] = torch.zeros(size, dtype=torch.float32, device=dev)
        state["count"] = torch.zeros(size, dtype=torch.float32, device=dev)
        state["last"] = torch.full((size,), -1, dtype=torch.long, device=dev)

    def _to_capacity(self, state: dict, p: torch.Tensor, capacity: int) -> None:
        """Pad (or cut, keeping the most recently selected) a state to ``capacity`` slots."""
        old = {name: state[name] for name in self._SLOTS}
        self._init_sparse_state(state, p, capacity)
        keep = min(capacity, old["index"].numel())
        order = torch.topk(old["last"], keep).indices if keep else old["last"].new_zeros(0)
        for name in self._SLOTS:
            state[name][:keep] = old[name].index_select(0, order).to(state[name].dtype)
        self._evict(state, {name: state[name] for name in self._SLOTS}, capacity, p.numel())

    @staticmethod
    def _slots(state: dict, idx: torch.Tensor, numel: int) -> tuple[torch.Tensor, dict]:
        """Fixed-size candidate slots: the state's C slots plus k fresh ones for the entries of
        ``idx`` not held yet; returns each selected entry's slot. Every shape is fixed, so no
        step waits for the device (no data-dependent sizes, no host synchronisation)."""
        index = state["index"]
        C = index.numel()
        pos = torch.searchsorted(index, idx).clamp_(max=max(C - 1, 0))
        present = index.index_select(0, pos) == idx if C else torch.zeros_like(idx, dtype=torch.bool)
        fresh = torch.arange(C, C + idx.numel(), device=idx.device)
        slot = torch.where(present, pos, fresh)
        k = idx.numel()
        slots = {
            "index": torch.cat([index, torch.where(present, torch.full_like(idx, numel), idx)]),
            "exp_avg": torch.cat([state["exp_avg"], state["exp_avg"].new_zeros(k)]),
            "exp_avg_sq": torch.cat([state["exp_avg_sq"], state["exp_avg_sq"].new_zeros(k)]),
            "count": torch.cat([state["count"], state["count"].new_zeros(k)]),
            "last": torch.cat([state["last"], state["last"].new_full((k,), -1)]),
        }
        return slot, slots

    def _evict(self, state: dict, slots: dict, capacity: int, numel: int) -> None:
        """Keep the ``capacity`` most recently selected entries (ties: the larger index), sorted
        by index; empty slots (last = -1) go first."""
        key = slots["last"] * (numel + 1) + slots["index"]
        keep = torch.topk(key, capacity, sorted=False).indices
        order = torch.argsort(slots["index"].index_select(0, keep))
        keep = keep.index_select(0, order)
        for name in self._SLOTS:
            state[name] = slots[name].index_select(0, keep)

    @staticmethod
    def _positions(state: dict, idx: torch.Tensor) -> torch.Tensor:
        """Positions of the sorted flat indices ``idx`` in the sorted state, adding new ones."""
        index = state["index"]
        if index.numel():
            pos = torch.searchsorted(index, idx)
            present = index.index_select(0, pos.clamp(max=index.numel() - 1)) == idx
        else:
            present = torch.zeros_like(idx, dtype=torch.bool)
        new = idx.masked_select(~present)
        if new.numel():
            merged = torch.cat([index, new])
            order = torch.argsort(merged)
            state["index"] = merged.index_select(0, order)
            for name in ("exp_avg", "exp_avg_sq", "count", "last"):
                old = state[name]
                state[name] = torch.cat([old, old.new_zeros(new.numel())]).index_select(0, order)
            index = state["index"]
        return torch.searchsorted(index, idx)


__all__ = ["SparseAdamW"]
