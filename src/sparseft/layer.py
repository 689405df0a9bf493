"""The adapted layer: a frozen linear layer plus a sparse update in a rotated basis.

For a base layer ``y = x W0ᵀ + b`` (W0 is m×n) and a basis pair P (m×m), Q (n×n):

    W = W0 + P Δ̃ Qᵀ,        Δ̃ sparse, holding the trained entries,

so the *rotated* weight ``W̃ = Pᵀ W Q`` moves only where Δ̃ is non-zero, and the gradient of Δ̃ is
the rotated gradient ``G̃ = Pᵀ (gᵀ x) Q`` (g = ∂L/∂y). Only the rows R and columns C that the
support touches matter: ``P Δ̃ Qᵀ = P_R D Q_Cᵀ`` with D = Δ̃[R, C].

Selection modes:
- ``fixed``: the support (k entries) is chosen once from calibration; the trainable parameter
  is the k-vector ``values``, so optimizer state is O(k).
- ``dynamic``: the trainable parameter is the dense ``delta`` (= Δ̃ on the allowed block) and
  its gradient is cut to its top-k entries before each optimizer step (the paper's mode).

Two ways to compute the same numbers, picked per call by FLOP count (``compute_path='auto'``):
- ``activations``: ``y = x W0ᵀ + b + ((x Q_C) Dᵀ) P_Rᵀ``; cost grows with N·(|R|+|C|)·width and
  no dense weight gradient is ever formed.
- ``weights``: ``y = x (W0 + P_R D Q_Cᵀ)ᵀ + b``; autograd then forms the dense weight gradient
  once (N·m·n) and rotates it (independent of N), cheaper for many tokens.
Identity bases (MeProp) always use ``weights`` with P_R, Q_C replaced by index selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bases import BasisBank
from .errors import NotCalibratedError
from .targets import is_transposed, weight_of


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
            # Until an optimizer takes over selection (attach_optimizer), cut the gradient to its
            # top-k after every backward, so plain loops never train densely by accident.
            self.select_on_backward = True
            self.delta.register_post_accumulate_grad_hook(self._after_backward)
        # MeProp in dynamic mode needs nothing from calibration.
        self.calibrated = identity and selection == "dynamic"
        self.bypass = False  # True during calibration: behave exactly as the base layer

    # ----------------------------------------------------------------------------- support
    def _store_support(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        R, local_r = torch.unique(rows, return_inverse=True)
        C, local_c = torch.unique(cols, return_inverse=True)
        for name, value in (("rows", rows), ("cols", cols), ("R", R), ("C", C), ("local_r", local_r), ("local_c", local_c)):
            self.register_buffer(name, value.to(torch.long), persistent=False)

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

    # ----------------------------------------------------------------------------- compute
    def _factors(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(P_R, D, Q_C): the update is P_R D Q_Cᵀ. None stands for identity bases."""
        if self.selection == "fixed":
            D = self.values.new_zeros(self.R.numel(), self.C.numel()).index_put((self.local_r, self.local_c), self.values)
            rows, cols = self.R, self.C
        else:
            D = self.delta
            rows, cols = slice(0, self.block[0]), slice(0, self.block[1])
        if self.identity:
            return None, D, None
        return self._bank.columns(self.group, "P", rows), D, self._bank.columns(self.group, "Q", cols)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = P_R D Q_Cᵀ as an m×n matrix (differentiable)."""
        P_R, D, Q_C = self._factors()
        if self.identity:
            if self.selection == "fixed":
                return D.new_zeros(self.m, self.n).index_put((self.rows, self.cols), self.values)
            return F.pad(D, (0, self.n - D.shape[1], 0, self.m - D.shape[0]))
        D = D.to(P_R.dtype)
        r, c = D.shape
        if self.m * r * c + self.m * c * self.n <= r * c * self.n + self.m * r * self.n:
            return (P_R @ D) @ Q_C.T
        return P_R @ (D @ Q_C.T)

    def path_for(self, tokens: int) -> str:
        """The cheaper of the two compute paths for ``tokens`` rows of input (FLOPs, fwd+bwd)."""
        if self.compute_path != "auto":
            return self.compute_path if not self.identity else "weights"
        if self.identity:
            return "weights"
        m, n = self.m, self.n
        r, c = (self.R.numel(), self.C.numel()) if self.selection == "fixed" else self.block
        activations = tokens * (2 * n * c + 3 * r * c + 2 * r * m)
        weights = tokens * m * n + 2 * (m * r * c + m * c * n) + r * m * n + r * n * c
        return "activations" if activations <= weights else "weights"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return self.base_layer(x)
        if not self.calibrated:
            if self.training and torch.is_grad_enabled():
                raise NotCalibratedError(
                    "This SparseGrad layer has no bases/support yet: call model.calibrate(batches) "
                    "before training (a few batches of your task, ~10-30 steps)."
                )
            return self.base_layer(x)
        W0 = weight_of(self.base_layer)
        bias = self.base_layer.bias
        if self.path_for(x.numel() // self.n) == "weights":
            return F.linear(x, W0 + self.delta_weight().to(W0.dtype), bias)
        P_R, D, Q_C = self._factors()
        dt = x.dtype
        update = F.linear(F.linear(F.linear(x, Q_C.T.to(dt)), D.to(dt)), P_R.to(dt))
        return F.linear(x, W0, bias) + update

    # ----------------------------------------------------------------------------- dynamic mode
    def _after_backward(self, param: torch.Tensor) -> None:
        if self.select_on_backward:
            self.mask_grad_to_topk_()

    @torch.no_grad()
    def mask_grad_to_topk_(self) -> torch.Tensor | None:
        """Dynamic selection: keep the k largest |entries| of ``delta.grad``, zero the rest.
        Returns the flat indices kept (None without a gradient)."""
        grad = self.delta.grad
        if grad is None:
            return None
        flat = grad.view(-1)
        idx = torch.topk(flat.abs(), self.k, sorted=False).indices
        kept = flat[idx]
        flat.zero_()
        flat[idx] = kept
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
        return self.base_layer

    def extra_repr(self) -> str:
        basis = "identity" if self.identity else "rotated"
        return f"{self.m}x{self.n}, k={self.k}, selection={self.selection}, bases={basis}, block={self.block}"


def adapted_weight(layer: SparseLinear) -> torch.Tensor:
    """W0 + ΔW, the layer's effective m×n weight (for tests and inspection)."""
    with torch.no_grad():
        return weight_of(layer.base_layer).float() + layer.delta_weight().float()


__all__ = ["SparseLinear", "adapted_weight", "is_transposed"]
