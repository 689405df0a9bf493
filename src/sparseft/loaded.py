"""The updates of adapters loaded for inference (``BaseTuner.load_adapter``), each layer's kept
in a compact form that computes ``x ΔWᵀ``:

- :class:`LowRankUpdate`: ΔW = B A, from any method's ``lora_factors()`` (S2FT, or a method
  without a sparse form);
- :class:`SparseFactors`: a SparseGrad/MeProp update in its own form, ``ΔW = P_R D Q_Cᵀ`` with D
  the k trained entries (CSR: values, int16 column indices where they fit, row pointers) and P_R, Q_C references to the basis
  columns, or row/column indices where a side is the identity. Kept as B·A, a one-sided update
  of rank ~300 cost 38× a LoRA r=8 adapter's memory; in this form it costs its k values and
  indices, plus bases that adapters sharing them (bases from the weights, or from one bases
  file) hold once.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .update.kernels import sparse_products_in


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class LowRankUpdate(nn.Module):
    """A loaded adapter's update of one layer, for inference: ΔW = B A (B: m×r, A: r×n) from the
    layer's ``lora_factors()``, so ``y = x Aᵀ Bᵀ`` costs r(m+n) per token and r(m+n) numbers of
    memory; where r(m+n) ≥ mn the dense ΔW is smaller and is kept instead (``A`` None). The
    tensors are non-persistent buffers: they follow ``.to()`` but stay out of ``state_dict``."""

    def __init__(self, B: torch.Tensor, A: torch.Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        (m, r), n = B.shape, A.shape[1]
        dense = r * (m + n) >= m * n
        self.register_buffer("B", ((B @ A) if dense else B).to(dtype).contiguous(), persistent=False)
        self.register_buffer("A", None if dense else A.to(dtype).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.B.dtype)
        return F.linear(x if self.A is None else F.linear(x, self.A), self.B)

    def delta_weight(self) -> torch.Tensor:
        return self.B if self.A is None else self.B @ self.A

    def basis_tensors(self) -> list[torch.Tensor]:
        return []

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.B, self.A) if t is not None)


class SparseFactors(nn.Module):
    """``ΔW = P_R D Q_Cᵀ`` of an m×n layer: D (a×b) as CSR (``crow``, ``col``, ``values``); the
    input side ``Q`` (n×b columns of a basis) or, where it is the identity, the input columns
    ``cols`` (None: all n); the output side ``P`` (m×a) or the output rows ``rows`` (None: all m).
    ``y = x ΔWᵀ`` costs N·(n·b + k + a·m) (a rotated side) or N·k (an identity side)."""

    def __init__(self, m: int, n: int, D: torch.Tensor, *, P: torch.Tensor | None = None, Q: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None, cols: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.m, self.n = m, n
        with warnings.catch_warnings():  # ("Sparse CSR tensor support is in beta": the ops used here are tested)
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            D = D.detach().to(dtype).to_sparse_csr()
        self.index_dtype = torch.int32 if max(D.shape) < 2**31 and D.values().numel() < 2**31 else torch.int64
        # a column index is below b (the model width for a one-sided update): int16 where it fits,
        # widened per call (torch's CSR takes int32/int64), so an entry costs its value and 2 bytes
        col_dtype = torch.int16 if D.shape[1] <= 2**15 else self.index_dtype
        self.shape = tuple(D.shape)
        for name, value in (("crow", D.crow_indices().to(self.index_dtype)), ("col", D.col_indices().to(col_dtype)),
                            ("values", D.values().clone()),  # (a copy: a view into the CSR tensor cannot be traced)
                            ("P", None if P is None else P.detach().to(dtype)), ("Q", None if Q is None else Q.detach().to(dtype)),
                            ("rows", rows), ("cols", cols)):
            self.register_buffer(name, value, persistent=False)
        self.owned: set[str] = {"P", "Q"}  # the bases this adapter's memory count includes (see share_bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.n).to(self.values.dtype)
        return self._out(self._product(self._into(flat))).reshape(*lead, self.m)

    def _into(self, flat: torch.Tensor) -> torch.Tensor:
        """The input side: x Q (N×b), or x's columns ``cols``."""
        return flat @ self.Q if self.Q is not None else (flat if self.cols is None else flat.index_select(1, self.cols))

    def _product(self, t: torch.Tensor) -> torch.Tensor:
        """t Dᵀ (N×a): the k entries."""
        if torch.compiler.is_compiling():  # (the same product as an operator: no graph break)
            return _csr_product(self.crow, self.col, self.values, self.shape[0], self.shape[1], t)
        return _csr_times(self.crow, self.col, self.values, self.shape, t)

    def _out(self, u: torch.Tensor) -> torch.Tensor:
        """The output side: u P_Rᵀ (N×m), or u scattered into the rows ``rows``."""
        if self.P is not None:
            return u @ self.P.T
        if self.rows is None:
            return u
        return u.new_zeros(u.shape[0], self.m).index_add_(1, self.rows, u)

    def _side_key(self, side: str) -> tuple | None:
        """What makes two updates' ``side`` ("in"/"out") the same map: the basis tensor itself (its
        storage and view), or the index tensor; None where nothing is shared."""
        t = self.Q if side == "in" else self.P
        if t is None:
            return None
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        eye = torch.eye(self.n, dtype=self.values.dtype, device=self.values.device)
        return self.forward(eye).T  # x ΔWᵀ at x = I

    def basis_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.P, self.Q) if t is not None]

    def share_bases(self, known: list[torch.Tensor], seen: set[int]) -> None:
        """Hold an equal tensor of ``known`` (another adapter's, or the model's own bases) instead
        of an own copy; the memory count includes a basis only where its storage is new to ``seen``."""
        self.owned = set()
        for name in ("P", "Q"):
            mine = getattr(self, name)
            if mine is None:
                continue
            for other in known:
                same_kind = other.shape == mine.shape and other.dtype == mine.dtype and other.device == mine.device
                if other is not mine and same_kind and torch.equal(other, mine):
                    setattr(self, name, other)
                    mine = other
                    break
            if _storage(mine) not in seen:
                seen.add(_storage(mine))
                self.owned.add(name)

    def nbytes(self) -> int:
        """Bytes this update adds: D, the index sides, and the bases it is first to hold."""
        own = [self.crow, self.col, self.values, self.rows, self.cols] + [getattr(self, name) for name in self.owned]
        return sum(t.numel() * t.element_size() for t in own if t is not None)


