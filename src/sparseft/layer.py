"""The adapted layer: a frozen linear layer plus a sparse update in a basis.

For a base layer ``y = x W0ᵀ + b`` (W0 is m×n) and a basis pair P (m×m), Q (n×n):

    W = W0 + P Δ̃ Qᵀ = W0 + P_R D Q_Cᵀ,        Δ̃ sparse, holding the trained entries,

so the *rotated* weight ``W̃ = Pᵀ W Q`` moves only where Δ̃ is non-zero, and the gradient of Δ̃ is
the rotated gradient ``G̃ = Pᵀ (gᵀ x) Q`` (g = ∂L/∂y); only the rows R and columns C that the
support touches matter (D = Δ̃[R, C], a = |R|, b = |C|).

``SparseLinear`` composes the parts of :mod:`sparseft.update` and adds no case analysis of its
own: a basis and a support (picked once, by ``make_basis`` and ``make_support``), the
:class:`~sparseft.update.delta.SparseDelta` that computes with them, and the autograd function
``SparseUpdate`` (under ``torch.compile``, the operator ``compiled_update`` calls). It owns the
module side: the trainable parameter, the state dict, calibration state and export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError, NotCalibratedError
from .quantized import compute_dtype, dequantized, is_quantized
from .targets import is_transposed, pack_weight, store_weight, weight_of
from .loaded import SparseFactors
from .tuner import BaseTunerLayer
from .update.bank import BasisBank
from .update.basis import IdentityBasis, InputRotatedBasis, make_basis
from .update.delta import SparseDelta
from .update.function import SparseUpdate, compiled_update
from .update.kernels import GRAD_PATHS, grad_costs, kernels_for, lowrank_product
from .update.support import make_support


class SparseLinear(BaseTunerLayer):
    """Wraps ``base_layer`` (nn.Linear or Conv1D, frozen) with a k-entry trainable update.

    ``rotation`` ("both", "narrow", "none"; ``identity``: "none") picks the basis, ``support``
    (a registered name, default ``selection``: "fixed" or "dynamic"; "fixed" with
    ``support_group`` wide rows per run is grouped) the support."""

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
        support: str | None = None,
    ) -> None:
        super().__init__(base_layer)
        W0 = base_layer.weight
        self.quantized = is_quantized(base_layer)  # W0 stays in its format: y = base(x) + update (sparseft.quantized)
        self.group, self.k = group, int(k)
        self.block = (min(self.m, block[0]), min(self.n, block[1]))
        object.__setattr__(self, "_bank", bank)  # shared, owned by the tuner: not a submodule
        basis = make_basis("none" if identity else rotation, bank, group, self.m, self.n, basis_blocks)
        wide = 0 if self.m > self.n else 1
        one_sided = isinstance(basis, InputRotatedBasis)  # (the output-rotated basis is its mirror)
        runs = support_group if one_sided and self.block[wide] == (self.m, self.n)[wide] else None
        self.support = make_support(support or selection, self, self.k, self.block, W0.device, run_rows=runs, wide_dim=wide)
        # W0 stored in the layout the fused merge writes the sum in (Basis.base_layout), so the
        # merge reads it as it lies; the values are untouched, and unload() packs W0 back.
        layout = basis.base_layout()
        self._base_relaid = (not self.quantized and kernels_for(W0.device).relay_base and layout is not None
                             and self.support.selection == "fixed" and W0.dtype == torch.float32
                             and store_weight(base_layer, transposed=layout))
        self.register_parameter(self.support.param_name,
                                self.support.new_parameter(adapter_dtype or compute_dtype(base_layer), W0.device))
        object.__setattr__(self, "update", SparseDelta(basis, self.support, self.m, self.n, compute_path, cache_update))
        # Nothing to calibrate: no bases to fill (MeProp's identity) and a support chosen every step.
        self.calibrated = not basis.rotated_parts and self.support.selection == "dynamic"
        self.bypass = False  # True during calibration: behave exactly as the base layer

    # ----------------------------------------------------------------------------- parts
    basis = property(lambda self: self.update.basis)
    selection = property(lambda self: self.support.selection)
    identity = property(lambda self: isinstance(self.basis, IdentityBasis), doc="P = Q = I (MeProp).")
    compute_path = property(lambda self: self.update.compute_path,
                            lambda self, path: setattr(self.update, "compute_path", path))
    cache_update = property(lambda self: self.update.cache_update,
                            lambda self, keep: setattr(self.update, "cache_update", bool(keep)))

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
    def choose_support(self, scores: torch.Tensor, seed: int | None = None) -> None:
        """Fixed selection: the k entries of the largest ``scores`` (shape = block); ``seed``:
        the scores are ``seeded_scores(block, seed)`` (the adapter file then stores the seed). The
        top-k runs where ``scores`` are: keep seeded scores on the CPU, so that the support does
        not depend on how a device's topk breaks ties."""
        self.support.choose(scores)
        if hasattr(self.support, "seed"):  # (a registered support of another kind may not keep one)
            self.support.seed = seed
        self.calibrated = True

    def mask_grad_to_topk_(self) -> torch.Tensor | None:
        """Dynamic selection: keep the k largest |entries| of ``delta.grad``, zero the rest."""
        return self.support.mask_grad_to_topk_(self.param)

    # ----------------------------------------------------------------------------- update
    def delta_weight(self, column_major: bool = False) -> torch.Tensor:
        """ΔW = P_R D Q_Cᵀ as an m×n matrix (differentiable); ``column_major``: laid out as a
        re-laid W0 is (store_weight)."""
        return self.update.delta_weight(self.param, column_major)

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = B A with rank min(a, b) (:meth:`SparseDelta.lora_factors`)."""
        if not self.calibrated:
            return torch.zeros(self.m, 0), torch.zeros(0, self.n)
        return self.update.lora_factors(self.param)

    @torch.no_grad()
    def inference_update(self, dtype: torch.dtype) -> nn.Module:
        """The update in its own form for a loaded adapter: D's k entries, the basis columns its
        support touches (views of the bases where they are leading runs), row/column indices on
        an identity side (:class:`~sparseft.loaded.SparseFactors`)."""
        if not self.calibrated:
            return super().inference_update(dtype)
        rows, cols = self.support.index()
        if self.selection == "fixed":
            D = self.support.csr(self.param.detach(), "Q")
        else:
            D, R, C = self.support.compact(self.param)
            rows, cols = R, C
        rotated = self.basis.rotated_parts
        a, b = D.shape
        side = {}
        for part, idx, size, name in (("P", rows, self.m, "rows"), ("Q", cols, self.n, "cols")):
            if part in rotated:
                side[part] = self._bank.columns(self.group, part, idx, D.device)
            elif not (isinstance(idx, slice) and (idx.stop or 0) - (idx.start or 0) == size):
                side[name] = torch.arange(size, device=D.device)[idx] if isinstance(idx, slice) else idx
        return SparseFactors(self.m, self.n, D, dtype=dtype, **side)

    def _merge_into(self, W0: torch.Tensor) -> torch.Tensor:
        return self.update.merge_into(W0, self.param)

    def cost_model(self, tokens: int) -> dict[str, int]:
        """Multiply-adds of one training step's adapted parts (:meth:`SparseDelta.cost_model`)."""
        return self.update.cost_model(tokens)

    def path_for(self, tokens: int) -> str:
        """The value-gradient bracketing at ``tokens`` rows of input (:meth:`SparseDelta.path_for`)."""
        return self.update.path_for(tokens)

    def _param_grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.update.value_grad(g, x, kernels_for(x.device))

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
        inference = not (torch.is_grad_enabled() and (param.requires_grad or x.requires_grad))
        if torch.compiler.is_compiling() and self._fast_path_ok():  # one opaque node of the graph: no graph break
            if self.quantized:
                return self.base_layer(x) + compiled_update(x, param, None, None, self.update)
            return compiled_update(x, param, weight_of(self.base_layer), self.base_layer.bias, self.update)
        if inference and self._fast_path_ok() and not self._merge_pays(x.numel() // self.n):
            y = self.base_layer(x)  # x W0ᵀ + b, and the update in its sparse form beside it
            return y + self._inference_factors()(x).to(y.dtype)
        if self.quantized:  # the quantized kernel computes x W0ᵀ + b and its input gradient; the update beside it
            if inference:
                return self.base_layer(x) + self.update.forward(x, None, None, param, kernels_for(x.device))
            return self.base_layer(x) + SparseUpdate.apply(x, param, None, None, self.update)
        if not self._fast_path_ok():
            W0 = weight_of(self.base_layer)
            return F.linear(x, W0 + self.delta_weight().to(W0.dtype), self.base_layer.bias)
        W0, bias = weight_of(self.base_layer), self.base_layer.bias
        if inference:
            return self.update.forward(x, W0, bias, param, kernels_for(x.device))
        return SparseUpdate.apply(x, param, W0, bias, self.update)

    def inference_factors(self, tokens: int, beside_base: bool = False) -> SparseFactors | None:
        """``beside_base``: the base layer has run over these rows already (a mixed batch), so the
        sparse form is weighed against a second dense pass over them, not against a merge."""
        if not self.calibrated or torch.is_grad_enabled() or not self._fast_path_ok() or torch.compiler.is_compiling():
            return None  # (compiled: the layer's own rows go through its operator, sparseft::update)
        dense_pays = self._sparse_cost(tokens) >= tokens * self.m * self.n if beside_base else self._merge_pays(tokens)
        if dense_pays:
            return None
        return self._inference_factors()

    def _sparse_cost(self, tokens: int) -> int:
        """Multiply-adds of the update in its sparse form beside the base layer: N·(n·b + k + m·a)
        with b, a counted on rotated sides only."""
        a, b = self.support.shape()
        rotated = self.basis.rotated_parts
        return tokens * (self.n * b * ("Q" in rotated) + self.k + self.m * a * ("P" in rotated))

    def _merge_pays(self, tokens: int) -> bool:
        """Inference: whether merging W0 + ΔW for this call (forming ΔW and adding it to a copy of
        W0, m·n) or using the cached merge costs less than the update in its sparse form beside
        the base layer (never for a quantized W0)."""
        if self.quantized:
            return False
        if self.cache_update:
            return True
        return self.update.cost_model(tokens)["merge"] + self.m * self.n < self._sparse_cost(tokens)

    def _inference_factors(self) -> SparseFactors:
        """The update as a loaded adapter keeps it (:meth:`inference_update`), built once per
        state of the values, support and bases: generation then costs N·(n·b + k) per layer
        instead of the dense a×b product of the training-time factored path."""
        param = self.param
        key = (id(param), param._version, self.support.generation, self.basis.version(), param.device)
        cached = self.__dict__.get("_factors")  # (not a submodule: never in state_dict or modules())
        if cached is None or cached[0] != key:
            self.__dict__["_factors"] = None
            self.__dict__["_factors"] = cached = (key, self.inference_update(compute_dtype(self.base_layer)).to(param.device))
        return cached[1]

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
        W0 = dequantized(layer.base_layer) if layer.quantized else weight_of(layer.base_layer)
        return W0.float() + layer.delta_weight().float()


__all__ = ["SparseLinear", "adapted_weight", "is_transposed", "lowrank_product", "grad_costs", "GRAD_PATHS"]
