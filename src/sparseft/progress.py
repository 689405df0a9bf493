"""Progress bars (tqdm), quiet when not on a terminal unless asked."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], desc: str = "", total: int | None = None, disable: bool = False) -> Iterable[T]:
    return tqdm(items, desc=desc, total=total, disable=disable or not sys.stderr.isatty(), leave=False, dynamic_ncols=True)
