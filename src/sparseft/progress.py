"""Progress: tqdm bars on a terminal, plain log lines when the output is piped.

A job whose output goes to a file (CI, ``nohup``, ``| tee``) gets one line on stderr at most every
``SPARSEFT_PROGRESS_SECONDS`` seconds (default 30) and one when the loop ends, so a long run is
never silent. tqdm is optional (the ``bench`` extra): without it terminals get the log lines too,
so the core (calibration) runs on torch and safetensors alone.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm not installed: log lines instead of bars
    tqdm = None

T = TypeVar("T")


class LogProgress(Generic[T]):
    """Iterates ``items``, writing ``desc: i/total (elapsed, ETA)`` lines to stderr."""

    def __init__(self, items: Iterable[T], desc: str, total: int | None, every: float) -> None:
        self.items, self.desc, self.every = items, desc or "progress", every
        self.total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
        self.postfix = ""

    def set_postfix(self, **kwargs: object) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def _line(self, done: int, start: float) -> None:
        elapsed = time.perf_counter() - start
        of = f"/{self.total}" if self.total else ""
        eta = f", ETA {elapsed / done * (self.total - done):.0f} s" if self.total and done else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{of} ({elapsed:.0f} s{eta}{extra})", file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator[T]:
        start = last = time.perf_counter()
        done = 0
        for item in self.items:
            yield item
            done += 1
            now = time.perf_counter()
            if now - last >= self.every:
                self._line(done, start)
                last = now
        self._line(done, start)


def progress(items: Iterable[T], desc: str = "", total: int | None = None, disable: bool = False) -> Iterable[T]:
    if disable:
        return items
    if tqdm is not None and sys.stderr.isatty():
        return tqdm(items, desc=desc, total=total, leave=False, dynamic_ncols=True)
    return LogProgress(items, desc, total, float(os.environ.get("SPARSEFT_PROGRESS_SECONDS", "30")))
