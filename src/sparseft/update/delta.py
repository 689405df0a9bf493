"""The trained update of one layer: ``ΔW = P_R D Q_Cᵀ`` from a basis, a support and the device's
kernels, and how each product of a training step is computed.

:class:`SparseDelta` chooses, from the cost model (:mod:`sparseft.update.kernels`):

- forward and input gradient through the merged ``W0 + ΔW`` (one merge, kept between optimizer
  steps with ``cache_update``) or factored through x Q_C and g P_R;
- the value-gradient bracketing (``path_for``), handed to the support, which gathers it or
  computes its own entries (a sampled or batched product).

It holds no tensors of its own but the merge cache: W0, the bias and the trained parameter are
passed in by the layer, so the autograd function (:mod:`sparseft.update.function`) works on
(basis, support, kernels) and never on the layer.
"""

from __future__ import annotations

import itertools
import statistics
import time
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .basis import Basis
from .kernels import GRAD_PATHS, SAMPLED, TorchKernels, autocast_dtype_of, autocast_off, cheapest_path, is_n_major, kernels_for
from .support import Support

# Optimizer steps taken anywhere in this process, counted by a global post-step hook: part of the
# key of every cached merged weight. A parameter's version counter alone is not enough: fused
# optimizers (torch's AdamW(fused=True), transformers.Trainer's default) update in place
# without bumping it.
_OPTIMIZER_STEPS = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _OPTIMIZER_STEPS[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)

# Every live SparseDelta by its handle: the compiled graph's operator (update.function) names its
# layer's delta by this string, a constant torch.compile can hold.
_DELTAS: weakref.WeakValueDictionary[str, SparseDelta] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def delta_of(handle: str) -> SparseDelta:
    """The live SparseDelta with this ``handle``."""
    return _DELTAS[handle]


