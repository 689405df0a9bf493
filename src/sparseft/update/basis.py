"""Bases: which sides of a layer the update is rotated on, and the products that follow.

A layer ``y = x W0ᵀ + b`` (W0 m×n) trains ``W = W0 + P_R D Q_Cᵀ``: P_R (m×a) and Q_C (n×b) are
the columns of its basis pair that the support's rows R and columns C touch, D (a×b) the trained
entries. A basis applies P_R D Q_Cᵀ and its transposes; one class per kind:

- :class:`RotatedBasis`: P and Q both rotated (the SparseGrad paper's);
- :class:`InputRotatedBasis`: Q rotated, P = I: the update fills the rows R of W with D Q_Cᵀ
  (the default for a layer wider in its outputs, m > n);
- :class:`OutputRotatedBasis`: P rotated, Q = I: the columns C of W get P_R D (m ≤ n). It is the
  input-rotated basis of the transposed layer, and computes as that;
- :class:`IdentityBasis`: P = Q = I, so R and C select rows and columns of W (MeProp).

A rotated side may be block-diagonal (``blocks``). The tensors live in a
:class:`~sparseft.update.bank.BasisBank` shared by a layer group; a basis object is plain data
(bank, group, blocks). Every product goes through the device's kernels (``kn``,
:mod:`sparseft.update.kernels`). :func:`make_basis` picks the class from a config's ``rotation``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ..errors import ConfigError
from .bank import BasisBank
from .kernels import (GRAD_PATHS, MIRRORED_PATH, Index, TorchKernels, identity_costs, is_n_major, one_sided_costs, rotated_costs,
                      sparse_products_in, sparse_side)


def take(t: torch.Tensor, dim: int, idx: Index) -> torch.Tensor:
    """``t`` restricted to ``idx`` along ``dim`` (index_select for indices: no advanced-index copy)."""
    if isinstance(idx, slice):
        return t[(slice(None),) * (dim % t.dim()) + (idx,)]
    return t.index_select(dim, idx)


def arange(idx: Index, size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device)[idx] if isinstance(idx, slice) else idx


def _scatter(part: torch.Tensor, idx: Index, size: int) -> torch.Tensor:
    """A zero matrix with ``part`` at the rows ``idx`` of ``size`` (``part`` itself when ``idx``
    is all of them, the usual case of a random support), in ``part``'s layout."""
    if isinstance(idx, slice) and idx == slice(0, size):
        return part
    shape = (size, part.shape[1])
    out = part.new_zeros(shape[::-1]).T if is_n_major(part) else part.new_zeros(shape)
    if isinstance(idx, slice):
        out.narrow(0, idx.start, idx.stop - idx.start).copy_(part)
        return out
    return out.index_copy_(0, idx, part)  # (in place: keeps out's layout)


