"""The kernel seam: the cost model and the torch reference of every primitive the update runs.

Every product of the sparse update (:mod:`sparseft.update`) goes through a :class:`Kernels`
object chosen per device by :func:`kernels_for`. :class:`TorchKernels` is the reference, written
with torch's own ops; a CUDA/Triton backend subclasses it, overrides what it accelerates, and
registers itself for its device type (:func:`register_kernels`); tests compare it against the
reference. The primitives:

    rotate            t B[:, idx]              (block by block for a block-diagonal B)
    lowrank_product   P_R D Q_Cᵀ              (the cheaper bracketing)
    merge             [W0 +] P_R D Q_Cᵀ        (D sparse, CSR)
    sparse_dense      D Bᵀ [+ W0]              (D sparse, CSR: one-sided merges)
    sampled_product   (leftᵀ right) at a CSR pattern's entries (SDDMM)
    gather / scatter / scatter_add   a flat index out of / written into / added into a tensor
    linear            x Wᵀ + b, optionally laid out column-major over the tokens
    run_products      per run of wide rows, its activations times its directions (batched)

The cost model counts multiply-adds. For y = x W0ᵀ (W0 m×n) trained as ``W0 + P_R D Q_Cᵀ``
(P_R m×a, D a×b, Q_C n×b), with g = ∂L/∂y (N×m) and x (N×n):

    forward          y   = x W0ᵀ + x Q_C Dᵀ P_Rᵀ
    input gradient   ∂x  = g W0 + g P_R D Q_Cᵀ
    value gradient   ∂D  = P_Rᵀ gᵀ x Q_C          (its support entries only)

The update runs *merged* (ΔW formed once, ``merge_cost``, independent of N) or *factored* (linear
in N); the value gradient by the cheapest of four bracketings (``GRAD_PATHS``) or, for a fixed
support, the sampled product at its k entries (``SAMPLED``):

    activations   (g P_R)ᵀ (x Q_C)          N·(m·a + n·b + a·b)
    weights       P_Rᵀ (gᵀ x) Q_C           N·m·n + the cheaper side of the rotation
    output-side   ((g P_R)ᵀ x) Q_C          N·(m·a + a·n) + a·n·b
    input-side    P_Rᵀ (gᵀ (x Q_C))         N·(n·b + m·b) + a·m·b
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

GRAD_PATHS = ("activations", "weights", "output-side", "input-side")
SAMPLED = "sampled"  # fixed supports: (g P_R)ᵀ (x Q_C) at the k support entries only (SDDMM)
MIRRORED_PATH = {"input-side": "output-side", "output-side": "input-side"}  # the same bracketing of the transposed layer

Index = torch.Tensor | slice  # rows/columns of a basis: indices (fixed support) or a leading block


# ----------------------------------------------------------------------------- cost model
def merge_cost(m: int, n: int, a: int, b: int, k: int | None = None) -> int:
    """Multiply-adds of forming ``P_R D Q_Cᵀ`` (m×n) from an a×b D; with ``k`` (D's non-zeros,
    a fixed support) from the sparse D: ``(P_R D)`` costs m·k instead of m·a·b."""
    k = a * b if k is None else min(k, a * b)
    return min(m * k + m * b * n, k * n + m * a * n)


def sparse_side(m: int, n: int, a: int, b: int, k: int) -> str:
    """Which factor a k-entry D multiplies first in ``P_R D Q_Cᵀ``: "P" ((P_R D) Q_Cᵀ, m·k + m·b·n)
    or "Q" (P_R (D Q_Cᵀ), k·n + m·a·n)."""
    return "P" if m * k + m * b * n <= k * n + m * a * n else "Q"


def rotation_cost(N: int, size: int, used: int, blocks: int = 1) -> int:
    """Multiply-adds of N activations times ``used`` columns of a size×size basis; a
    block-diagonal basis taken whole (``used == size``) costs 1/blocks of the dense product."""
    return N * size * used // blocks if used == size else N * size * used


def grad_costs(N: int, m: int, n: int, a: int, b: int, k: int | None = None, blocks: int = 1) -> dict[str, int]:
    """Multiply-adds of the four bracketings of ``P_aᵀ gᵀ x Q_b`` (g: N×m, x: N×n), and with ``k``
    (a fixed support's entries) the ``sampled`` one. ``blocks``: block-diagonal bases, applied
    block by block on the activations' paths."""
    rot = rotation_cost(N, m, a, blocks) + rotation_cost(N, n, b, blocks)
    costs = {
        "activations": rot + N * a * b,
        "weights": N * m * n + min(a * m * n + a * n * b, m * n * b + a * m * b),
        "output-side": N * (m * a + a * n) + a * n * b,
        "input-side": N * (n * b + m * b) + a * m * b,
    }
    if k is not None:
        costs[SAMPLED] = rot + N * k
    return costs


def rotated_costs(tokens: int, m: int, n: int, a: int, b: int, k: int | None = None, blocks: int = 1) -> dict[str, int]:
    """One training step's adapted multiply-adds with both sides rotated (frozen x W0ᵀ, g W0 not
    counted): ``merge`` (from a k-entry D when ``k`` is given), ``factored`` (each of forward and
    input gradient), and the value-gradient bracketings."""
    return {"merge": merge_cost(m, n, a, b, k), "factored": tokens * (n * b + a * b + a * m), **grad_costs(tokens, m, n, a, b, k, blocks)}


def one_sided_costs(tokens: int, m: int, n: int, a: int, b: int, k: int | None, identity_side: str,
                    blocks: int = 1) -> dict[str, int]:
    """As :func:`rotated_costs` with one side the identity. With P = I the update is rows R of W
    (``D Q_Cᵀ``): the m·a rotation of g disappears, and the N·m·a term with it; Q = I is the same
    count for the transposed layer (m↔n, a↔b, input-side↔output-side)."""
    if identity_side == "Q":
        mirrored = one_sided_costs(tokens, n, m, b, a, k, "P", blocks)
        return {MIRRORED_PATH.get(key, key): value for key, value in mirrored.items()}
    N, kk = tokens, a * b if k is None else min(k, a * b)
    rot = rotation_cost(N, n, b, blocks)
    act = rot + N * a * b
    costs = {"merge": kk * n, "factored": N * (n * b + a * b), "activations": act, "input-side": act,
             "output-side": N * a * n + a * n * b, "weights": N * m * n + a * n * b}
    if k is not None:
        costs[SAMPLED] = rot + N * k
    return costs


def identity_costs(tokens: int, m: int, n: int, a: int, b: int, k: int | None = None) -> dict[str, int]:
    """As :func:`rotated_costs` for identity bases: selecting rows/columns costs nothing."""
    costs = {"merge": 0, "factored": tokens * a * b, "activations": tokens * a * b,
             "weights": tokens * m * n, "output-side": tokens * a * n, "input-side": tokens * m * b}
    if k is not None:
        costs[SAMPLED] = tokens * k
    return costs


def cheapest_path(costs: dict[str, int]) -> str:
    """The value-gradient bracketing (``GRAD_PATHS``, and ``SAMPLED`` where costed) with the
    fewest multiply-adds."""
    return min((p for p in (*GRAD_PATHS, SAMPLED) if p in costs), key=costs.__getitem__)


# ----------------------------------------------------------------------------- layouts
def is_n_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (…×features, N tokens) lies column-major over its tokens: each feature's
    N values contiguous, as :meth:`TorchKernels.linear` returns them with ``n_major``. For a
    matrix: stored transposed, as a re-laid W0 is (``targets.store_weight``)."""
    if t.dim() < 2 or t.shape[-1] < 2 or t.numel() // t.shape[-1] < 2:
        return False  # one token or one feature: both layouts coincide
    return t.movedim(-1, 0).is_contiguous()


def block_bounds(size: int, blocks: int) -> list[tuple[int, int]]:
    """[start, stop) of ``blocks`` consecutive diagonal blocks of a size×size basis (sizes differ
    by at most one when ``blocks`` does not divide ``size``; at most ``size`` blocks)."""
    blocks = min(blocks, size)
    edges = [round(i * size / blocks) for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def lowrank_product(P_R: torch.Tensor, D: torch.Tensor, Q_C: torch.Tensor) -> torch.Tensor:
    """``P_R D Q_Cᵀ`` (m×n) in the cheaper bracketing: min(m·b·(a+n), a·n·(b+m)) multiply-adds."""
    m, (a, b), n = P_R.shape[0], D.shape, Q_C.shape[0]
    if m * a * b + m * b * n <= a * b * n + m * a * n:
        return (P_R @ D) @ Q_C.T
    return P_R @ (D @ Q_C.T)


_SPARSE_DTYPES: dict[tuple[str, int | None, torch.dtype], bool] = {}


def sparse_products_in(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether torch multiplies a sparse CSR matrix by a dense one in ``dtype`` on ``device``:
    float32/float64 everywhere; bfloat16/float16 where cuSPARSE has the kernels (a recent GPU),
    not on the CPU (MKL has none). Probed once per device and dtype with a 2×2 product, so a
    merge in half precision on a GPU is one fused product instead of a float32 one, a cast and an
    addition (docs/performance.md)."""
    if dtype in (torch.float32, torch.float64):
        return True
    key = (device.type, device.index, dtype)
    if key not in _SPARSE_DTYPES:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                eye = torch.eye(2, dtype=dtype, device=device)
                torch.addmm(eye, eye.to_sparse_csr(), eye)
            _SPARSE_DTYPES[key] = True
        except RuntimeError:  # (NotImplementedError is one)
            _SPARSE_DTYPES[key] = False
    return _SPARSE_DTYPES[key]


# ----------------------------------------------------------------------------- the reference
@dataclass(frozen=True)
class TorchKernels:
    """Every primitive in torch's own ops: the reference a device backend is tested against.

    ``hand_off_n_major``: a layer wider in its outputs returns them column-major over the tokens
    (``linear(..., n_major=True)``), the layout the next layer's sampled product reads, which
    then copies nothing. ``relay_base``: a fixed one-sided layer stores W0 in the layout its
    fused merge writes (``Basis.base_layout``). Both are layout choices of this backend; the
    benchmarks time them against plain layouts (docs/performance.md).

    ``measure_paths``: a fixed support's value gradient by the faster, timed on this device, of
    the sampled product and the cheapest whole bracketing (then gathered), instead of by counted
    multiply-adds alone. Each layer times them once per dtype, on its first backward (which
    therefore synchronises, as ``torch.backends.cudnn.benchmark`` does), and keeps the choice.
    The count describes a CPU; on a GPU a dense product on tensor cores can beat a sampled one
    with a hundredth of its multiply-adds (a 1% support)."""

    name: str = "torch"
    hand_off_n_major: bool = True
    relay_base: bool = True
    measure_paths: bool = False

    @staticmethod
    def sddmm_supported(x: torch.Tensor) -> bool:
        """torch's SDDMM has float32/float64 kernels only: half precision (and autocast) use a
        dense product instead."""
        return x.dtype in (torch.float32, torch.float64) and autocast_dtype_of(x.device.type) is None

    lowrank_product = staticmethod(lowrank_product)

    @staticmethod
    def rotate(t: torch.Tensor, B: torch.Tensor, idx: Index, blocks: int, n_major: bool = False) -> torch.Tensor:
        """``t @ B`` (B already restricted to ``idx``). A block-diagonal basis taken whole
        multiplies block by block, skipping the zero blocks. ``n_major`` (t 2-D): the same values
        laid out column-major, computed as ``(Bᵀ tᵀ)ᵀ`` at the same cost."""
        B = B.to(t.dtype)
        size = B.shape[0]
        whole = blocks == 1 or not (isinstance(idx, slice) and idx == slice(0, size))
        if n_major:
            if whole:
                return (B.T @ t.T).T
            return torch.cat([B[a:b, a:b].T @ t[:, a:b].T for a, b in block_bounds(size, blocks)], dim=0).T
        if whole:
            return t @ B
        return torch.cat([t[..., a:b] @ B[a:b, a:b] for a, b in block_bounds(size, blocks)], dim=-1)

    @staticmethod
    def sparse_dense(D: torch.Tensor, B_T: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
        """``D B_T`` for a sparse CSR D, in B_T's dtype; with ``base``, ``base + D B_T`` fused into
        one torch.addmm (the caller checks that base has B_T's dtype and that the device multiplies
        sparse matrices in it, ``sparse_products_in``). In a half precision the device has no
        sparse kernel for (the CPU's MKL has none), the product runs in float32."""
        dtype = B_T.dtype
        if base is not None:
            return torch.addmm(base, D.to(dtype), B_T)
        wide = dtype if sparse_products_in(dtype, B_T.device) else torch.promote_types(dtype, torch.float32)
        return torch.sparse.mm(D.to(wide), B_T.to(wide)).to(dtype)

    def merge(self, P_R: torch.Tensor, D: torch.Tensor, Q_C: torch.Tensor, side: str,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """``P_R D Q_Cᵀ`` (m×n) for a sparse CSR ``D``: given as Dᵀ (b×a) when ``side`` is "P",
        as D (a×b) when "Q". With ``base`` (m×n, the bases' dtype): ``base + P_R D Q_Cᵀ``, the
        addition fused into the dense product (torch.addmm), so no m×n temporary is formed."""
        if side == "P":
            left, right = self.sparse_dense(D, P_R.T).T, Q_C.T
        else:
            left, right = P_R, self.sparse_dense(D, Q_C.T)
        return left @ right if base is None else torch.addmm(base, left, right)

    @staticmethod
    def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
        with warnings.catch_warnings():  # torch flags all of sparse CSR as "beta"; these products are stable
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)

    @staticmethod
    def sampled_product(mask: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The entries of ``leftᵀ right`` (left N×a, right N×b) at the CSR ``mask``'s pattern, in
        its order (SDDMM): N·k multiply-adds instead of N·a·b. Reads both factors contiguous along
        N (``rotate(..., n_major=True)``, or a partner's ``linear(..., n_major=True)``);
        otherwise the kernel copies them."""
        return torch.sparse.sampled_addmm(mask, left.T, right, beta=0.0).values()

    @staticmethod
    def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``t.flatten()[index]`` (index_select: an int32 index is read without a copy)."""
        return t.reshape(-1).index_select(0, index)

    @staticmethod
    def scatter(t: torch.Tensor, index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``t.flatten()[index] = update`` in place (t contiguous), returning t (index_put_: an
        int32 index is read without a copy, where index_copy_ takes int64 only)."""
        t.view(-1).index_put_((index,), update)
        return t

    @staticmethod
    def scatter_add(t: torch.Tensor, dim: int, index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """``t[..., index] += update`` along ``dim``, in place (keeps t's layout)."""
        return t.index_add_(dim, index, update)

    @staticmethod
    def linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, n_major: bool = False) -> torch.Tensor:
        """``F.linear(x, W, bias)``; ``n_major``: laid out column-major over the tokens, computed as
        ``(W xᵀ + b)ᵀ`` by the same product (a view of shape …×m); elementwise ops between two
        layers keep the layout."""
        if not n_major:
            return torch.nn.functional.linear(x, W, bias)
        x2 = x.reshape(-1, x.shape[-1])
        out = W @ x2.T if bias is None else torch.addmm(bias.unsqueeze(1), W, x2.T)
        return out.T.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def run_products(wide: torch.Tensor, directions: torch.Tensor, segments: list[tuple[int, int]], run: int) -> torch.Tensor:
        """Per run of ``run`` wide rows, its activations (N×run of ``wide``) times its c
        rotated directions (N×c of ``directions``), flattened run by run, row by row: one batched
        product per segment of equal c (``segments``: (runs, c))."""
        N = wide.shape[0]
        blocks, row, col = [], 0, 0
        for G, c in segments:
            left = wide[:, row:row + G * run].reshape(N, G, run).permute(1, 2, 0)   # G×r×N
            right = directions[:, col:col + G * c].reshape(N, G, c).permute(1, 0, 2)  # G×N×c
            blocks.append(torch.bmm(left, right).reshape(-1))
            row, col = row + G * run, col + G * c
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]


REFERENCE = TorchKernels()
_BACKENDS: dict[str, TorchKernels] = {}
# where nothing is registered: on a GPU the value gradient's path is timed, not counted
_DEVICE_DEFAULTS: dict[str, TorchKernels] = {"cuda": TorchKernels(measure_paths=True)}


def register_kernels(device_type: str, kernels: TorchKernels) -> None:
    """Use ``kernels`` for tensors on ``device_type`` ("cuda", "cpu", ...)."""
    _BACKENDS[device_type] = kernels


def autocast_dtype_of(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes in on ``device_type``, None where it is off or the type has no
    autocast (``meta``, where a split model's placement is tested). A plain comparison, not
    ``torch.amp.is_autocast_available``: torch 2.11's Dynamo breaks the graph on that call."""
    if device_type != "meta" and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str):
    """A block with autocast off on ``device_type`` (nothing to turn off on ``meta``)."""
    return torch.autocast(device_type, enabled=False) if device_type != "meta" else nullcontext()


def kernels_for(device: torch.device | str) -> TorchKernels:
    """The kernels registered for ``device``'s type, else its default: the torch reference, on
    CUDA with ``measure_paths``."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _BACKENDS.get(kind) or _DEVICE_DEFAULTS.get(kind, REFERENCE)


@contextmanager
def use_kernels(device_type: str, kernels: TorchKernels) -> Iterator[TorchKernels]:
    """``kernels`` for ``device_type`` inside the block (tests and benchmarks compare backends)."""
    before = _BACKENDS.get(device_type)
    register_kernels(device_type, kernels)
    try:
        yield kernels
    finally:
        if before is None:
            _BACKENDS.pop(device_type, None)
        else:
            _BACKENDS[device_type] = before


__all__ = ["GRAD_PATHS", "MIRRORED_PATH", "REFERENCE", "SAMPLED", "TorchKernels", "autocast_dtype_of", "autocast_off", "block_bounds", "cheapest_path", "grad_costs",
           "identity_costs", "is_n_major", "kernels_for", "lowrank_product", "merge_cost", "one_sided_costs", "register_kernels",
           "rotated_costs", "rotation_cost", "sparse_products_in", "sparse_side", "use_kernels"]
