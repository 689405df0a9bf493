"""The adapted layer: a frozen linear layer plus a sparse update in a rotated basis.

For a base layer ``y = x W0ᵀ + b`` (W0 is m×n) and a basis pair P (m×m), Q (n×n):

    W = W0 + P Δ̃ Qᵀ,        Δ̃ sparse, holding the trained entries,

so the *rotated* weight ``W̃ = Pᵀ W Q`` moves only where Δ̃ is non-zero, and the gradient of Δ̃ is
the rotated gradient ``G̃ = Pᵀ (gᵀ x) Q`` (g = ∂L/∂y). Only the rows R and columns C that the
support touches matter: ``P Δ̃ Qᵀ = P_R D Q_Cᵀ`` with D = Δ̃[R, C] (a = |R|, b = |C|).

Selection modes:
- ``fixed``: the support (k entries) is chosen once from calibration; the trainable parameter
  is the k-vector ``values``, so optimizer state is O(k).
- ``dynamic``: the trainable parameter is the dense ``delta`` (= Δ̃ on the allowed block) and
  its gradient is cut to its top-k entries before each optimizer step (the paper's mode).

How it is computed (see docs/performance.md for the cost model and measurements). One autograd
function does the whole layer, so nothing but the input x is saved for backward:

- forward ``y = x Wᵀ + b`` with the merged ``W = W0 + P_R D Q_Cᵀ`` (merging costs
  ``min(m·b·(a+n), a·n·(b+m))`` multiply-adds, independent of the token count N; dynamic mode keeps the merged
  update cached between optimizer steps), or, when that is dearer
  (few tokens), ``x W0ᵀ + b + ((x Q_C) Dᵀ) P_Rᵀ``;
- input gradient ``g W`` the same way (the merged weight is rebuilt, not kept: no m×n tensor
  outlives a call);
- value gradient ``P_Rᵀ gᵀ x Q_C`` by the cheapest of four bracketings (``path_for``):
  ``activations`` (g P_R)ᵀ(x Q_C), ``weights`` P_Rᵀ(gᵀx)Q_C (the dense weight gradient, rotated),
  ``output-side`` ((g P_R)ᵀ x) Q_C, ``input-side`` P_Rᵀ(gᵀ(x Q_C)). Only ``weights`` forms an
  m×n gradient; fixed mode then gathers its k entries.
Identity bases (MeProp) select rows/columns instead of rotating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bases import BasisBank
from .distributed import SHARDED_DYNAMIC, is_sharded
from .errors import ConfigError, InputError, NotCalibratedError
from .targets import is_transposed, weight_of

GRAD_PATHS = ("activations", "weights", "output-side", "input-side")


def lowrank_product(P_R: torch.Tensor, D: torch.Tensor, Q_C: torch.Tensor) -> torch.Tensor:
    """``P_R D Q_Cᵀ`` (m×n) in the cheaper bracketing: min(m·b·(a+n), a·n·(b+m)) multiply-adds."""
    m, (a, b), n = P_R.shape[0], D.shape, Q_C.shape[0]
    if m * a * b + m * b * n <= a * b * n + m * a * n:
        return (P_R @ D) @ Q_C.T
    return P_R @ (D @ Q_C.T)


def merge_cost(m: int, n: int, a: int, b: int) -> int:
    return min(m * a * b + m * b * n, a * b * n + m * a * n)


def grad_costs(N: int, m: int, n: int, a: int, b: int) -> dict[str, int]:
    """Multiply-adds of the four bracketings of ``P_aᵀ gᵀ x Q_b`` (g: N×m, x: N×n)."""
    return {
        "activations": N * (m * a + n * b + a * b),
        "weights": N * m * n + min(a * m * n + a * n * b, m * n * b + a * m * b),
        "output-side": N * (m * a + a * n) + a * n * b,
        "input-side": N * (n * b + m * b) + a * m * b,
    }


class _SparseUpdate(torch.autograd.Function):
    """y = x (W0 + ΔW)ᵀ + b with ∂L/∂param computed in the rotated space, never via autograd of ΔW."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, layer: "SparseLinear") -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, param)  # param: autograd's version check (no in-place edits between)
        return layer._forward_no_grad(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, param = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        # Under autocast the output (and so grad_y) may be bf16 while x is float32; backward runs
        # outside autocast, so compute in the widest of them and the weight's (the engine casts grad_x back).
        dtype = torch.promote_types(torch.promote_types(grad_y.dtype, x.dtype), weight_of(layer.base_layer).dtype)
        grad_y, x = grad_y.to(dtype), x.to(dtype)
        grad_x = layer._input_grad(grad_y) if ctx.needs_input_grad[0] else None
        grad_param = None
        if ctx.needs_input_grad[1]:
            grad_param = layer._param_grad(grad_y.reshape(-1, layer.m), x.reshape(-1, layer.n)).to(param.dtype)
        return grad_x, grad_param, None


class SparseLinear(nn.Module):
    """Wraps ``base_layer`` (nn.Linear or Conv1D, frozen) with a k-entry trainable update."""

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        group: str,
        k: int,
        selection: str,
        identity: bool,
        bank: BasisBank,
        block: tuple[int, int],
        compute_path: str = "auto",
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        W0 = weight_of(base_layer)
        self.m, self.n = (int(s) for s in W0.shape)
        self.group, self.k, self.selection, self.identity = group, int(k), selection, identity
        self.block = (min(self.m, block[0]), min(self.n, block[1]))
        self.compute_path = compute_path
        object.__setattr__(self, "_bank", bank)  # shared, owned by the SparseModel: not a submodule
        dtype = adapter_dtype or W0.dtype
        if selection == "fixed":
            self.values = nn.Parameter(torch.zeros(self.k, dtype=dtype, device=W0.device))
            self._store_support(torch.zeros(0, dtype=torch.long, device=W0.device), torch.zeros(0, dtype=torch.long, device=W0.device))
        else:
            self.delta = nn.Parameter(torch.zeros(self.block, dtype=dtype, device=W0.device))
            self.delta._sparseft_k = self.k  # read by SparseAdamW
            # FSDP replaces parameters by shards and gathered copies that carry neither the
            # marker nor the hook above: forward checks that `delta` is still this object.
            object.__setattr__(self, "_delta_param", self.delta)
            # Until an optimizer takes over selection (attach_optimizer), cut the gradient to its
            # top-k after every backward, so plain loops never train densely by accident.
            self.select_on_backward = True
            self._hooked_param_id = 0
            self._ensure_hook()
        # dynamic mode: the merged update P Δ̃ Qᵀ, kept and updated where Δ̃ changed (plain
        # attributes, not buffers: derived data, never saved)
        self._cache: tuple | None = None
        # MeProp in dynamic mode needs nothing from calibration.
        self.calibrated = identity and selection == "dynamic"
        self.bypass = False  # True during calibration: behave exactly as the base layer

    # ----------------------------------------------------------------------------- support
    def _store_support(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Keep the support compactly: the distinct rotated rows R and columns C it touches, and
        per value its position in D = Δ̃[R, C] (flattened), int32 where that fits. 4 bytes per
        entry instead of the 16 of (rows, cols) as int64: next to the 16 bytes of value, gradient
        and AdamW moments that LoRA also pays, the index is the only memory LoRA does not need."""
        R, local_r = torch.unique(rows, return_inverse=True)
        C, local_c = torch.unique(cols, return_inverse=True)
        local = local_r * C.numel() + local_c
        index_dtype = torch.int32 if R.numel() * C.numel() < 2**31 else torch.long
        self.register_buffer("R", R.to(torch.long), persistent=False)
        self.register_buffer("C", C.to(torch.long), persistent=False)
        self.register_buffer("local", local.to(index_dtype), persistent=False)

    @property
    def rows(self) -> torch.Tensor:
        """Rotated row of each value (int64, computed from the compact support)."""
        return self.R.index_select(0, self.local.long() // max(1, self.C.numel()))

    @property
    def cols(self) -> torch.Tensor:
        """Rotated column of each value (int64, computed from the compact support)."""
        return self.C.index_select(0, self.local.long() % max(1, self.C.numel()))

    @torch.no_grad()
    def set_support(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Fixed selection: entry i of ``values`` lives at rotated position (rows[i], cols[i])."""
        if rows.numel() != self.k or cols.numel() != self.k:
            raise ValueError(f"support needs {self.k} entries, got {rows.numel()}")
        if int(rows.max()) >= self.block[0] or int(cols.max()) >= self.block[1]:
            raise ValueError("support lies outside the allowed block")
        device = self.values.device
        self._store_support(rows.to(device), cols.to(device))
        self.calibrated = True

    @torch.no_grad()
    def choose_support(self, scores: torch.Tensor) -> None:
        """Fixed selection: the k entries of the largest ``scores`` (shape = block)."""
        idx = torch.topk(scores.flatten().float(), self.k, sorted=False).indices.sort().values
        self.set_support(idx // self.block[1], idx % self.block[1])

    # ----------------------------------------------------------------------------- factors
    def _index(self) -> tuple[torch.Tensor | slice, torch.Tensor | slice]:
        if self.selection == "fixed":
            return self.R, self.C
        return slice(0, self.block[0]), slice(0, self.block[1])

    def _dense_D(self) -> torch.Tensor:
        """D = Δ̃[R, C] (a×b); differentiable in ``values`` / ``delta``."""
        if self.selection == "fixed":
            # index_copy, not advanced indexing: the latter is ~100x slower on CPU
            a, b = self.R.numel(), self.C.numel()
            return self.values.new_zeros(a * b).index_copy(0, self.local.long(), self.values).view(a, b)
        return self.delta

    def _factors(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(P_R, D, Q_C): the update is P_R D Q_Cᵀ. None stands for identity bases."""
        D = self._dense_D()
        if self.identity:
            return None, D, None
        rows, cols = self._index()
        return self._bank.columns(self.group, "P", rows), D, self._bank.columns(self.group, "Q", cols)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = P_R D Q_Cᵀ as an m×n matrix (differentiable; the straightforward formula)."""
        P_R, D, Q_C = self._factors()
        if self.identity:
            if self.selection == "fixed":
                return D.new_zeros(self.m * self.n).index_copy(0, self.rows * self.n + self.cols, self.values).view(self.m, self.n)
            return F.pad(D, (0, self.n - D.shape[1], 0, self.m - D.shape[0]))
        return lowrank_product(P_R, D.to(P_R.dtype), Q_C)

    # ----------------------------------------------------------------------------- cost model
    def _ab(self) -> tuple[int, int]:
        return (self.R.numel(), self.C.numel()) if self.selection == "fixed" else self.block

    def cost_model(self, tokens: int) -> dict[str, int]:
        """Multiply-adds of one training step's adapted parts (the frozen x W0ᵀ and g W0 not
        counted): ``merge`` (each of forward and input gradient, merged-weight way),
        ``factored`` (each of them, through x Q_C / g P_R), and the four gradient bracketings."""
        m, n, (a, b) = self.m, self.n, self._ab()
        if self.identity:  # selecting rows/columns costs no multiply-adds
            return {"merge": 0, "factored": tokens * a * b, "activations": tokens * a * b,
                    "weights": tokens * m * n, "output-side": tokens * a * n, "input-side": tokens * m * b}
        return {"merge": merge_cost(m, n, a, b), "factored": tokens * (n * b + a * b + a * m), **grad_costs(tokens, m, n, a, b)}

    def path_for(self, tokens: int) -> str:
        """The bracketing used for the rotated gradient at ``tokens`` rows of input: the one of
        ``GRAD_PATHS`` with fewest multiply-adds (``compute_path`` forces activations/weights)."""
        if self.compute_path != "auto":
            return self.compute_path
        costs = self.cost_model(tokens)
        return min(GRAD_PATHS, key=costs.__getitem__)

    def _merged_forward(self, tokens: int) -> bool:
        """Forward and input gradient through the merged weight (else through x Q_C, g P_R)."""
        if self.selection == "dynamic" or self.compute_path == "weights":
            return True  # dynamic: the merged update is cached, so merging is (nearly) free
        if self.compute_path == "activations":
            return False
        costs = self.cost_model(tokens)
        return costs["merge"] <= costs["factored"]

    # ----------------------------------------------------------------------------- compute
    @torch.no_grad()
    def _update_weight(self) -> torch.Tensor:
        """ΔW (m×n, base dtype), for the current parameters."""
        W0 = weight_of(self.base_layer)
        if self.selection == "dynamic" and not self.identity:
            return self._cached_delta_weight().to(W0.dtype)
        return self.delta_weight().to(W0.dtype)

    @torch.no_grad()
    def _cached_delta_weight(self) -> torch.Tensor:
        """Dynamic mode: P Δ̃ Qᵀ, rebuilt only when Δ̃ or the bases changed (forward, input
        gradient and gradient-accumulation micro-batches between two optimizer steps share it).
        Always rebuilt whole, never patched, so results do not depend on the update history
        (a resumed or reloaded model computes bit-identical outputs)."""
        delta = self.delta
        P = self._bank.columns(self.group, "P", slice(0, self.block[0]))
        Q = self._bank.columns(self.group, "Q", slice(0, self.block[1]))
        key = (delta.data_ptr(), delta._version, P.data_ptr(), P._version, Q.data_ptr(), Q._version, P.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, lowrank_product(P, delta.to(P.dtype), Q))
        return self._cache[1]

    def _forward_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        W0, bias = weight_of(self.base_layer), self.base_layer.bias
        tokens = x.numel() // self.n
        if self._merged_forward(tokens):
            return F.linear(x, W0 + self._update_weight(), bias)
        P_R, D, Q_C = self._factors()
        y = F.linear(x, W0, bias)
        D = D.detach().to(x.dtype)
        if self.identity:
            return y.index_add_(-1, self.R, F.linear(x.index_select(-1, self.C), D))
        return y + F.linear(F.linear(F.linear(x, Q_C.T.to(x.dtype)), D), P_R.to(x.dtype))

    @torch.no_grad()
    def _input_grad(self, grad_y: torch.Tensor) -> torch.Tensor:
        W0 = weight_of(self.base_layer)
        tokens = grad_y.numel() // self.m
        if self._merged_forward(tokens):
            return grad_y @ (W0 + self._update_weight())
        P_R, D, Q_C = self._factors()
        D = D.detach().to(grad_y.dtype)
        if self.identity:
            return (grad_y @ W0).index_add_(-1, self.C, grad_y.index_select(-1, self.R) @ D)
        return grad_y @ W0 + ((grad_y @ P_R.to(grad_y.dtype)) @ D) @ Q_C.T.to(grad_y.dtype)

    @torch.no_grad()
    def _param_grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """∂L/∂values (k) or ∂L/∂delta (block): P_Rᵀ gᵀ x Q_C, restricted to the support."""
        rows, cols = self._index()
        path = self.path_for(x.shape[0])
        if self.identity:
            Gt = g[:, rows].T @ x[:, cols]
        else:
            dt = x.dtype
            P_R = self._bank.columns(self.group, "P", rows).to(dt)
            Q_C = self._bank.columns(self.group, "Q", cols).to(dt)
            if path == "activations":
                Gt = (g @ P_R).T @ (x @ Q_C)
            elif path == "weights":
                Gt = lowrank_product(P_R.T, g.T @ x, Q_C.T)
            elif path == "output-side":
                Gt = ((g @ P_R).T @ x) @ Q_C
            else:
                Gt = P_R.T @ (g.T @ (x @ Q_C))
        if self.selection == "fixed":
            return Gt.reshape(-1).index_select(0, self.local)  # int32 index: no copy
        return Gt

    def _fast_path_ok(self) -> bool:
        """The fused function covers a frozen base layer (the usual case); anything else (a
        base weight or bias that trains too) goes through plain autograd."""
        base = self.base_layer
        return not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise InputError(
                f"This {self.m}×{self.n} layer takes inputs whose last dimension is {self.n}, got shape "
                f"{tuple(x.shape)}: the batch does not fit the model (wrong model, or inputs not for it)."
            )
        if self.bypass:
            return self.base_layer(x)
        if self.selection == "dynamic" and self._parameters.get("delta") is not self._delta_param:
            raise ConfigError(SHARDED_DYNAMIC)
        if not self.calibrated:
            if self.training and torch.is_grad_enabled():
                raise NotCalibratedError(
                    "This SparseGrad layer has no bases/support yet: call model.calibrate(batches) "
                    "before training (a few batches of your task, ~10-30 steps)."
                )
            return self.base_layer(x)
        if self.selection == "dynamic" and torch.is_grad_enabled():
            self._ensure_hook()
        param = self.values if self.selection == "fixed" else self.delta
        if not self._fast_path_ok():
            W0 = weight_of(self.base_layer)
            return F.linear(x, W0 + self.delta_weight().to(W0.dtype), self.base_layer.bias)
        if not (torch.is_grad_enabled() and (param.requires_grad or x.requires_grad)):
            return self._forward_no_grad(x)
        return _SparseUpdate.apply(x, param, self)

    # ----------------------------------------------------------------------------- dynamic mode
    def _ensure_hook(self) -> None:
        """Register the top-k hook on ``delta`` once per parameter object: a deep copy (or a
        replaced parameter) gets a new object, and hooks do not travel with copies."""
        if self._hooked_param_id != id(self.delta):
            self.delta.register_post_accumulate_grad_hook(self._after_backward)
            self._hooked_param_id = id(self.delta)

    def _after_backward(self, param: torch.Tensor) -> None:
        # SparseAdamW (or an attached optimizer) takes the top-k itself, at step time.
        if not self.select_on_backward or getattr(param, "_sparseft_optimizer_selects", False):
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # Masking here would cut each rank's local gradient before DDP's all-reduce: the ranks'
            # top-k differ and the reduced update is not the top-k of the global gradient.
            raise ConfigError(
                "Dynamic selection under torch.distributed must run after the gradient all-reduce: "
                "use SparseAdamW, or call model.attach_optimizer(optimizer) before training."
            )
        self.mask_grad_to_topk_()

    @torch.no_grad()
    def mask_grad_to_topk_(self) -> torch.Tensor | None:
        """Dynamic selection: keep the k largest |entries| of ``delta.grad``, zero the rest.
        Returns the flat indices kept (None without a gradient)."""
        grad = self.delta.grad
        if grad is None:
            return None
        if is_sharded(grad):
            raise ConfigError(SHARDED_DYNAMIC)
        flat = grad.view(-1)
        idx = torch.topk(flat.abs(), self.k, sorted=False).indices.sort().values
        kept = flat.index_select(0, idx)
        flat.zero_()
        flat.index_copy_(0, idx, kept)
        # SparseAdamW reuses this selection while the gradient is untouched (no second top-k)
        self.delta._sparseft_selected = (grad, grad._version, idx)
        return idx

    # ----------------------------------------------------------------------------- export / merge
    @torch.no_grad()
    def sparse_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the trained update in the rotated space: O(k) numbers."""
        if self.selection == "fixed":
            return self.rows.clone(), self.cols.clone(), self.values.detach().clone()
        nz = self.delta.nonzero(as_tuple=True)
        return nz[0], nz[1], self.delta[nz].detach().clone()

    @torch.no_grad()
    def load_sparse_state(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        if self.selection == "fixed":
            self.set_support(rows, cols)
            self.values.copy_(values.to(self.values.dtype))
        else:
            self.delta.zero_()
            self.delta[rows.to(self.delta.device), cols.to(self.delta.device)] = values.to(self.delta)
            self.calibrated = True

    # ----------------------------------------------------------------------------- state dict
    # The support buffers are not persistent (their length is only known after calibration), so
    # the state dict carries them as "extra state": one (2, k) index tensor, or (2, 0) before
    # calibration. A state dict saved after calibration thus restores the support on a fresh,
    # uncalibrated layer (what Trainer's resume_from_checkpoint does).
    def get_extra_state(self) -> torch.Tensor:
        if self.selection == "fixed":
            return torch.stack([self.rows, self.cols]) if self.calibrated else torch.zeros(2, 0, dtype=torch.long)
        return torch.tensor([int(self.calibrated)], dtype=torch.long)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if self.selection == "fixed":
            if state.numel():
                self.set_support(state[0].long(), state[1].long())
        elif int(state[0]):
            self.calibrated = True

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Fold the update into the base weight; returns the plain base layer."""
        W = weight_of(self.base_layer)
        if self.calibrated:
            W.copy_((W.float() + self.delta_weight().float()).to(W.dtype))
        self._cache = None
        return self.base_layer

    def extra_repr(self) -> str:
        basis = "identity" if self.identity else "rotated"
        return f"{self.m}x{self.n}, k={self.k}, selection={self.selection}, bases={basis}, block={self.block}"


def adapted_weight(layer: SparseLinear) -> torch.Tensor:
    """W0 + ΔW, the layer's effective m×n weight (for tests and inspection)."""
    with torch.no_grad():
        return weight_of(layer.base_layer).float() + layer.delta_weight().float()


__all__ = ["SparseLinear", "adapted_weight", "is_transposed", "lowrank_product", "grad_costs", "GRAD_PATHS"]
