"""Progress bars (tqdm), quiet when not on a terminal unless asked.

tqdm is optional (the ``bench`` extra): without it :func:`progress` returns the items unchanged,
so the core (calibration) runs on torch and safetensors alone.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm not installed: no bars
    tqdm = None

T = TypeVar("T")


def progress(items: Iterable[T], desc: str = "", total: int | None = None, disable: bool = False) -> Iterable[T]:
    if tqdm is None:
        return items
    return tqdm(items, desc=desc, total=total, disable=disable or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
