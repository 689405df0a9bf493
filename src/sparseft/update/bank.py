"""Where bases live: ``BasisBank`` holds one basis pair (P, Q) per layer group, and
``eigenbasis`` computes a side's basis from a Gram matrix (the HOSVD factor of calibration).

The bank is an ``nn.Module`` so that ``model.to(device)`` moves each basis once (layers hold a
reference to the bank, never a copy). A basis may be stored whole (m×m) or, after loading a
fixed-selection adapter, as only the columns that adapter uses, with their indices.

A model split over devices (transformers' ``device_map``) has a group's layers on several: the
bank stores each basis once, on the first target's device, and a layer elsewhere reads a copy on
its own device, made once and again only when the basis changes.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import AdapterMismatchError
from .kernels import block_bounds


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


def block_eigenbasis(gram: torch.Tensor, blocks: int = 1, float64_max: int = 4096) -> torch.Tensor:
    """The basis of a side: :func:`eigenbasis` of the whole Gram (``blocks`` = 1), or the
    block-diagonal basis whose i-th block is the eigenbasis of the Gram's i-th diagonal block:
    applying it costs N·size²/blocks instead of N·size² (each block keeps its own energy order)."""
    if blocks == 1:
        return eigenbasis(gram, float64_max)[0]
    return torch.block_diag(*(eigenbasis(gram[a:b, a:b], float64_max)[0] for a, b in block_bounds(gram.shape[0], blocks)))


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


def _every_column(cols: torch.Tensor, size: int) -> bool:
    """Whether ``cols`` is 0..size-1 in order."""
    return cols.numel() == size and torch.equal(cols.cpu(), torch.arange(size, dtype=cols.dtype))


def _key(index: int, part: str) -> str:
    return f"g{index}_{part}"


class BasisBank(nn.Module):
    """Named basis pairs. ``columns(group, "P", idx, device)`` returns ``P[:, idx]`` on ``device``."""

    def __init__(self) -> None:
        super().__init__()
        self.groups: list[str] = []
        # Empty, not saved: follows .to(device) so buffers created on load land on the model's device.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        # a partial basis: per (group, part), each global column's place among the held ones (-1: not
        # held), and the column indices already checked against it (the check reads a value back)
        self._places: dict[tuple[int, str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._checked: dict[tuple, tuple] = {}
        # copies of (basis, held columns) on the other devices of a split model, by (group, part, device)
        self._replicas: dict[tuple[int, str, torch.device], tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    def __getstate__(self) -> dict:  # (caches of this process's tensors, some weak references)
        return {**self.__dict__, "_places": {}, "_checked": {}, "_replicas": {}}

    def _apply(self, fn, recurse=True):
        self._replicas = {}  # (the bank moved: copies for the old layout would only hold memory)
        return super()._apply(fn, recurse)

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
        # every column held, in order (an adapter whose support touches them all): the whole basis
        P_cols, Q_cols = (None if cols is not None and B is not None and _every_column(cols, B.shape[0]) else cols
                          for cols, B in ((P_cols, P), (Q_cols, Q)))
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

    def held(self) -> list[torch.Tensor]:
        """Every basis tensor the bank holds (whole, or the columns of a partial one)."""
        return [t for group in range(len(self.groups)) for part in ("P", "Q")
                if (t := self._buffers.get(_key(group, part))) is not None]

    def is_partial(self, group: str) -> bool:
        i = self.groups.index(group)
        return _key(i, "P_cols") in self._buffers or _key(i, "Q_cols") in self._buffers

    def columns(self, group: str, part: str, idx: torch.Tensor | slice, device: torch.device | None = None) -> torch.Tensor:
        """``B[:, idx]`` of the whole basis B, whether it is held whole or as some columns, on
        ``device`` (default: where the bank is)."""
        i = self.groups.index(group)
        basis, held = self._on_device(i, part, device)
        if held is None:
            return basis[:, idx] if isinstance(idx, slice) else basis.index_select(1, idx)
        places = self._places_of(i, part, held, basis.shape[0])
        return basis.index_select(1, self._checked_places(group, i, part, places, idx))

    def _on_device(self, i: int, part: str, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(basis, held columns or None) of group ``i``'s side ``part``: the stored ones, or their
        copy on ``device`` when that is another device (a layer of a split model)."""
        basis = self._buffers[_key(i, part)]
        held = self._buffers.get(_key(i, part + "_cols"))
        if device is None or basis.device == device:
            return basis, held
        stored = tuple((t.data_ptr(), t._version) if t is not None else None for t in (basis, held))
        replica = self._replicas.get((i, part, device))
        if replica is None or replica[0] != stored:  # (.to keeps the column-major strides)
            replica = self._replicas[(i, part, device)] = (stored, basis.to(device), None if held is None else held.to(device))
        return replica[1], replica[2]

    def _places_of(self, i: int, part: str, held: torch.Tensor, size: int) -> torch.Tensor:
        """Each of the ``size`` global columns' place among the ``held`` ones, -1 where not held:
        built once per held set and device, so a product reads its columns with one gather."""
        known = self._places.get((i, part, held.device))
        if known is None or known[0] is not held:
            places = torch.full((size,), -1, dtype=torch.long, device=held.device)
            places[held] = torch.arange(held.numel(), device=held.device)
            known = self._places[(i, part, held.device)] = (held, places)
        return known[1]

    def _checked_places(self, group: str, i: int, part: str, places: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
        """``places[idx]``, checked to be held once per index and held set, not on every product:
        the check reads a value back, which on a GPU waits for the device."""
        found = places[idx]
        key = (i, part, places.device, (idx.start, idx.stop, idx.step) if isinstance(idx, slice) else id(idx))
        seen = self._checked.get(key)
        fresh = seen is None or seen[0] is not places or (seen[1] is not None and (seen[1]() is not idx or seen[2] != idx._version))
        if fresh:
            if bool((found < 0).any()):
                raise AdapterMismatchError(
                    f"The support needs columns of {part} (group {group!r}) that the loaded bases do "
                    "not hold; load the full bases (load_bases) before changing the support."
                )
            self._checked = {k: v for k, v in self._checked.items() if v[1] is None or v[1]() is not None}  # (gone supports)
            self._checked[key] = (places, None, None) if isinstance(idx, slice) else (places, weakref.ref(idx), idx._version)
        return found

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


__all__ = ["BasisBank", "block_eigenbasis", "eigenbasis", "one_thread"]
