"""Output folders, checked before any work and held by one run at a time.

Two runs writing one ``--output-dir`` at once each printed "saved" while one's adapter and results
were overwritten by the other's. A run now takes an exclusive lock on its folder (``flock``: the
kernel drops it when the process dies, so a killed run leaves no stale lock); a second run is
refused with the holder's pid. Paths that are files, or cannot be created, are refused before
the model loads rather than after training.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: folders are checked, not locked
    fcntl = None

LOCK = ".sparseft.lock"


def check_folder(path: str | Path, what: str, create: bool = True) -> Path:
    """``path`` as a folder that exists or can be created (created now with ``create``), else
    ConfigError."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise ConfigError(f"{what} {path}: {part} is a file, not a folder; pass a folder path (or move the file).")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{what} {path} cannot be created ({exc.strerror}): pass a folder you can write to.") from exc
    existing = next(part for part in (path, *path.parents) if part.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {path} is not writable: pass a folder you can write to.")
    return path


def check_folders(paths: Iterable[tuple[str | Path, str]]) -> None:
    """Every ``(path, what)`` a run will write, checked (not created) before it starts."""
    for path, what in paths:
        check_folder(path, what, create=False)


@contextmanager
def claimed(folder: str | Path, what: str = "--output-dir") -> Iterator[Path]:
    """Hold ``folder`` for this process: checked, created, and locked against a second run."""
    folder = check_folder(folder, what)
    if fcntl is None:
        yield folder
        return
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            try:
                who = json.loads(holder)
                by = f" (pid {who['pid']}, since {who['since']})"
            except (ValueError, KeyError, TypeError):
                by = ""
            raise ConfigError(f"Another sparseft run{by} is writing to {what} {folder}: wait for it to finish, "
                              "or pass another --output-dir (two runs in one folder overwrite each other's results).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        yield folder
    finally:
        os.close(fd)  # (closing drops the lock)


__all__ = ["LOCK", "check_folder", "check_folders", "claimed"]