class Basis(Protocol):
    """What a layer asks of its basis (R, C: the support's rows and columns, ``kn``: kernels)."""

    label: str
    blocks: int
    rotated_parts: tuple[str, ...]  # the bank's sides this basis reads ("P", "Q")

    def matrix(self, side: str, idx: Index, size: int, device: torch.device | None = None) -> torch.Tensor: ...  # P[:, idx] or Q[:, idx], dense, on device
    def version(self) -> tuple: ...  # changes whenever the basis tensors change
    def delta_weight(self, D: torch.Tensor, rows: Index, cols: Index, m: int, n: int, column_major: bool = False) -> torch.Tensor: ...
    def add_update(self, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index, kn: TorchKernels) -> torch.Tensor: ...
    def add_input_grad(self, gx: torch.Tensor, g: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index, kn: TorchKernels) -> torch.Tensor: ...
    def rotate(self, G: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor: ...
    def value_grad(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index, path: str, kn: TorchKernels) -> torch.Tensor: ...
    def sampled_factors(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index, kn: TorchKernels) -> tuple[torch.Tensor, torch.Tensor]: ...
    def merge_into(self, W0: torch.Tensor, support, values: torch.Tensor, kn: TorchKernels,
                   dtype: torch.dtype | None = None) -> torch.Tensor: ...  # W0 + ΔW, in dtype (default W0's)
    def costs(self, tokens: int, m: int, n: int, a: int, b: int, k: int | None = None) -> dict[str, int]: ...
    def base_layout(self) -> bool | None: ...  # W0 stored transposed (True), row-major (False), or as given (None)


class RotatedBasis:
    """P and Q both rotated, read from the group's pair in ``bank``: ``W = W0 + P_R D Q_Cᵀ``."""

    rotated_parts = ("P", "Q")
    label = "rotated"

    def __init__(self, bank: BasisBank, group: str, blocks: int = 1) -> None:
        self.bank, self.group, self.blocks = bank, group, blocks

    def matrix(self, side: str, idx: Index, size: int, device: torch.device | None = None) -> torch.Tensor:
        return self.bank.columns(self.group, side, idx, device)

    def version(self) -> tuple:
        return self.bank.version(self.group)

    def base_layout(self) -> bool | None:
        return None

    def delta_weight(self, D: torch.Tensor, rows: Index, cols: Index, m: int, n: int, column_major: bool = False) -> torch.Tensor:
        """ΔW = P_R D Q_Cᵀ (m×n), differentiable in D; ``column_major``: laid out as a transposed
        W0 is (formed as (Q_C Dᵀ P_Rᵀ)ᵀ), so that W0 + ΔW adds two tensors of one layout."""
        P_R, Q_C = self.matrix("P", rows, m, D.device), self.matrix("Q", cols, n, D.device)
        if column_major:
            return TorchKernels.lowrank_product(Q_C, D.T.to(Q_C.dtype), P_R).T
        return TorchKernels.lowrank_product(P_R, D.to(P_R.dtype), Q_C)

    def add_update(self, y, x, D, rows, cols, kn):
        """y + x Q_C Dᵀ P_Rᵀ (the factored forward)."""
        dt = x.dtype
        Q_C, P_R = self.matrix("Q", cols, 0, x.device), self.matrix("P", rows, 0, x.device)
        return y + kn.linear(kn.linear(kn.linear(x, Q_C.T.to(dt), None), D, None), P_R.to(dt), None)

    def add_input_grad(self, gx, g, D, rows, cols, kn):
        """gx + g P_R D Q_Cᵀ (the factored input gradient)."""
        dt = g.dtype
        return gx + ((g @ self.matrix("P", rows, 0, g.device).to(dt)) @ D) @ self.matrix("Q", cols, 0, g.device).T.to(dt)

    def rotate(self, G: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        """P_Rᵀ G Q_C in float32 (calibration scores)."""
        return self.matrix("P", rows, 0, G.device).float().T @ G.float() @ self.matrix("Q", cols, 0, G.device).float()

    def sampled_factors(self, g, x, rows, cols, kn):
        """(g P_R, x Q_C), column-major over the tokens: the value gradient is their product's
        support entries (``SAMPLED``)."""
        return (kn.rotate(g, self.matrix("P", rows, 0, g.device), rows, self.blocks, n_major=True),
                kn.rotate(x, self.matrix("Q", cols, 0, x.device), cols, self.blocks, n_major=True))

    def value_grad(self, g, x, rows, cols, path, kn):
        """P_Rᵀ gᵀ x Q_C by the bracketing ``path`` (one of ``GRAD_PATHS``)."""
        if path == "activations":  # the block-aware products
            left, right = self.sampled_factors(g, x, rows, cols, kn)
            return left.T @ right
        dt = x.dtype
        P_R, Q_C = self.matrix("P", rows, 0, x.device).to(dt), self.matrix("Q", cols, 0, x.device).to(dt)
        if path == "weights":
            return kn.lowrank_product(P_R.T, g.T @ x, Q_C.T)
        if path == "output-side":
            return ((g @ P_R).T @ x) @ Q_C
        assert path == GRAD_PATHS[3], path
        return P_R.T @ (g.T @ (x @ Q_C))

    def merge_into(self, W0, support, values, kn, dtype=None):
        """W0 + ΔW from the k-entry sparse D, the addition fused into the last dense product when
        W0 has the bases' dtype; cast to ``dtype`` last."""
        rows, cols = support.index()
        a, b = support.shape()
        side = sparse_side(W0.shape[0], W0.shape[1], a, b, support.k)
        D = support.csr(values, side, kn)
        P_R, Q_C = self.matrix("P", rows, 0, W0.device), self.matrix("Q", cols, 0, W0.device)
        if W0.dtype != P_R.dtype:
            return (W0 + kn.merge(P_R, D, Q_C, side).to(W0.dtype)).to(dtype or W0.dtype)
        return kn.merge(P_R, D, Q_C, side, base=W0).to(dtype or W0.dtype)

    def costs(self, tokens, m, n, a, b, k=None):
        return rotated_costs(tokens, m, n, a, b, k, self.blocks)


class InputRotatedBasis:
    """Q rotated, P = I: ``W = W0 + I_R D Q_Cᵀ``, the rows R of W get D Q_Cᵀ. The bank holds the
    rotated side only."""

    identity_side, rotated_side = "P", "Q"

    def __init__(self, bank: BasisBank, group: str, identity_size: int, blocks: int = 1) -> None:
        self.bank, self.group, self.blocks = bank, group, blocks
        self.identity_size = identity_size  # the rows of W (the columns, for the transposed layer)
        self.rotated_parts = (self.rotated_side,)
        self.label = f"{self.rotated_side}-rotated"

    def columns(self, idx: Index, device: torch.device | None = None) -> torch.Tensor:
        """Columns ``idx`` of the rotated side's basis (on ``device``: the bank's by default)."""
        return self.bank.columns(self.group, self.rotated_side, idx, device)

    def matrix(self, side: str, idx: Index, size: int, device: torch.device | None = None) -> torch.Tensor:
        if side == "P":
            return torch.eye(size, device=device if device is not None else self.bank._anchor.device)[:, idx]
        return self.columns(idx, device)

    def version(self) -> tuple:
        return self.bank.version(self.group)

    def base_layout(self) -> bool | None:
        return False  # the fused merge writes W0 + ΔW row-major

    def delta_weight(self, D, rows, cols, m, n, column_major=False):
        Q_C = self.columns(cols, D.device)
        part = (Q_C @ D.T.to(Q_C.dtype)).T if column_major else D.to(Q_C.dtype) @ Q_C.T
        return _scatter(part, rows, m)

    def add_update(self, y, x, D, rows, cols, kn):
        upd = kn.linear(kn.linear(x, self.columns(cols, x.device).T.to(x.dtype), None), D, None)
        return kn.scatter_add(y, -1, arange(rows, y.shape[-1], y.device), upd)

    def add_input_grad(self, gx, g, D, rows, cols, kn):
        return gx + (take(g, -1, rows) @ D) @ self.columns(cols, g.device).T.to(g.dtype)

    def rotate(self, G, rows, cols):
        return take(G, 0, rows).float() @ self.columns(cols, G.device).float()

    def sampled_factors(self, g, x, rows, cols, kn):
        return take(g, 1, rows), kn.rotate(x, self.columns(cols, x.device), cols, self.blocks, n_major=True)

    def value_grad(self, g, x, rows, cols, path, kn):
        """The basis applied to the activations ("activations", "input-side"), or after the
        selected rows' product with x ("weights" forms gᵀ x whole first)."""
        if path in ("activations", "input-side"):
            left, right = InputRotatedBasis.sampled_factors(self, g, x, rows, cols, kn)  # (not the mirror's)
            return left.T @ right
        gx = take(g.T @ x, 0, rows) if path == "weights" else take(g, 1, rows).T @ x
        return gx @ self.columns(cols, x.device).to(x.dtype)

    def merge_into(self, W0, support, values, kn, dtype=None):
        """W0 + ΔW, cast to ``dtype`` last. When the update covers every row (a random support
        does), and W0 and the basis share a dtype the device multiplies sparse matrices in
        (float32; bf16/fp16 on a GPU), one sparse×dense product takes W0 as its addend: no m×n
        temporary and no addition across layouts (docs/performance.md)."""
        rows, cols = support.index()
        D = support.csr(values, self._csr_side, kn)
        B = self.columns(cols, W0.device)
        if (W0.dtype == B.dtype and sparse_products_in(W0.dtype, W0.device) and isinstance(rows, slice)
                and rows == slice(0, self.identity_size)):
            return kn.sparse_dense(D, B.T, base=W0).to(dtype or W0.dtype)
        return (W0 + _scatter(kn.sparse_dense(D, B.T), rows, self.identity_size).to(W0.dtype)).to(dtype or W0.dtype)

    _csr_side = "Q"  # the CSR holds D (a×b) and multiplies the rotated side

    def costs(self, tokens, m, n, a, b, k=None):
        return one_sided_costs(tokens, m, n, a, b, k, self.identity_side, self.blocks)


class OutputRotatedBasis(InputRotatedBasis):
    """P rotated, Q = I: ``W = W0 + P_R D I_Cᵀ``, the columns C of W get P_R D. Its transpose
    ``Wᵀ = W0ᵀ + I_C Dᵀ P_Rᵀ`` is an input-rotated layer (rows ↔ columns, g ↔ x, D ↔ Dᵀ), so
    every product is the input-rotated one of the transposed problem."""

    identity_side, rotated_side = "Q", "P"
    _csr_side = "P"  # the CSR holds Dᵀ: the input-rotated basis' D of the transposed layer

    def matrix(self, side, idx, size, device=None):
        return super().matrix("Q" if side == "P" else "P", idx, size, device)

    def base_layout(self):
        return True  # the fused merge writes (W0 + ΔW)ᵀ row-major

    def delta_weight(self, D, rows, cols, m, n, column_major=False):
        return super().delta_weight(D.T, cols, rows, n, m, column_major=not column_major).T

    def add_update(self, y, x, D, rows, cols, kn):
        return super().add_input_grad(y, x, D.T, cols, rows, kn)

    def add_input_grad(self, gx, g, D, rows, cols, kn):
        return super().add_update(gx, g, D.T, cols, rows, kn)

    def rotate(self, G, rows, cols):
        return super().rotate(G.T, cols, rows).T

    def sampled_factors(self, g, x, rows, cols, kn):
        right, left = super().sampled_factors(x, g, cols, rows, kn)
        return left, right

    def value_grad(self, g, x, rows, cols, path, kn):
        return super().value_grad(x, g, cols, rows, MIRRORED_PATH.get(path, path), kn).T

    def merge_into(self, W0, support, values, kn, dtype=None):
        return super().merge_into(W0.T, _Transposed(support), values, kn, dtype).T


class _Transposed:
    """A support read as the transposed layer's (rows ↔ columns); the CSR is asked as before."""

    def __init__(self, support) -> None:
        self.support = support

    def index(self):
        rows, cols = self.support.index()
        return cols, rows

    def csr(self, values, side, kn):
        return self.support.csr(values, side, kn)


class IdentityBasis:
    """P = Q = I: the support's rows and columns are rows and columns of W itself."""

    blocks = 1
    rotated_parts: tuple[str, ...] = ()
    label = "identity"

    @staticmethod
    def matrix(side: str, idx: Index, size: int, device: torch.device | None = None) -> torch.Tensor:
        return torch.eye(size, device=device)[:, idx]

    def version(self) -> tuple:
        return ()

    def base_layout(self):
        return None

    def delta_weight(self, D, rows, cols, m, n, column_major=False):
        out = D.new_zeros(n, m).T if column_major else D.new_zeros(m, n)
        if isinstance(rows, slice) and isinstance(cols, slice):
            out[rows, cols] = D
        else:
            out[arange(rows, m, D.device).unsqueeze(1), arange(cols, n, D.device)] = D
        return out

    def add_update(self, y, x, D, rows, cols, kn):
        upd = kn.linear(take(x, -1, cols), D, None)
        return kn.scatter_add(y, -1, arange(rows, y.shape[-1], y.device)[: upd.shape[-1]], upd)

    def add_input_grad(self, gx, g, D, rows, cols, kn):
        upd = take(g, -1, rows) @ D
        return kn.scatter_add(gx, -1, arange(cols, gx.shape[-1], gx.device)[: upd.shape[-1]], upd)

    def rotate(self, G, rows, cols):
        return take(take(G, 0, rows), 1, cols).float()

    def value_grad(self, g, x, rows, cols, path, kn):
        return take(g, 1, rows).T @ take(x, 1, cols)

    def sampled_factors(self, g, x, rows, cols, kn):
        return take(g, 1, rows), take(x, 1, cols)

    def merge_into(self, W0, support, values, kn, dtype=None):
        """The values added at their entries of W (a fresh row-major copy of W0). In a narrower
        ``dtype`` (the product's, under autocast): W0 cast once, and its k entries of the support
        summed with the values in W0's precision, then cast and written in. The same numbers as
        casting the whole W0 + ΔW, without the m×n copy in W0's precision (docs/performance.md)."""
        flat = support.flat_index(W0.shape[1])
        if dtype is None or dtype == W0.dtype or not W0.is_contiguous():
            merged = W0.clone(memory_format=torch.contiguous_format)
            kn.scatter_add(merged.view(-1), 0, flat, values.to(W0.dtype))
            return merged.to(dtype or W0.dtype)
        summed = kn.gather(W0, flat) + values.to(W0.dtype)
        return kn.scatter(W0.to(dtype), flat, summed.to(dtype))

    @staticmethod
    def costs(tokens, m, n, a, b, k=None):
        return identity_costs(tokens, m, n, a, b, k)


BasisBuilder = Callable[[BasisBank, str, int, int, int], Basis]  # (bank, group, m, n, blocks) -> basis


def _narrow(bank: BasisBank, group: str, m: int, n: int, blocks: int) -> Basis:
    """The narrow side rotated; the wide side (the larger of m and n) stays the identity."""
    return InputRotatedBasis(bank, group, m, blocks) if m > n else OutputRotatedBasis(bank, group, n, blocks)


BASES: dict[str, BasisBuilder] = {
    "both": lambda bank, group, m, n, blocks: RotatedBasis(bank, group, blocks),
    "narrow": _narrow,
    "none": lambda bank, group, m, n, blocks: IdentityBasis(),
}


def register_basis(name: str, build: BasisBuilder) -> BasisBuilder:
    """Make ``build(bank, group, m, n, blocks)`` the basis of ``SparseConfig.rotation=name``. A
    basis whose ``rotated_parts`` is empty gets nothing from calibration (it owns its tensors)."""
    BASES[name] = build
    return build


def make_basis(rotation: str, bank: BasisBank, group: str, m: int, n: int, blocks: int = 1) -> Basis:
    """The basis of an m×n layer for a config's ``rotation`` (``BASES``)."""
    if rotation not in BASES:
        raise ConfigError(f"rotation={rotation!r} is not known; use one of {sorted(BASES)} (or register_basis() your own).")
    return BASES[rotation](bank, group, m, n, blocks)


__all__ = ["BASES", "Basis", "IdentityBasis", "InputRotatedBasis", "OutputRotatedBasis", "RotatedBasis", "make_basis", "register_basis"]