def _csr_times(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], t: torch.Tensor) -> torch.Tensor:
    """t Dᵀ for the CSR D (a view: t's rows as columns), in t's dtype. ``col`` may be narrower than
    ``crow`` (int16 storage): widened here, as torch's CSR takes int32/int64. In a half precision
    the device has no sparse kernel for (the CPU), the product runs in float32."""
    wide = values.dtype if sparse_products_in(values.dtype, values.device) else torch.float32
    D = torch.sparse_csr_tensor(crow, col.to(crow.dtype), values.to(wide), shape, check_invariants=False)  # (built from a valid CSR)
    return torch.sparse.mm(D, t.T.to(wide)).T.to(t.dtype)


@torch.library.custom_op("sparseft::csr_product", mutates_args=())
def _csr_product(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, a: int, b: int, t: torch.Tensor) -> torch.Tensor:
    """``_csr_times`` as one node of a compiled graph (Dynamo cannot trace a CSR tensor), its
    output contiguous as the fake one is. Inference only: no gradient."""
    return _csr_times(crow, col, values, (a, b), t).contiguous()


@_csr_product.register_fake
def _(crow, col, values, a, b, t):
    return t.new_empty((t.shape[0], a))


@torch.compiler.disable  # (adapters grouped by their bases' storage, which Dynamo cannot key on: run eagerly)
def mixed_delta(x: torch.Tensor, parts: list[tuple[torch.Tensor, SparseFactors]]) -> torch.Tensor:
    """``x ΔW_aᵀ`` for the rows each adapter a has in a mixed batch (``parts``: (row indices,
    update) pairs), as one N×…×m tensor (zero on rows no part names).

    Adapters that hold the same basis (bases from the weights, or from one bases file) share its
    rotation: the rows of all of them are rotated in one product (x Q), and their rotated outputs
    leave through one (u Pᵀ), so a batch of A adapters pays one rotation per side, not A. Only
    the sparse product (k entries each) runs per adapter."""
    lead, n = x.shape[1:-1], x.shape[-1]
    m, dtype = parts[0][1].m, parts[0][1].values.dtype
    per_row = math.prod(lead)  # tokens per batch row
    out = x.new_zeros(x.shape[0] * per_row, m, dtype=dtype)
    tokens = torch.arange(per_row, device=x.device)
    flat_rows = [((rows.to(x.device)[:, None] * per_row + tokens).reshape(-1), f) for rows, f in parts]
    flat = x.reshape(-1, n).to(dtype)
    # the input side: one product per distinct basis, over the rows of every adapter holding it
    inputs: dict[int, torch.Tensor] = {}
    for key, members in _grouped(flat_rows, "in").items():
        if key is None:
            inputs.update({i: f._into(flat.index_select(0, rows)) for i, (rows, f) in members})
            continue
        into = members[0][1][1]._into
        rows = [r for _, (r, _) in members]
        if sum(r.numel() for r in rows) == flat.shape[0]:  # every row (the parts are disjoint): rotate x as it is
            rotated = into(flat)
            inputs.update({i: rotated.index_select(0, r) for (i, _), r in zip(members, rows)})
        else:
            rotated = into(flat.index_select(0, torch.cat(rows))).split([r.numel() for r in rows])
            inputs.update({i: t for (i, _), t in zip(members, rotated)})
    u = {i: f._product(inputs[i]) for i, (_, f) in enumerate(flat_rows)}
    # the output side: one product per distinct basis, over the rows of every adapter holding it
    for key, members in _grouped(flat_rows, "out").items():
        if key is None:
            for i, (rows, f) in members:
                out.index_add_(0, rows, f._out(u[i]))
            continue
        rows = torch.cat([r for _, (r, _) in members])
        out.index_add_(0, rows, members[0][1][1]._out(torch.cat([u[i] for i, _ in members])))
    return out.reshape(*x.shape[:-1], m)


def _grouped(parts: list[tuple[torch.Tensor, SparseFactors]], side: str) -> dict[tuple | None, list]:
    groups: dict[tuple | None, list] = {}
    for i, part in enumerate(parts):
        groups.setdefault(part[1]._side_key(side), []).append((i, part))
    return groups


__all__ = ["LowRankUpdate", "SparseFactors", "mixed_delta"]
