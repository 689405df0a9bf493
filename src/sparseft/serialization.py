"""Atomic, verified files: safetensors (never pickle) with JSON metadata and a checksum.

Every write goes to a temporary file in the target directory, is fsynced, then renamed over the
target with ``os.replace``: a crash mid-save leaves the previous file whole. Every read checks
the checksum stored in the metadata, so a truncated or corrupted file is an error, never a
silently wrong model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import AdapterMismatchError, CorruptFileError

META_KEY = "sparseft"
_UMASK = os.umask(0)
os.umask(_UMASK)


def share(path: str | os.PathLike) -> None:
    """Give ``path`` (a folder: it and everything under it) the modes a plain ``open`` or ``mkdir``
    would under the umask. Temporary files and folders (mkstemp, mkdtemp, and safetensors'
    own writes) are private, 0600/0700, which would hide saved runs and caches from a team."""
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else ())]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` then atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        share(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return h.hexdigest()


def file_checksum(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """SHA-256 over the tensors and the JSON metadata (all but its ``sha256`` field), so neither
    the numbers nor the description of what they belong to can change unnoticed."""
    canonical = json.dumps(json.loads(json.dumps({k: v for k, v in meta.items() if k != "sha256"})), sort_keys=True)
    return hashlib.sha256((tensors_checksum(tensors) + canonical).encode()).hexdigest()


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Atomically save ``tensors`` with ``meta`` (JSON) and a checksum; returns the file size."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = dict(meta, sha256=file_checksum(tensors, meta))
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)}))
    return os.path.getsize(path)


def load_tensors(path: str | os.PathLike, what: str = "adapter") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_tensors`, verifying its checksum."""
    path = Path(path)
    if not path.is_file():
        raise AdapterMismatchError(f"No {what} file at {path}: save one with save_pretrained()/save_bases() first.")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CorruptFileError(
            f"The {what} file {path} is truncated or corrupted ({exc}); save it again or restore a backup."
        ) from exc
    if raw is None:
        raise AdapterMismatchError(f"{path} is a safetensors file but not a sparseft {what} (no '{META_KEY}' metadata).")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CorruptFileError(f"The {what} file {path} has unreadable sparseft metadata ({exc}): it is corrupted.") from exc
    if not isinstance(meta, dict):
        raise CorruptFileError(f"The {what} file {path} has sparseft metadata that is not a JSON object: it is corrupted.")
    if file_checksum(tensors, meta) != meta.get("sha256"):
        raise CorruptFileError(
            f"The {what} file {path} fails its checksum: it was modified or corrupted after saving. "
            "Save it again or restore a backup."
        )
    return tensors, meta