class SparseDelta:
    """ΔW of an m×n layer in ``basis`` on ``support``; ``compute_path`` "auto" (cost model),
    "activations"/"weights" (forced), or a bracketing's name; ``cache_update`` keeps W0 + ΔW."""

    def __init__(self, basis: Basis, support: Support, m: int, n: int, compute_path: str = "auto",
                 cache_update: bool = True) -> None:
        self.basis, self.support, self.m, self.n = basis, support, m, n
        self.compute_path, self.cache_update = compute_path, bool(cache_update)
        self._cache: tuple | None = None
        self.measured: dict[tuple, tuple[str, dict[str, float]]] = {}  # (dtypes, device) → (path, seconds per path)
        self._register()

    def _register(self) -> None:
        self.handle = f"delta-{next(_HANDLES)}"
        _DELTAS[self.handle] = self

    def __setstate__(self, state: dict) -> None:
        """A copy (``copy.deepcopy`` of a model, unpickling) is a delta of its own: a new handle."""
        self.__dict__.update(state)
        self._register()

    def factors(self, param: torch.Tensor) -> tuple:
        """(D, R, C): the update is P_R D Q_Cᵀ."""
        R, C = self.support.index()
        return self.support.dense(param), R, C

    def delta_weight(self, param: torch.Tensor, column_major: bool = False) -> torch.Tensor:
        """ΔW (m×n), differentiable in ``param``; ``column_major``: laid out as a re-laid W0 is."""
        D, R, C = self.factors(param)
        return self.basis.delta_weight(D, R, C, self.m, self.n, column_major=column_major)

    @torch.no_grad()
    def lora_factors(self, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔW = B A with rank min(a, b): B = P_R D, A = Q_Cᵀ (b ≤ a) or B = P_R, A = D Q_Cᵀ."""
        D, R, C = self.support.compact(param)
        P_R = self.basis.matrix("P", R, self.m, D.device).float()
        Q_C = self.basis.matrix("Q", C, self.n, D.device).float()
        D = D.float()
        if D.shape[1] <= D.shape[0]:
            return P_R @ D, Q_C.T
        return P_R, D @ Q_C.T

    # ----------------------------------------------------------------------------- merge
    @torch.no_grad()
    def merge_into(self, W0: torch.Tensor, param: torch.Tensor, kn: TorchKernels | None = None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 + ΔW by the cheapest route (not differentiable; possibly a transposed view): a fixed
        support's k values go in as a sparse D (m·k + m·b·n at best instead of m·a·b + m·b·n), or
        scattered into a copy of W0 (no rotation), the addition fused where the basis can. The
        merge runs outside autocast, in W0's and the bases' own dtypes: autocast would cast its
        products to half precision, which torch's CPU sparse kernels lack. ``dtype``: the result's
        (W0's by default); the training products ask for autocast's, which their linear would cast
        to anyway. A dense support's ΔW is formed in W0's layout."""
        dtype = dtype or W0.dtype
        if self.support.selection != "fixed":
            return (W0 + self.delta_weight(param, column_major=is_n_major(W0)).detach().to(W0.dtype)).to(dtype)
        with autocast_off(param.device.type):
            return self.basis.merge_into(W0, self.support, param.detach(), kn or kernels_for(W0.device), dtype)

    @torch.no_grad()
    def merged_weight(self, W0: torch.Tensor, param: torch.Tensor, kn: TorchKernels) -> torch.Tensor:
        """W0 + ΔW in the dtype the products run in (autocast's, where it is on: what the linear
        would cast it to). With ``cache_update`` it is kept until the parameter, the support, the
        basis or W0 change (an optimizer step, ``load_state_dict``, a reselection), so the forward,
        the input gradient and every micro-batch between two optimizer steps share one merge.
        Always rebuilt whole, never patched, so a reloaded model computes bit-identical outputs."""
        dtype = autocast_dtype_of(W0.device.type) or W0.dtype
        if not self.cache_update:
            return self.merge_into(W0, param, kn, dtype)
        key = (_OPTIMIZER_STEPS[0], param.data_ptr(), param._version, param.device, self.support.generation, self.basis.version(),
               W0.data_ptr(), W0._version, W0.dtype, dtype)
        if self._cache is None or self._cache[0] != key:
            self._cache = None  # free the old merge before building the new one (peak memory)
            self._cache = (key, self.merge_into(W0, param, kn, dtype))
        return self._cache[1]

    # ----------------------------------------------------------------------------- cost model
    def cost_model(self, tokens: int) -> dict[str, int]:
        """Multiply-adds of one training step's adapted parts at ``tokens`` rows of input."""
        k = self.support.k if self.support.selection == "fixed" else None
        return self.basis.costs(tokens, self.m, self.n, *self.support.shape(), k)

    def path_for(self, tokens: int) -> str:
        """The value-gradient bracketing at ``tokens`` rows: the cheapest, unless forced."""
        if self.compute_path != "auto":
            return self.compute_path
        return cheapest_path(self.cost_model(tokens))

    def merged_forward(self, tokens: int) -> bool:
        """Forward and input gradient through the merged weight (else through x Q_C, g P_R)."""
        if self.cache_update or self.compute_path == "weights":
            return True  # a cached merged update is (nearly) free
        if self.compute_path == "activations":
            return False
        costs = self.cost_model(tokens)
        return costs["merge"] <= costs["factored"]

    def hands_off_n_major(self, x: torch.Tensor, kn: TorchKernels) -> bool:
        """Whether the output goes out column-major over the tokens: a layer wider in its outputs,
        where the next layer's sampled product reads that layout (never where none runs: there the
        layout only costs time, docs/performance.md)."""
        return kn.hand_off_n_major and self.m > self.n and x.dim() >= 2 and kn.sddmm_supported(x)

    # ----------------------------------------------------------------------------- compute
    def forward(self, x: torch.Tensor, W0: torch.Tensor, bias: torch.Tensor | None, param: torch.Tensor,
                kn: TorchKernels, n_major: bool = False) -> torch.Tensor:
        """x (W0 + ΔW)ᵀ + b (no gradient); with W0 None, x ΔWᵀ alone."""
        if W0 is not None and self.merged_forward(x.numel() // self.n):
            return kn.linear(x, self.merged_weight(W0, param, kn), bias, n_major=n_major)
        D, R, C = self.factors(param)
        y0 = kn.linear(x, W0, bias) if W0 is not None else x.new_zeros(*x.shape[:-1], self.m)
        return self.basis.add_update(y0, x, D.detach().to(x.dtype), R, C, kn)

    @torch.no_grad()
    def input_grad(self, g: torch.Tensor, W0: torch.Tensor, param: torch.Tensor, kn: TorchKernels,
                   n_major: bool = False) -> torch.Tensor:
        """g (W0 + ΔW); with W0 None, g ΔW alone."""
        if W0 is not None and self.merged_forward(g.numel() // self.m):
            W = self.merged_weight(W0, param, kn)
            return kn.linear(g, W.T, None, n_major=True) if n_major else g @ W
        D, R, C = self.factors(param)
        gx0 = g @ W0 if W0 is not None else g.new_zeros(*g.shape[:-1], self.n)
        return self.basis.add_input_grad(gx0, g, D.detach().to(g.dtype), R, C, kn)

    @torch.no_grad()
    def value_grad(self, g: torch.Tensor, x: torch.Tensor, kn: TorchKernels) -> torch.Tensor:
        """∂L/∂param: P_Rᵀ gᵀ x Q_C restricted to the support (g: N×m, x: N×n)."""
        path = self.path_for(x.shape[0])
        if kn.measure_paths and self.compute_path == "auto" and path == SAMPLED and kn.sddmm_supported(x):
            key = (g.dtype, x.dtype, autocast_dtype_of(x.device.type), x.device)
            if key not in self.measured:
                self.measured[key] = self._timed_paths(g, x, kn)
            path = self.measured[key][0]
        return self.support.value_grad(self.basis, g, x, path, kn)

    def _timed_paths(self, g: torch.Tensor, x: torch.Tensor, kn: TorchKernels, repeats: int = 3) -> tuple[str, dict[str, float]]:
        """(the faster path, median seconds of each): the sampled product against the cheapest
        whole bracketing, each run once to warm up, then ``repeats`` times, synchronised."""
        costs = self.cost_model(x.shape[0])
        candidates = (SAMPLED, min(GRAD_PATHS, key=costs.__getitem__))
        sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda device=None: None)
        seconds = {}
        for path in candidates:
            times = []
            for _ in range(repeats + 1):
                sync(x.device)
                t0 = time.perf_counter()
                self.support.value_grad(self.basis, g, x, path, kn)
                sync(x.device)
                times.append(time.perf_counter() - t0)
            seconds[path] = statistics.median(times[1:])
        return min(candidates, key=seconds.__getitem__), seconds


__all__ = ["SparseDelta"]
