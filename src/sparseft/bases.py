"""The bases an update is trained in: the basis pairs (P, Q) and the two kinds a layer holds.

``BasisBank`` keeps one pair per layer group, shared by the group's layers. It is an
``nn.Module`` so that ``model.to(device)`` moves each basis once (layers only hold a reference to
the bank, never a copy). A basis may be stored whole (m×m) or, after loading a fixed-selection
adapter, as only the columns that adapter uses, with their indices.

A layer holds one of two small basis objects, which apply ``P_R D Q_Cᵀ`` and its transposes for
the rows R and columns C its support touches (formulas and costs: :mod:`sparseft.ops`):

- :class:`RotatedBasis`: SparseGrad's P, Q from the bank (``W = W0 + P_R D Q_Cᵀ``);
- :class:`OneSidedBasis`: one side rotated, the other the identity (``rotation="narrow"``:
  only the layer's narrow side rotates, so the wide side's rotations, the dearest part of the
  update, cost nothing);
- :class:`IdentityBasis`: P = Q = I, so R and C select rows and columns of W (MeProp).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterMismatchError
from .ops import GRAD_PATHS, identity_costs, is_n_major, lowrank_product, one_sided_costs, rotated_costs, sparse_lowrank_product, sparse_side

if TYPE_CHECKING:  # pragma: no cover
    from .support import Grouped

Index = torch.Tensor | slice  # rows/columns of the basis: indices (fixed support) or a leading block


def eigenbasis(gram: torch.Tensor, float64_max: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvectors of a symmetric PSD Gram matrix, sorted by eigenvalue, largest first.

    For ``gram = Σ G Gᵀ`` these are the left singular vectors of the mode unfolding of the
    stacked gradients, i.e. the HOSVD factor of that mode. Computed in float64 up to
    ``float64_max`` (float32 above, where float64 costs too much memory and time); the float64
    solve runs on one CPU thread (:func:`one_thread`).

    Directions whose eigenvalue is below the float32 round-off of the accumulated Gram
    (λ < size·ε₃₂·λ_max) carry no signal: eigh would orient them arbitrarily, differently for
    Grams equal up to round-off (another summation order, another number of processes). They
    are replaced by a deterministic orthonormal completion of the leading ones (QR of
    [V_leading | I], ordered by its energy under the Gram), so Grams equal up to round-off give
    the same span for the noise directions instead of an arbitrary rotation of them.
    """
    dtype = torch.float64 if gram.shape[0] <= float64_max else torch.float32
    # The float64 solve is small, and its threads collapse when another process shares the cores
    # (README, "Threads"): one thread, then restored.
    with one_thread(enabled=dtype == torch.float64 and gram.device.type == "cpu"):
        return _eigenbasis(gram, dtype)


