"""The arithmetic of a sparse update in a basis: the one place for the forward/backward formulas,
their cost model and the choice of bracketing.

A layer ``y = x W0ᵀ + b`` (W0 is m×n) trains ``W = W0 + P_R D Q_Cᵀ``, where P_R (m×a) and Q_C
(n×b) are the basis columns the support touches and D (a×b) holds the trained entries (zero
elsewhere). With g = ∂L/∂y (N×m) and x the input (N×n):

    forward          y   = x W0ᵀ + b + x Q_C Dᵀ P_Rᵀ
    input gradient   ∂x  = g W0 + g P_R D Q_Cᵀ
    value gradient   ∂D  = P_Rᵀ gᵀ x Q_C                      (only its support entries are kept)

The update is applied either *merged* (ΔW = P_R D Q_Cᵀ formed once, ``merge_cost``
multiply-adds, independent of N) or *factored* (through x Q_C and g P_R, linear in N). The
value gradient has four bracketings (``GRAD_PATHS``), costed in ``grad_costs``:

    activations   (g P_R)ᵀ (x Q_C)          N·(m·a + n·b + a·b)
    weights       P_Rᵀ (gᵀ x) Q_C           N·m·n + the cheaper side of the rotation
    output-side   ((g P_R)ᵀ x) Q_C          N·(m·a + a·n) + a·n·b
    input-side    P_Rᵀ (gᵀ (x Q_C))         N·(n·b + m·b) + a·m·b

With identity bases (MeProp, SHiRA-like supports) P_R and Q_C select rows and columns, so the
rotations cost nothing (``identity_costs``). ``SparseUpdate`` is the autograd function that runs a
whole adapted layer, saving only x, so no m×n tensor outlives a call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .targets import weight_of

if TYPE_CHECKING:  # pragma: no cover
    from .layer import SparseLinear

GRAD_PATHS = ("activations", "weights", "output-side", "input-side")
SAMPLED = "sampled"  # fixed supports: (g P_R)ᵀ (x Q_C) at the k support entries only (SDDMM)


def lowrank_product(P_R: torch.Tensor, D: torch.Tensor, Q_C: torch.Tensor) -> torch.Tensor:
    """``P_R D Q_Cᵀ`` (m×n) in the cheaper bracketing: min(m·b·(a+n), a·n·(b+m)) multiply-adds."""
    m, (a, b), n = P_R.shape[0], D.shape, Q_C.shape[0]
    if m * a * b + m * b * n <= a * b * n + m * a * n:
        return (P_R @ D) @ Q_C.T
    return P_R @ (D @ Q_C.T)


def merge_cost(m: int, n: int, a: int, b: int, k: int | None = None) -> int:
    """Multiply-adds of forming ``P_R D Q_Cᵀ`` (m×n) from an a×b D; with ``k`` (D's non-zeros,
    a fixed support) from the sparse D: ``(P_R D)`` costs m·k instead of m·a·b."""
    k = a * b if k is None else min(k, a * b)
    return min(m * k + m * b * n, k * n + m * a * n)


def sparse_side(m: int, n: int, a: int, b: int, k: int) -> str:
    """Which factor a k-entry D multiplies first in ``P_R D Q_Cᵀ``: "P" ((P_R D) Q_Cᵀ, m·k + m·b·n)
    or "Q" (P_R (D Q_Cᵀ), k·n + m·a·n)."""
    return "P" if m * k + m * b * n <= k * n + m * a * n else "Q"


def sparse_lowrank_product(P_R: torch.Tensor, D: torch.Tensor, Q_C: torch.Tensor, side: str,
                           base: torch.Tensor | None = None) -> torch.Tensor:
    """``P_R D Q_Cᵀ`` (m×n) for a sparse CSR ``D``: given as Dᵀ (b×a) when ``side`` is "P" (its
    product with P_Rᵀ is then a sparse×dense product, torch.sparse.mm), as D (a×b) when "Q".
    With ``base`` (m×n, the bases' dtype): ``base + P_R D Q_Cᵀ``, the addition fused into the
    dense product (torch.addmm), so no m×n temporary is formed."""
    # sparse×dense kernels take float32/float64 only (no CPU bf16/fp16): the sparse product runs
    # in float32 for half-precision bases, the dense one in the bases' dtype
    wide = torch.promote_types(P_R.dtype, torch.float32)
    D = D.to(wide)
    if side == "P":
        left, right = torch.sparse.mm(D, P_R.T.to(wide)).T.to(P_R.dtype), Q_C.T
    else:
        left, right = P_R, torch.sparse.mm(D, Q_C.T.to(wide)).to(Q_C.dtype)
    return left @ right if base is None else torch.addmm(base, left, right)


def rotation_cost(N: int, size: int, used: int, blocks: int = 1) -> int:
    """Multiply-adds of N activations times ``used`` columns of a size×size basis; a
    block-diagonal basis taken whole (``used == size``) costs 1/blocks of the dense product."""
    return N * size * used // blocks if used == size else N * size * used


def grad_costs(N: int, m: int, n: int, a: int, b: int, k: int | None = None, blocks: int = 1) -> dict[str, int]:
    """Multiply-adds of the four bracketings of ``P_aᵀ gᵀ x Q_b`` (g: N×m, x: N×n), and with ``k``
    (a fixed support's entries) the ``sampled`` one: the activations' product formed at the k
    support entries only (SDDMM, ``torch.sparse.sampled_addmm``). ``blocks``: block-diagonal
    bases, applied block by block on the activations' paths."""
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
    """One training step's adapted multiply-adds in a rotated basis (frozen x W0ᵀ, g W0 not
    counted): ``merge`` (from a k-entry D when ``k`` is given) and ``factored`` (each of forward
    and input gradient), and the four value-gradient bracketings."""
    return {"merge": merge_cost(m, n, a, b, k), "factored": tokens * (n * b + a * b + a * m), **grad_costs(tokens, m, n, a, b, k, blocks)}


def identity_costs(tokens: int, m: int, n: int, a: int, b: int, k: int | None = None) -> dict[str, int]:
    """As :func:`rotated_costs` for identity bases: selecting rows/columns costs nothing."""
    costs = {"merge": 0, "factored": tokens * a * b, "activations": tokens * a * b,
             "weights": tokens * m * n, "output-side": tokens * a * n, "input-side": tokens * m * b}
    if k is not None:
        costs[SAMPLED] = tokens * k
    return costs


def one_sided_costs(tokens: int, m: int, n: int, a: int, b: int, k: int | None, identity_side: str,
                    blocks: int = 1) -> dict[str, int]:
    """As :func:`rotated_costs` with one side the identity (``OneSidedBasis``). With P = I the
    update is rows R of W (``D Q_Cᵀ``): the m·a rotation of g disappears, and the N·m·a term with
    it, which at an MLP's wide side is the dearest part of the rotated update; Q = I mirrors it."""
    N = tokens
    kk = a * b if k is None else min(k, a * b)
    if identity_side == "P":  # rotated side Q (n×b)
        rot = rotation_cost(N, n, b, blocks)  # block by block on the activations' paths
        act = rot + N * a * b
        costs = {"merge": kk * n, "factored": N * (n * b + a * b), "activations": act, "input-side": act,
                 "output-side": N * a * n + a * n * b, "weights": N * m * n + a * n * b}
    else:  # rotated side P (m×a)
        rot = rotation_cost(N, m, a, blocks)
        act = rot + N * a * b
        costs = {"merge": kk * m, "factored": N * (m * a + a * b), "activations": act, "output-side": act,
                 "input-side": N * m * b + a * m * b, "weights": N * m * n + a * m * b}
    if k is not None:
        costs[SAMPLED] = rot + N * k
    return costs


def cheapest_path(costs: dict[str, int]) -> str:
    """The value-gradient bracketing (``GRAD_PATHS``, and ``SAMPLED`` where costed) with the
    fewest multiply-adds."""
    return min((p for p in (*GRAD_PATHS, SAMPLED) if p in costs), key=costs.__getitem__)


def sddmm_supported(x: torch.Tensor) -> bool:
    """Whether torch's SDDMM (``torch.sparse.sampled_addmm``) takes activations like ``x``: it has
    float32/float64 kernels only, so half precision (and autocast) use a dense product instead."""
    return x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type)


def is_n_major(t: torch.Tensor) -> bool:
    """Whether ``t`` (…×features, N tokens) lies column-major over its tokens: each feature's
    N values contiguous, as :func:`linear_n_major` returns them (no copy made to find out). For a
    matrix: stored transposed, as a re-laid W0 is (``targets.store_weight``)."""
    if t.dim() < 2 or t.shape[-1] < 2 or t.numel() // t.shape[-1] < 2:
        return False  # one token or one feature: both layouts coincide
    return t.movedim(-1, 0).is_contiguous()


def linear_n_major(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with the output laid out column-major over the tokens, computed
    as ``(W xᵀ + b)ᵀ`` by the same matrix product (a view of shape …×m). A sampled product
    (SDDMM) reads an identity side's activations this way; handing them on so saves its
    transposing copy of an N×wide tensor, and elementwise ops in between keep the layout."""
    x2 = x.reshape(-1, x.shape[-1])
    out = W @ x2.T if bias is None else torch.addmm(bias.unsqueeze(1), W, x2.T)
    return out.T.view(*x.shape[:-1], W.shape[0])


class SparseUpdate(torch.autograd.Function):
    """y = x (W0 + ΔW)ᵀ + b with ∂L/∂param computed in the basis, never via autograd of ΔW.

    The layer supplies the three formulas above (``_forward_no_grad``, ``_input_grad``,
    ``_param_grad``); this function only routes dtypes and saved tensors."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, layer: "SparseLinear") -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x, param)  # param: autograd's version check (no in-place edits between)
        # Remember the autocast state, as torch.amp.custom_fwd does: backward runs outside it.
        device = x.device.type
        ctx.autocast = torch.is_autocast_enabled(device)
        ctx.autocast_dtype = torch.get_autocast_dtype(device) if ctx.autocast else None
        # A layer wider in its outputs hands them on column-major over the tokens, the layout the
        # next layer's SDDMM reads (linear_n_major). Not where no SDDMM runs: there the layout
        # only cost time (docs/performance.md).
        n_major = layer.hand_off_n_major and layer.m > layer.n and x.dim() >= 2 and sddmm_supported(x)
        return layer._forward_no_grad(x, n_major=n_major)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, param = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        if ctx.autocast:
            # Mixed precision: the backward matmuls run in the autocast dtype, as the forward's
            # did (torch.amp.custom_bwd); the trained values and their gradient stay float32.
            with torch.autocast(x.device.type, dtype=ctx.autocast_dtype):
                return SparseUpdate._grads(ctx, layer, grad_y, x, param)
        # Without autocast, compute in the widest of grad, input and weight dtypes (the engine
        # casts grad_x back to x's dtype).
        dtype = torch.promote_types(torch.promote_types(grad_y.dtype, x.dtype), weight_of(layer.base_layer).dtype)
        return SparseUpdate._grads(ctx, layer, grad_y.to(dtype), x.to(dtype), param)

    @staticmethod
    def _grads(ctx, layer: "SparseLinear", grad_y: torch.Tensor, x: torch.Tensor, param: torch.Tensor):
        # the input's gradient in the input's layout (token-column-major from a wide partner)
        grad_x = layer._input_grad(grad_y, n_major=is_n_major(x)) if ctx.needs_input_grad[0] else None
        grad_param = None
        if ctx.needs_input_grad[1]:
            grad_param = layer._param_grad(grad_y.reshape(-1, layer.m), x.reshape(-1, layer.n)).to(param.dtype)
        return grad_x, grad_param, None


__all__ = ["GRAD_PATHS", "SAMPLED", "SparseUpdate", "cheapest_path", "grad_costs", "identity_costs", "is_n_major", "linear_n_major", "lowrank_product", "merge_cost", "one_sided_costs", "rotated_costs",
           "sddmm_supported", "sparse_lowrank_product", "sparse_side"]
