"""``SparseAdamW``: AdamW whose updates touch only the selected entries of dynamic-selection
parameters, with optimizer state kept for a bounded set of entries.

For a parameter marked by SparseGrad's dynamic mode (attribute ``_sparseft_k = k``) each step:

    I = top-k of |grad|;   for i in I:  m_i ← β1 m_i + (1-β1) g_i,  v_i ← β2 v_i + (1-β2) g_i²,
    θ_i ← θ_i (1 - lr·wd) - lr · (m_i / (1-β1^{c_i})) / (sqrt(v_i / (1-β2^{c_i})) + ε)

where c_i counts the steps at which entry i was selected (a per-entry bias correction, so an
entry selected for the first time gets a full-size step). Entries not in I are not touched,
neither their value nor their moments ("lazy" Adam). The state is stored sparsely (sorted flat
indices plus moments) for at most ``state_factor·k`` entries; when more have been selected, the
least recently selected ones are forgotten. ``state_factor=None`` keeps every entry ever selected
(this can grow to a dense state: ask for it knowingly). Other parameters (a dense task head) get
ordinary AdamW updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .distributed import SHARDED_DYNAMIC, is_sharded
from .errors import ConfigError


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
            for p in group["params"]:
                if p.grad is None:
                    continue
                k = getattr(p, "_sparseft_k", None)
                if k is None:
                    self._dense_step(p, group)
                else:
                    self._sparse_step(p, int(k), group)
        return loss

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = state["step"]
        g = p.grad
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        if wd:
            p.mul_(1 - lr * wd)
        denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))

    def _sparse_step(self, p: torch.Tensor, k: int, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if is_sharded(p.grad):
            raise ConfigError(SHARDED_DYNAMIC)
        flat_grad = p.grad.reshape(-1)
        # index_select/index_copy_ throughout: advanced indexing is ~100x slower on CPU
        selected_by_layer = getattr(p, "_sparseft_selected", None)
        if selected_by_layer is not None and selected_by_layer[0] is p.grad and selected_by_layer[1] == p.grad._version:
            idx = selected_by_layer[2]  # the layer already cut this gradient to its top-k
        else:
            idx = torch.topk(flat_grad.abs(), min(k, flat_grad.numel()), sorted=False).indices.sort().values
        g = flat_grad.index_select(0, idx).float()
        state = self.state[p]
        if not state:
            dev = p.device
            state["step"] = 0
            state["index"] = torch.zeros(0, dtype=torch.long, device=dev)
            state["exp_avg"] = torch.zeros(0, dtype=torch.float32, device=dev)
            state["exp_avg_sq"] = torch.zeros(0, dtype=torch.float32, device=dev)
            state["count"] = torch.zeros(0, dtype=torch.float32, device=dev)
            state["last"] = torch.zeros(0, dtype=torch.long, device=dev)
        state["step"] += 1
        pos = self._positions(state, idx)
        m, v, c = state["exp_avg"], state["exp_avg_sq"], state["count"]
        m_pos = m.index_select(0, pos).mul_(b1).add_(g, alpha=1 - b1)
        v_pos = v.index_select(0, pos).mul_(b2).addcmul_(g, g, value=1 - b2)
        c_pos = c.index_select(0, pos).add_(1)
        m.index_copy_(0, pos, m_pos)
        v.index_copy_(0, pos, v_pos)
        c.index_copy_(0, pos, c_pos)
        state["last"].index_fill_(0, pos, state["step"])
        m_hat = m_pos / (1 - torch.pow(b1, c_pos))
        v_hat = v_pos / (1 - torch.pow(b2, c_pos))
        update = m_hat / (v_hat.sqrt() + eps)
        flat = p.view(-1)
        selected = flat.index_select(0, idx).float()
        if wd:
            selected = selected * (1 - lr * wd)
        flat.index_copy_(0, idx, (selected - lr * update).to(p.dtype))
        cap = group["state_factor"]
        if cap is not None and state["index"].numel() > cap * k:
            keep = torch.topk(state["last"], cap * k, sorted=False).indices.sort().values
            for name in ("index", "exp_avg", "exp_avg_sq", "count", "last"):
                state[name] = state[name].index_select(0, keep)

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