def block_bounds(size: int, blocks: int) -> list[tuple[int, int]]:
    """[start, stop) of ``blocks`` consecutive diagonal blocks of a size×size basis (sizes differ
    by at most one when ``blocks`` does not divide ``size``; at most ``size`` blocks)."""
    blocks = min(blocks, size)
    edges = [round(i * size / blocks) for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def block_eigenbasis(gram: torch.Tensor, blocks: int = 1, float64_max: int = 4096) -> torch.Tensor:
    """The basis of a side: :func:`eigenbasis` of the whole Gram (``blocks`` = 1), or the
    block-diagonal basis whose i-th block is the eigenbasis of the Gram's i-th diagonal block:
    applying it costs N·size²/blocks instead of N·size² (each block keeps its own energy order)."""
    if blocks == 1:
        return eigenbasis(gram, float64_max)[0]
    return torch.block_diag(*(eigenbasis(gram[a:b, a:b], float64_max)[0] for a, b in block_bounds(gram.shape[0], blocks)))


def apply_basis(t: torch.Tensor, B: torch.Tensor, idx: Index, blocks: int, n_major: bool = False) -> torch.Tensor:
    """``t @ B[:, idx]`` (B already restricted to ``idx``). A block-diagonal basis taken whole
    multiplies block by block, skipping the zero blocks; otherwise one dense product.
    ``n_major`` (t of N rows, 2-D): the same values laid out column-major, i.e. computed as
    ``(Bᵀ tᵀ)ᵀ`` at the same cost, the layout the SDDMM reads, which then copies nothing."""
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


@contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one torch CPU thread, restoring the caller's count afterwards."""
    before = torch.get_num_threads()
    if not enabled or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _eigenbasis(gram: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    sym = gram.to(dtype)
    sym = (sym + sym.T) / 2  # accumulated in float32: remove the asymmetric round-off
    values, vectors = torch.linalg.eigh(sym)
    order = torch.argsort(values, descending=True)
    values, vectors = values[order], vectors[:, order]
    size = gram.shape[0]
    tol = float(values[0].clamp(min=0)) * size * torch.finfo(torch.float32).eps
    keep = int((values > tol).sum())
    if 0 < keep < size:
        eye = torch.eye(size, dtype=dtype, device=vectors.device)
        completion, _ = torch.linalg.qr(torch.cat([vectors[:, :keep], eye], dim=1))
        tail = completion[:, keep:size]
        energy = ((sym @ tail) * tail).sum(0)  # Rayleigh quotients: keep the energy order
        by_energy = torch.argsort(energy, descending=True)
        vectors = torch.cat([vectors[:, :keep], tail[:, by_energy]], dim=1)
        values = torch.cat([values[:keep], energy[by_energy]])
    return vectors.to(torch.float32), values.to(torch.float32)


def _column_major(basis: torch.Tensor) -> torch.Tensor:
    """``basis`` stored column by column (Bᵀ contiguous): the sparse×dense merge reads Bᵀ
    row-major and would otherwise copy it on every call (docs/performance.md); dense products
    take either layout."""
    return basis.T.contiguous().T


def _key(index: int, part: str) -> str:
    return f"g{index}_{part}"


class BasisBank(nn.Module):
    """Named basis pairs. ``columns(group, "P", idx)`` returns ``P[:, idx]``."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[str] = []
        # Empty, not saved: follows .to(device) so buffers created on load land on the model's device.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def has(self, group: str) -> bool:
        return group in self.groups

    def set(
        self,
        group: str,
        P: torch.Tensor | None,
        Q: torch.Tensor | None,
        P_cols: torch.Tensor | None = None,
        Q_cols: torch.Tensor | None = None,
    ) -> None:
        """Store a pair; ``*_cols`` are the global indices of the stored columns when partial. A
        side given as None is not stored (layers that keep that side the identity)."""
        if group not in self.groups:
            self.groups.append(group)
        i = self.groups.index(group)
        for part, value in (("P", P), ("Q", Q), ("P_cols", P_cols), ("Q_cols", Q_cols)):
            name = _key(i, part)
            if value is None:
                if name in self._buffers:
                    del self._buffers[name]
            elif part in ("P", "Q"):
                self.register_buffer(name, _column_major(value))
            else:
                self.register_buffer(name, value.contiguous())

    # The state dict holds the buffers (g0_P, g0_Q, ...) and, as extra state, the group names as
    # UTF-8 bytes. Loading it into a bank that has not been calibrated yet creates the buffers with
    # the saved shapes first, so Trainer checkpoints (state dicts) resume onto a fresh model.
    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(json.dumps(self.groups).encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.groups = json.loads(bytes(state.tolist()).decode())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:  # the bases are held column-major; files (safetensors) want them packed
            for name in [n for n in destination if n.startswith(prefix)]:
                destination[name] = destination[name].contiguous()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            self.set_extra_state(extra)
        device = self._anchor.device
        for key, value in state_dict.items():
            name = key[len(prefix) :] if key.startswith(prefix) else None
            if name and re.fullmatch(r"g\d+_(P|Q|P_cols|Q_cols)", name):
                current = self._buffers.get(name)
                if current is None or current.shape != value.shape:
                    fresh = torch.empty(value.shape, dtype=value.dtype, device=device)
                    self.register_buffer(name, fresh if name.endswith("_cols") else _column_major(fresh))
        stale = [n for n in self._buffers if prefix + n not in state_dict and re.fullmatch(r"g\d+_(P_cols|Q_cols)", n)]
        for name in stale:  # the saved bank held whole bases: drop our column subsets
            del self._buffers[name]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def full(self, group: str, part: str) -> torch.Tensor:
        """The whole basis; error if only some columns are held."""
        i = self.groups.index(group)
        if _key(i, part + "_cols") in self._buffers:
            raise AdapterMismatchError(
                f"Only some columns of basis {part} of group {group!r} are loaded (a fixed-selection "
                "adapter); load the full bases with load_bases() or calibrate() again for this use."
            )
        basis = self._buffers.get(_key(i, part))
        if basis is None:
            raise AdapterMismatchError(
                f"Group {group!r} holds no basis {part}: its layers rotate one side only (rotation='narrow')."
            )
        return basis

    def version(self, group: str) -> tuple:
        """Changes whenever the group's stored tensors change (set, load, in-place edits, .to)."""
        i = self.groups.index(group)
        parts = [self._buffers.get(_key(i, part)) for part in ("P", "Q", "P_cols", "Q_cols")]
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) if t is not None else None for t in parts)

    def is_partial(self, group: str) -> bool:
        i = self.groups.index(group)
        return _key(i, "P_cols") in self._buffers or _key(i, "Q_cols") in self._buffers

    def columns(self, group: str, part: str, idx: torch.Tensor | slice) -> torch.Tensor:
        i = self.groups.index(group)
        basis = self._buffers[_key(i, part)]
        held = self._buffers.get(_key(i, part + "_cols"))
        if isinstance(idx, slice):
            if held is not None:
                idx = torch.arange(basis.shape[0], device=basis.device)[idx]
            else:
                return basis[:, idx]
        if held is not None:
            pos = torch.searchsorted(held, idx)
            if bool((pos >= held.numel()).any()) or not bool((held[pos.clamp(max=held.numel() - 1)] == idx).all()):
                raise AdapterMismatchError(
                    f"The support needs columns of {part} (group {group!r}) that the loaded bases do "
                    "not hold; load the full bases (load_bases) before changing the support."
                )
            idx = pos
        return basis.index_select(1, idx)

    def export(self, used: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] | None = None) -> dict[str, torch.Tensor]:
        """Tensors to save, keyed ``bases.<group>.<part>``. ``used[group] = (P_cols, Q_cols)``
        keeps only those columns (sorted global indices); None keeps the whole basis."""
        out: dict[str, torch.Tensor] = {}
        for group in self.groups:
            cols = (used or {}).get(group, (None, None))
            for part, want in zip(("P", "Q"), cols):
                i = self.groups.index(group)
                basis = self._buffers.get(_key(i, part))
                if basis is None:  # an identity side (rotation="narrow"): nothing stored
                    continue
                held = self._buffers.get(_key(i, part + "_cols"))
                if want is None:
                    out[f"bases.{group}.{part}"] = basis
                    if held is not None:
                        out[f"bases.{group}.{part}_cols"] = held
                else:
                    out[f"bases.{group}.{part}"] = self.columns(group, part, want)
                    out[f"bases.{group}.{part}_cols"] = want
        return {k: v.detach().contiguous() for k, v in out.items()}

    def load(self, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], device, dtype,
             parts: dict[str, tuple[str, ...]] | None = None) -> None:
        """Fill from ``export()`` output, checking each basis against the group's layer shape.
        ``parts[group]`` names the sides the group's layers rotate (default both); a file with
        more (whole bases for one-sided layers) is fine, one with fewer is an error."""
        for group, (m, n) in shapes.items():
            need = (parts or {}).get(group, ("P", "Q"))
            found: dict[str, torch.Tensor | None] = {"P": None, "Q": None, "P_cols": None, "Q_cols": None}
            for part, size in (("P", m), ("Q", n)):
                if part not in need:
                    continue
                B = tensors.get(f"bases.{group}.{part}")
                if B is None:
                    if any(key.startswith(f"bases.{group}.") for key in tensors):
                        raise AdapterMismatchError(
                            f"The bases file has no basis {part} for layer group {group!r}: it was saved for "
                            "layers that rotate one side only (rotation='narrow'). Calibrate again for this config."
                        )
                    raise AdapterMismatchError(
                        f"The bases file has no basis for layer group {group!r} of this model; it was made "
                        "for another model or other target_modules. Calibrate again for this model."
                    )
                if B.shape[0] != size:
                    raise AdapterMismatchError(
                        f"Basis {part} of shape {tuple(B.shape)} does not fit group {group!r} with layers "
                        f"{m}×{n}: these bases belong to another model. Calibrate again."
                    )
                found[part] = B.to(device=device, dtype=dtype)
                cols = tensors.get(f"bases.{group}.{part}_cols")
                found[part + "_cols"] = None if cols is None else cols.to(device=device, dtype=torch.long)
            self.set(group, found["P"], found["Q"], found["P_cols"], found["Q_cols"])


