"""The adapted layer: a frozen linear layer plus a sparse update in a basis.

For a base layer ``y = x W0ᵀ + b`` (W0 is m×n) and a basis pair P (m×m), Q (n×n):

    W = W0 + P Δ̃ Qᵀ = W0 + P_R D Q_Cᵀ,        Δ̃ sparse, holding the trained entries,

so the *rotated* weight ``W̃ = Pᵀ W Q`` moves only where Δ̃ is non-zero, and the gradient of Δ̃ is
the rotated gradient ``G̃ = Pᵀ (gᵀ x) Q`` (g = ∂L/∂y); only the rows R and columns C that the
support touches matter (D = Δ̃[R, C], a = |R|, b = |C|).

``SparseLinear`` composes two small objects and adds no case analysis of its own:

- a **basis** (:mod:`sparseft.bases`): ``RotatedBasis`` (SparseGrad) or ``IdentityBasis``
  (MeProp), which applies P_R D Q_Cᵀ and its transposes;
- a **support** (:mod:`sparseft.support`): ``FixedSupport`` (k entries chosen in calibration,
  parameter ``values``) or ``DynamicSupport`` (top-k of the gradient each step, parameter
  ``delta``).

The formulas, their costs and the choice of bracketing live in :mod:`sparseft.ops`; one autograd
function (``ops.SparseUpdate``) runs the whole layer and saves only x. Forward and input gradient
go through the merged ``W0 + ΔW`` when that is cheaper than the factored way (or always, for a
support whose merged update is cached between optimizer steps), the value gradient through the
cheapest of four bracketings (``path_for``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .bases import BasisBank, IdentityBasis, OneSidedBasis, RotatedBasis
from .config import ROTATIONS
from .errors import ConfigError, InputError, NotCalibratedError
from .ops import GRAD_PATHS, SAMPLED, SparseUpdate, cheapest_path, grad_costs, is_n_major, linear_n_major, lowrank_product, sddmm_supported
from .support import SUPPORTS
from .targets import is_transposed, pack_weight, store_weight, weight_of
from .tuner import BaseTunerLayer


# Optimizer steps taken anywhere in this process, counted by a global post-step hook: part of the
# key of every cached merged weight. A parameter's version counter alone is not enough: fused
# optimizers (torch's AdamW(fused=True), transformers.Trainer's default) update in place
# without bumping it.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class SparseLinear(BaseTunerLayer):
    """Wraps ``base_layer`` (nn.Linear or Conv1D, frozen) with a k-entry trainable update."""

    # A layer wider in its outputs returns them column-major over the tokens while training
    # (ops.linear_n_major); False keeps the plain row-major output (benchmarks compare the two).
    hand_off_n_major: bool = True
    # A fixed one-sided float32 layer stores its frozen W0 in the layout its merge writes
    # (store_weight, at construction); False leaves W0 as given (benchmarks compare the two).
    store_base_for_merge: bool = True

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
        cache_update: bool = True,
        rotation: str = "both",
        basis_blocks: int = 1,
        support_group: int | None = None,  # wide rows per run, dividing the wide side (SparseGradConfig.run_rows)
    ) -> None:
        super().__init__(base_layer)
        if selection not in SUPPORTS:
            raise ConfigError(f"selection={selection!r} is not known; use one of {sorted(SUPPORTS)}.")
        W0 = weight_of(base_layer)
        self.group, self.k = group, int(k)
        self.block = (min(self.m, block[0]), min(self.n, block[1]))
        self.compute_path = compute_path
        object.__setattr__(self, "_bank", bank)  # shared, owned by the tuner: not a submodule
        if rotation not in ROTATIONS:
            raise ConfigError(f"rotation={rotation!r} is not known; use one of {list(ROTATIONS)}.")
        if identity:
            basis = IdentityBasis()
        elif rotation == "narrow":  # the wide side (the larger of m, n) stays the identity
            basis = OneSidedBasis(bank, group, "P" if self.m > self.n else "Q", max(self.m, self.n), basis_blocks)
        else:
            basis = RotatedBasis(bank, group, basis_blocks)
        object.__setattr__(self, "basis", basis)
        # The fused merge (OneSidedBasis.merge_into) adds W0 in the layout it writes the sum in:
        # row-major (W0 + ΔW)ᵀ for a layer narrower in its outputs, whose CSR holds Dᵀ. Stored so
        # once here, W0 is read as it lies instead of copied across layouts at every merge
        # (docs/performance.md); F.linear and matmul read either layout at the same speed. The
        # values are untouched; unload() packs W0 back (release_base_layer).
        self._base_relaid = (self.store_base_for_merge and isinstance(basis, OneSidedBasis) and selection == "fixed"
                             and W0.dtype == torch.float32
                             and store_weight(base_layer, transposed=basis.identity_side == "Q"))
        self.support = SUPPORTS[selection](self, self.k, self.block, W0.device)
        self.register_parameter(self.support.param_name, self.support.new_parameter(adapter_dtype or W0.dtype, W0.device))
        if support_group is not None and isinstance(basis, OneSidedBasis) and selection == "fixed":
            dim = 0 if basis.identity_side == "P" else 1
            width = (self.m, self.n)[dim]
            if self.block[dim] == width:  # runs of the whole wide side (see SparseGradConfig.support_group)
                self.support.grouping = (dim, int(support_group))
        # W0 + ΔW kept between optimizer steps (derived data, never saved; see _merged_weight)
        self.cache_update = bool(cache_update)
        self._cache: tuple | None = None
        # MeProp in dynamic mode needs nothing from calibration.
        self.calibrated = identity and selection == "dynamic"
        self.bypass = False  # True during calibration: behave exactly as the base layer

    # ----------------------------------------------------------------------------- parts
    @property
    def selection(self) -> str:
        return self.support.kind

    @property
    def identity(self) -> bool:
        return self.basis.is_identity

    @property
    def param(self) -> nn.Parameter:
        """The trainable tensor: ``values`` (fixed) or ``delta`` (dynamic)."""
        return self._parameters[self.support.param_name]

    @property
    def select_on_backward(self) -> bool:
        return getattr(self.support, "select_on_backward", False)

    @select_on_backward.setter
    def select_on_backward(self, value: bool) -> None:
        self.support.select_on_backward = value

    # a fixed support's compact index lives in this layer's buffers R, C, local (see FixedSupport)
    rows = property(lambda self: self.support.rows, doc="Rotated row of each value (fixed support).")
    cols = property(lambda self: self.support.cols, doc="Rotated column of each value (fixed support).")

    def trainable_count(self) -> int:
        return self.k  # the entries updated, also in dynamic mode where the dense ``delta`` holds them

    def has_update(self) -> bool:
        return self.calibrated

    # ----------------------------------------------------------------------------- support
    @torch.no_grad()
    def set_support(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Fixed selection: entry i of ``values`` lives at rotated position (rows[i], cols[i])."""
        self.support.set(rows, cols)
        self.calibrated = True

    @torch.no_grad()
    def choose_support(self, scores: torch.Tensor) -> None:
        """Fixed selection: the k entries of the largest ``scores`` (shape = block)."""
        self.support.choose(scores)
        self.calibrated = True

    def mask_grad_to_topk_(self) -> torch.Tensor | None:
        """Dynamic selection: keep the k largest |entries| of ``delta.grad``, zero the rest."""
        return self.support.mask_grad_to_topk_(self.param)

    # ----------------------------------------------------------------------------- update
    def _factors(self) -> tuple:
        """(D, R, C): the update is P_R D Q_Cᵀ in this layer's basis."""
        R, C = self.support.index()
        return self.support.dense(self.param), R, C

    def delta_weight(self, column_major: bool = False) -> torch.Tensor:
        """ΔW = P_R D Q_Cᵀ as an m×n matrix (differentiable; the straightforward formula);
        ``column_major``: laid out as a re-laid W0 is (store_weight)."""
        D, R, C = self._factors()
        return self.basis.delta_weight(D, R, C, self.m, self.n, column_major=column_major)

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = P_R D Q_Cᵀ = B A with rank min(a, b): B = P_R D, A = Q_Cᵀ (b ≤ a) or
        B = P_R, A = D Q_Cᵀ."""
        if not self.calibrated:
            return torch.zeros(self.m, 0), torch.zeros(0, self.n)
        D, R, C = self.support.compact(self.param)
        P_R = self.basis.matrix("P", R, self.m).to(D.device, torch.float32)
        Q_C = self.basis.matrix("Q", C, self.n).to(D.device, torch.float32)
        D = D.float()
        if D.shape[1] <= D.shape[0]:
            return P_R @ D, Q_C.T
        return P_R, D @ Q_C.T

    @torch.no_grad()
    def _merge_into(self, W0: torch.Tensor) -> torch.Tensor:
        """W0 + ΔW for the current parameter by the cheapest route (not differentiable; possibly
        a transposed view). A fixed support's k values go in as a sparse D: ``merge_cost(..., k)``,
        m·k + m·b·n at best instead of the dense product's m·a·b + m·b·n, with the addition of W0
        fused into the product where the basis can (``merge_into``); in identity bases the values
        are simply added at their entries."""
        if self.support.kind != "fixed" or torch.is_autocast_enabled(self.param.device.type):
            # (under autocast the dense product runs in the autocast dtype; torch's sparse kernels
            # have no half-precision CPU version)
            # (ΔW formed in W0's layout: an addition across layouts reads one side transposed)
            return W0 + self.delta_weight(column_major=is_n_major(W0)).detach().to(W0.dtype)
        values = self.param.detach()
        # (a grouped support merges as any other: the fused CSR product beat a batched product per
        # run, which spent its time copying W0 in; docs/performance.md)
        if self.identity:
            merged = W0.clone(memory_format=torch.contiguous_format)
            merged.view(-1).index_add_(0, self.support.rows * self.n + self.support.cols, values.to(W0.dtype))
            return merged
        a, b = self.support.shape()
        side = self.basis.sparse_side(self.m, self.n, a, b, self.k)
        return self.basis.merge_into(W0, self.support.csr(values, side), *self.support.index(), side)

    @torch.no_grad()
    def _merged_weight(self) -> torch.Tensor:
        """W0 + ΔW in the base dtype. With ``cache_update`` it is kept until the parameter, the
        support, the basis or W0 change (an optimizer step, ``load_state_dict``, a reselection), so
        the forward, the input gradient and every gradient-accumulation micro-batch between two
        optimizer steps share one merge. Always rebuilt whole, never patched, so results do not
        depend on the update history (a reloaded model computes bit-identical outputs)."""
        W0 = weight_of(self.base_layer)
        if not self.cache_update:
            return self._merge_into(W0)
        param = self.param
        key = (_OPTIMIZER_STEPS[0], param.data_ptr(), param._version, param.device, self.support.generation, self.basis.version(),
               W0.data_ptr(), W0._version, W0.dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old merge before building the new one (peak memory)
            self._cache = (key, self._merge_into(W0))
        return self._cache[1]

    # ----------------------------------------------------------------------------- cost model
    def cost_model(self, tokens: int) -> dict[str, int]:
        """Multiply-adds of one training step's adapted parts (:func:`sparseft.ops.rotated_costs`)."""
        k = self.k if self.support.kind == "fixed" else None
        return self.basis.costs(tokens, self.m, self.n, *self.support.shape(), k)

    def path_for(self, tokens: int) -> str:
        """The bracketing used for the value gradient at ``tokens`` rows of input: the one of
        ``GRAD_PATHS`` with fewest multiply-adds (``compute_path`` forces activations/weights)."""
        if self.compute_path != "auto":
            return self.compute_path
        return cheapest_path(self.cost_model(tokens))

    def _merged_forward(self, tokens: int) -> bool:
        """Forward and input gradient through the merged weight (else through x Q_C, g P_R)."""
        if self.cache_update or self.compute_path == "weights":
            return True  # a cached merged update is (nearly) free
        if self.compute_path == "activations":
            return False
        costs = self.cost_model(tokens)
        return costs["merge"] <= costs["factored"]

    # ----------------------------------------------------------------------------- compute
    def _forward_no_grad(self, x: torch.Tensor, n_major: bool = False) -> torch.Tensor:
        W0, bias = weight_of(self.base_layer), self.base_layer.bias
        if self._merged_forward(x.numel() // self.n):
            W = self._merged_weight()
            return linear_n_major(x, W, bias) if n_major else F.linear(x, W, bias)
        D, R, C = self._factors()
        return self.basis.add_update(F.linear(x, W0, bias), x, D.detach().to(x.dtype), R, C)

    @torch.no_grad()
    def _input_grad(self, grad_y: torch.Tensor, n_major: bool = False) -> torch.Tensor:
        W0 = weight_of(self.base_layer)
        if self._merged_forward(grad_y.numel() // self.m):
            W = self._merged_weight()
            return linear_n_major(grad_y, W.T, None) if n_major else grad_y @ W
        D, R, C = self._factors()
        return self.basis.add_input_grad(grad_y @ W0, grad_y, D.detach().to(grad_y.dtype), R, C)

    @torch.no_grad()
    def _param_grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """∂L/∂values (k) or ∂L/∂delta (block): P_Rᵀ gᵀ x Q_C, restricted to the support."""
        R, C = self.support.index()
        path = self.path_for(x.shape[0])
        if path == SAMPLED:
            runs = self.support.runs_on(x.device)
            if runs is not None:  # batched dense products, any float dtype
                return self.basis.grouped_grad(g, x, runs)
            if sddmm_supported(x):
                return self.support.sampled_grad(*self.basis.sampled_factors(g, x, R, C))
            path = "activations"  # no half-precision SDDMM: the same bracketing, whole
        return self.support.gather(self.basis.value_grad(g, x, R, C, path))

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
        return super().forward(x)

    def update_forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.support, "check_parameter"):
            self.support.check_parameter(self._parameters.get(self.support.param_name))
        if not self.calibrated:
            if self.training and torch.is_grad_enabled():
                raise NotCalibratedError(
                    "This SparseGrad layer has no bases/support yet: call model.calibrate(batches) "
                    "before training (a few batches of your task, ~10-30 steps)."
                )
            return self.base_layer(x)
        param = self.param
        if torch.is_grad_enabled() and hasattr(self.support, "ensure_hook"):
            self.support.ensure_hook(param)
        if not self._fast_path_ok():
            W0 = weight_of(self.base_layer)
            return F.linear(x, W0 + self.delta_weight().to(W0.dtype), self.base_layer.bias)
        if not (torch.is_grad_enabled() and (param.requires_grad or x.requires_grad)):
            return self._forward_no_grad(x)
        return SparseUpdate.apply(x, param, self)

    # ----------------------------------------------------------------------------- export
    @torch.no_grad()
    def sparse_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the trained update in the rotated space: O(k) numbers."""
        return self.support.sparse_state(self.param)

    @torch.no_grad()
    def load_sparse_state(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        self.support.load_sparse_state(self.param, rows, cols, values)
        self.calibrated = True

    # The support's buffers are not persistent (their length is only known after calibration),
    # so the state dict carries them as "extra state"; a state dict saved after calibration thus
    # restores the support on a fresh, uncalibrated layer (what Trainer's resume_from_checkpoint does).
    def get_extra_state(self) -> torch.Tensor:
        return self.support.extra_state(self.calibrated)

    def set_extra_state(self, state: torch.Tensor) -> None:
        if self.support.load_extra_state(state):
            self.calibrated = True

    # A dynamic ``delta`` is dense but zero outside the entries trained so far: the state dict
    # holds those entries only (flat indices and values), as the adapter file does. Exact: the
    # dense tensor is rebuilt on load. ``keep_vars=True`` (callers that want the Parameters) keeps it.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.selection == "dynamic" and not keep_vars and prefix + "delta" in destination:
            flat = destination.pop(prefix + "delta").reshape(-1)
            index = flat.nonzero().flatten()
            destination[prefix + "delta_index"], destination[prefix + "delta_values"] = index, flat.index_select(0, index)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.selection == "dynamic" and prefix + "delta_index" in state_dict:
            index, values = state_dict.pop(prefix + "delta_index"), state_dict.pop(prefix + "delta_values")
            delta = torch.zeros(self.block, dtype=values.dtype, device=values.device)
            delta.view(-1).index_copy_(0, index.long().to(values.device), values)
            state_dict[prefix + "delta"] = delta
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def release_base_layer(self) -> nn.Module:
        if self._base_relaid:  # hand W0 back stored as the model gave it
            pack_weight(self.base_layer)
            self._base_relaid = False
        return self.base_layer

    def extra_repr(self) -> str:
        return f"{self.m}x{self.n}, k={self.k}, selection={self.selection}, bases={self.basis.label}, block={self.block}"


def adapted_weight(layer: SparseLinear) -> torch.Tensor:
    """W0 + ΔW, the layer's effective m×n weight (for tests and inspection)."""
    with torch.no_grad():
        return weight_of(layer.base_layer).float() + layer.delta_weight().float()


__all__ = ["SparseLinear", "adapted_weight", "is_transposed", "lowrank_product", "grad_costs", "GRAD_PATHS"]
