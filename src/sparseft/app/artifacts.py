"""Folders the CLI saves, sealed: ``sparseft_manifest.json`` lists every file's SHA-256 and the
fingerprint of the base model the run started from; loading verifies both before it reads.

Adapter files of sparseft's own format carry their own checksums, but a peft LoRA/SHiRA folder, a
merged model or a fully fine-tuned model does not: a flipped byte there changed predictions with
exit 0. The manifest covers every file whatever wrote it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from ..errors import AdapterMismatchError, CorruptFileError
from ..serialization import atomic_write_text, share

MANIFEST = "sparseft_manifest.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))


def seal(folder: str | Path, base_fingerprint: str | None) -> dict[str, Any]:
    """Write ``folder/sparseft_manifest.json`` (atomically) for the files now in ``folder``, and
    give them the umask's modes (transformers and peft write safetensors 0600)."""
    folder = Path(folder)
    share(folder)
    manifest = {"base_fingerprint": base_fingerprint,
                "files": {p.relative_to(folder).as_posix(): file_sha256(p) for p in _files(folder)}}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def verify(folder: str | Path) -> dict[str, Any]:
    """The folder's manifest, after checking every file it lists is there, unchanged. A folder
    saved before manifests existed loads with a warning."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        warnings.warn(f"{folder} has no {MANIFEST} (saved by an older sparseft): its files cannot be verified.", stacklevel=2)
        return {"base_fingerprint": None, "files": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CorruptFileError(f"{path} is not a readable manifest ({exc}): the folder is damaged; save it again.") from exc
    for name, digest in files.items():
        file = folder / name
        if not file.is_file():
            raise AdapterMismatchError(f"{file} is missing: the folder is incomplete (its manifest lists it); copy it whole.")
        if file_sha256(file) != digest:
            raise CorruptFileError(f"{file} fails its checksum: it changed after saving; save the run again or restore a backup.")
    return manifest


def _record_digest(record: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def sealed_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a run's JSON record, as records.jsonl keeps it) with its own ``sha256``."""
    return {**record, "sha256": _record_digest(record)}


def record_intact(record: dict[str, Any]) -> bool:
    """Whether a record read back is as it was sealed (records written before seals pass)."""
    return "sha256" not in record or record["sha256"] == _record_digest(record)


def read_sealed(log: Path) -> tuple[list[dict[str, Any]], int]:
    """The intact records of a run log (records.jsonl; their seals removed) and the count that
    fail their checksum (changed after the run). A line cut off by a crash is skipped."""
    records, damaged = [], 0
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record_intact(rec):
            rec.pop("sha256", None)
            records.append(rec)
        else:
            damaged += 1
    return records, damaged


__all__ = ["MANIFEST", "file_sha256", "read_sealed", "record_intact", "seal", "sealed_record", "verify"]