def _take(t: torch.Tensor, dim: int, idx: Index) -> torch.Tensor:
    """``t`` restricted to ``idx`` along ``dim`` (index_select for indices: no advanced-index copy)."""
    if isinstance(idx, slice):
        return t[(slice(None),) * (dim % t.dim()) + (idx,)]
    return t.index_select(dim, idx)


def _arange(idx: Index, size: int, device: torch.device) -> torch.Tensor:
    return torch.arange(size, device=device)[idx] if isinstance(idx, slice) else idx


class RotatedBasis:
    """SparseGrad's basis: the columns of the group's P (m×m) and Q (n×n) held in ``bank``.
    Plain object, not a module: the bank (owned by the tuner) holds the tensors."""

    is_identity = False
    rotated_parts = ("P", "Q")
    label = "rotated"

    def __init__(self, bank: BasisBank, group: str, blocks: int = 1) -> None:
        self.bank, self.group, self.blocks = bank, group, blocks

    def P(self, rows: Index) -> torch.Tensor:
        return self.bank.columns(self.group, "P", rows)

    def Q(self, cols: Index) -> torch.Tensor:
        return self.bank.columns(self.group, "Q", cols)

    def matrix(self, side: str, idx: Index, size: int) -> torch.Tensor:
        """P[:, idx] (side "P") or Q[:, idx] (side "Q") as a dense matrix."""
        return self.P(idx) if side == "P" else self.Q(idx)

    def version(self) -> tuple:
        """Changes whenever the basis tensors change (for caches of the merged update)."""
        return self.bank.version(self.group)

    def delta_weight(self, D: torch.Tensor, rows: Index, cols: Index, m: int, n: int, column_major: bool = False) -> torch.Tensor:
        """ΔW = P_R D Q_Cᵀ (m×n), differentiable in D; ``column_major``: laid out as a transposed
        W0 is (formed as (Q_C Dᵀ P_Rᵀ)ᵀ), so that W0 + ΔW adds two tensors of one layout."""
        P_R, Q_C = self.P(rows), self.Q(cols)
        if column_major:
            return lowrank_product(Q_C, D.T.to(Q_C.dtype), P_R).T
        return lowrank_product(P_R, D.to(P_R.dtype), Q_C)

    def add_update(self, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        """y + x Q_C Dᵀ P_Rᵀ (the factored forward)."""
        dt = x.dtype
        return y + F.linear(F.linear(F.linear(x, self.Q(cols).T.to(dt)), D), self.P(rows).to(dt))

    def add_input_grad(self, gx: torch.Tensor, g: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        """gx + g P_R D Q_Cᵀ (the factored input gradient)."""
        dt = g.dtype
        return gx + ((g @ self.P(rows).to(dt)) @ D) @ self.Q(cols).T.to(dt)

    def rotate(self, G: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        """P_Rᵀ G Q_C in float32 (calibration scores)."""
        return self.P(rows).float().T @ G.float() @ self.Q(cols).float()

    def value_grad(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index, path: str) -> torch.Tensor:
        """P_Rᵀ gᵀ x Q_C by the bracketing ``path`` (one of ``GRAD_PATHS``)."""
        if path == "activations":  # the block-aware products; P_R, Q_C below would be taken twice
            left, right = self.sampled_factors(g, x, rows, cols)
            return left.T @ right
        dt = x.dtype
        P_R, Q_C = self.P(rows).to(dt), self.Q(cols).to(dt)
        if path == "weights":
            return lowrank_product(P_R.T, g.T @ x, Q_C.T)
        if path == "output-side":
            return ((g @ P_R).T @ x) @ Q_C
        assert path == GRAD_PATHS[3], path
        return P_R.T @ (g.T @ (x @ Q_C))

    def sampled_factors(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index) -> tuple[torch.Tensor, torch.Tensor]:
        """(g P_R, x Q_C): the value gradient is their product's support entries (``SAMPLED``)."""
        return (apply_basis(g, self.P(rows), rows, self.blocks, n_major=True),
                apply_basis(x, self.Q(cols), cols, self.blocks, n_major=True))

    def merge_sparse(self, D: torch.Tensor, rows: Index, cols: Index, side: str) -> torch.Tensor:
        """ΔW = P_R D Q_Cᵀ from a sparse CSR D (Dᵀ when ``side`` is "P"; see
        :func:`sparseft.ops.sparse_lowrank_product`). Not differentiable: for the cached merge."""
        P_R, Q_C = self.P(rows), self.Q(cols)
        return sparse_lowrank_product(P_R, D, Q_C, side)

    def merge_into(self, W0: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index, side: str) -> torch.Tensor:
        """W0 + ΔW, the addition fused into the last dense product when W0 has the bases' dtype."""
        P_R, Q_C = self.P(rows), self.Q(cols)
        if W0.dtype != P_R.dtype:
            return W0 + sparse_lowrank_product(P_R, D, Q_C, side).to(W0.dtype)
        return sparse_lowrank_product(P_R, D, Q_C, side, base=W0)

    @staticmethod
    def sparse_side(m: int, n: int, a: int, b: int, k: int) -> str:
        return sparse_side(m, n, a, b, k)

    def costs(self, tokens: int, m: int, n: int, a: int, b: int, k: int | None = None) -> dict[str, int]:
        return rotated_costs(tokens, m, n, a, b, k, self.blocks)


class OneSidedBasis:
    """One side rotated, the other the identity. ``identity_side`` "P": ``W = W0 + I_R D Q_Cᵀ``,
    the update fills the rows R of W with ``D Q_Cᵀ`` (a layer wider in its outputs, m > n);
    "Q": ``W = W0 + P_R D I_Cᵀ``, the columns C of W get ``P_R D`` (m ≤ n). The bank holds
    only the rotated side's basis. Costs: :func:`sparseft.ops.one_sided_costs`."""

    is_identity = False

    def __init__(self, bank: BasisBank, group: str, identity_side: str, identity_size: int, blocks: int = 1) -> None:
        if identity_side not in ("P", "Q"):
            raise ValueError(f"identity_side must be 'P' or 'Q', got {identity_side!r}")
        self.bank, self.group, self.identity_side, self.blocks = bank, group, identity_side, blocks
        self.identity_size = identity_size  # m ("P") or n ("Q"): the rows or columns of W
        self.rotated_side = "Q" if identity_side == "P" else "P"
        self.rotated_parts = (self.rotated_side,)
        self.label = f"{self.rotated_side}-rotated"

    def _B(self, idx: Index) -> torch.Tensor:
        """Columns of the rotated side's basis."""
        return self.bank.columns(self.group, self.rotated_side, idx)

    def matrix(self, side: str, idx: Index, size: int) -> torch.Tensor:
        if side == self.identity_side:
            return torch.eye(size, device=self.bank._anchor.device)[:, idx]
        return self._B(idx)

    def version(self) -> tuple:
        return self.bank.version(self.group)

    def _scatter(self, part: torch.Tensor, idx: Index, size: int, dim: int) -> torch.Tensor:
        """A zero matrix with ``part`` at the rows (dim 0) or columns (dim 1) ``idx`` of ``size``
        (``part`` itself when ``idx`` is all of them, the usual case of a random support)."""
        if isinstance(idx, slice) and idx == slice(0, size):
            return part
        shape = (size, part.shape[1]) if dim == 0 else (part.shape[0], size)
        out = part.new_zeros(shape[::-1]).T if is_n_major(part) else part.new_zeros(shape)  # in part's layout
        if isinstance(idx, slice):
            out.narrow(dim, idx.start, idx.stop - idx.start).copy_(part)
            return out
        return out.index_copy_(dim, idx, part)  # (in place: keeps out's layout)

    def delta_weight(self, D: torch.Tensor, rows: Index, cols: Index, m: int, n: int, column_major: bool = False) -> torch.Tensor:
        if self.identity_side == "P":
            Q_C = self._B(cols)
            part = (Q_C @ D.T.to(Q_C.dtype)).T if column_major else D.to(Q_C.dtype) @ Q_C.T
            return self._scatter(part, rows, m, 0)
        P_R = self._B(rows)
        part = (D.T.to(P_R.dtype) @ P_R.T).T if column_major else P_R @ D.to(P_R.dtype)
        return self._scatter(part, cols, n, 1)

    def add_update(self, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        dt = x.dtype
        if self.identity_side == "P":
            upd = F.linear(F.linear(x, self._B(cols).T.to(dt)), D)
            return y.index_add_(-1, _arange(rows, y.shape[-1], y.device), upd)
        return y + F.linear(F.linear(_take(x, -1, cols), D), self._B(rows).to(dt))

    def add_input_grad(self, gx: torch.Tensor, g: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        dt = g.dtype
        if self.identity_side == "P":
            return gx + (_take(g, -1, rows) @ D) @ self._B(cols).T.to(dt)
        upd = (g @ self._B(rows).to(dt)) @ D
        return gx.index_add_(-1, _arange(cols, gx.shape[-1], gx.device), upd)

    def rotate(self, G: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        if self.identity_side == "P":
            return _take(G, 0, rows).float() @ self._B(cols).float()
        return self._B(rows).float().T @ _take(G, 1, cols).float()

    def sampled_factors(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index) -> tuple[torch.Tensor, torch.Tensor]:
        if self.identity_side == "P":
            return _take(g, 1, rows), apply_basis(x, self._B(cols), cols, self.blocks, n_major=True)
        return apply_basis(g, self._B(rows), rows, self.blocks, n_major=True), _take(x, 1, cols)

    def value_grad(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index, path: str) -> torch.Tensor:
        """The rotated side's basis applied to the activations ("activations"), or after the
        selected side's product with the other activations ("weights" forms gᵀ x whole first)."""
        if path == "activations" or path == ("input-side" if self.identity_side == "P" else "output-side"):
            left, right = self.sampled_factors(g, x, rows, cols)
            return left.T @ right
        dt = x.dtype
        if self.identity_side == "P":
            gx = _take(g.T @ x, 0, rows) if path == "weights" else _take(g, 1, rows).T @ x
            return gx @ self._B(cols).to(dt)
        gx = _take(g.T @ x, 1, cols) if path == "weights" else g.T @ _take(x, 1, cols)
        return self._B(rows).to(dt).T @ gx

    def merge_sparse(self, D: torch.Tensor, rows: Index, cols: Index, side: str) -> torch.Tensor:
        """ΔW from a sparse CSR D: D (a×b) times Q_Cᵀ into rows R, or (Dᵀ times P_Rᵀ)ᵀ into columns C."""
        B = self._B(cols if self.identity_side == "P" else rows)
        wide = torch.promote_types(B.dtype, torch.float32)
        part = torch.sparse.mm(D.to(wide), B.T.to(wide)).to(B.dtype)  # a×n, or b×m
        if self.identity_side == "P":
            return self._scatter(part, rows, self.identity_size, 0)
        return self._scatter(part.T, cols, self.identity_size, 1)

    def merge_into(self, W0: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index, side: str) -> torch.Tensor:
        """W0 + ΔW. When the update covers the whole identity side (a random support does) and
        everything is float32, one sparse×dense product takes W0 as its addend (torch.addmm):
        no m×n temporary and no addition across layouts. For m ≤ n the CSR holds Dᵀ, so Wᵀ is
        formed and returned transposed (a view; F.linear and matmul take either layout). Its
        timing against the unfused merge: docs/performance.md."""
        whole = rows if self.identity_side == "P" else cols
        B = self._B(cols if self.identity_side == "P" else rows)
        if not (W0.dtype == B.dtype == D.dtype == torch.float32 and isinstance(whole, slice)
                and whole == slice(0, self.identity_size)):
            return W0 + self.merge_sparse(D, rows, cols, side).to(W0.dtype)
        if self.identity_side == "P":
            return torch.addmm(W0, D, B.T)
        return torch.addmm(W0.T, D, B.T).T

    def sparse_side(self, m: int, n: int, a: int, b: int, k: int) -> str:
        return "Q" if self.identity_side == "P" else "P"  # the CSR multiplies the rotated side

    # --- grouped supports (support.Grouped): run j of the wide side's rows trains directions J[j]
    def _run_directions(self, t: torch.Tensor, runs: "Grouped") -> torch.Tensor:
        """N×(Σ runs·c): ``t`` (N×d, the narrow side's activations) on every run's directions.
        Only the distinct directions in use are rotated (N·d·|used| multiply-adds; the whole
        basis, block by block, once they are most of it), then gathered run by run."""
        d = t.shape[1]
        if runs.used.numel() * 2 > d or self.blocks > 1:
            whole = apply_basis(t, self._B(slice(0, d)), slice(0, d), self.blocks)
            return whole.index_select(1, runs.directions)
        return (t @ self._B(runs.used).to(t.dtype)).index_select(1, runs.where)

    def grouped_grad(self, g: torch.Tensor, x: torch.Tensor, runs: "Grouped") -> torch.Tensor:
        """∂L/∂values of a grouped support: per run, (wide activations of its rows)ᵀ times the
        rotated narrow activations along its directions, one batched dense product per segment
        (runs × r×N×c): N·k multiply-adds, as the SDDMM, but read as the activations lie (no
        transposing copy)."""
        wide, thin = (g, x) if self.identity_side == "P" else (x, g)
        N, run = wide.shape[0], runs.run
        A = self._run_directions(thin, runs).to(wide.dtype)  # N × Σ runs·c
        blocks, row, col = [], 0, 0
        for J in runs.J:
            G, c = J.shape
            left = wide[:, row:row + G * run].reshape(N, G, run).permute(1, 2, 0)  # G×r×N
            right = A[:, col:col + G * c].reshape(N, G, c).permute(1, 0, 2)        # G×N×c
            blocks.append(torch.bmm(left, right).reshape(-1))
            row, col = row + G * run, col + G * c
        flat = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        return flat.new_empty(flat.numel()).index_copy_(0, runs.order, flat)

    def costs(self, tokens: int, m: int, n: int, a: int, b: int, k: int | None = None) -> dict[str, int]:
        return one_sided_costs(tokens, m, n, a, b, k, self.identity_side, self.blocks)


class IdentityBasis:
    """P = Q = I: the support's rows and columns are rows and columns of W itself."""

    is_identity = True
    blocks = 1
    rotated_parts: tuple[str, ...] = ()
    label = "identity"

    @staticmethod
    def matrix(side: str, idx: Index, size: int) -> torch.Tensor:
        return torch.eye(size)[:, idx]

    def version(self) -> tuple:
        return ()

    def delta_weight(self, D: torch.Tensor, rows: Index, cols: Index, m: int, n: int, column_major: bool = False) -> torch.Tensor:
        out = D.new_zeros(n, m).T if column_major else D.new_zeros(m, n)
        if isinstance(rows, slice) and isinstance(cols, slice):
            out[rows, cols] = D
        else:
            out[_arange(rows, m, D.device).unsqueeze(1), _arange(cols, n, D.device)] = D
        return out

    def add_update(self, y: torch.Tensor, x: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        upd = F.linear(_take(x, -1, cols), D)
        return y.index_add_(-1, _arange(rows, y.shape[-1], y.device)[: upd.shape[-1]], upd)

    def add_input_grad(self, gx: torch.Tensor, g: torch.Tensor, D: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        upd = _take(g, -1, rows) @ D
        return gx.index_add_(-1, _arange(cols, gx.shape[-1], gx.device)[: upd.shape[-1]], upd)

    def rotate(self, G: torch.Tensor, rows: Index, cols: Index) -> torch.Tensor:
        return _take(_take(G, 0, rows), 1, cols).float()

    def value_grad(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index, path: str) -> torch.Tensor:
        return _take(g, 1, rows).T @ _take(x, 1, cols)

    def sampled_factors(self, g: torch.Tensor, x: torch.Tensor, rows: Index, cols: Index) -> tuple[torch.Tensor, torch.Tensor]:
        return _take(g, 1, rows), _take(x, 1, cols)

    @staticmethod
    def costs(tokens: int, m: int, n: int, a: int, b: int, k: int | None = None) -> dict[str, int]:
        return identity_costs(tokens, m, n, a, b, k)
