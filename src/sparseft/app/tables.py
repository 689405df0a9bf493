"""Result tables for the terminal (rich), shared by ``sparseft train`` and ``sparseft bench``.

Readable at 80 columns: the key column (the method) never wraps or truncates, every other cell
wraps at spaces or folds, never ends in an ellipsis. Memory is in one unit everywhere:
MiB = 2^20 bytes; "state MiB" counts what a method holds to train: its trainable parameters,
their gradients, the optimizer state, and SparseGrad's bases and support index.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

MIB = 2**20
STATE_NOTE = ("state MiB: trainable parameters + gradients + optimizer state + SparseGrad's bases and support index; "
              "MiB = 2^20 bytes")


def state_with_bases_bytes(record: Mapping[str, Any]) -> int:
    """A run's training state (``state_bytes``) plus the buffers SparseGrad holds besides it (its
    bases P, Q and the fixed support's index: ``state_detail``)."""
    detail = record.get("state_detail") or {}
    return int(record["state_bytes"]) + int(detail.get("bases_bytes", 0)) + int(detail.get("support_index_bytes", 0))


def rate(lr: float) -> str:
    """A learning rate in at most 6 characters: 1e-3, 1.5e-4."""
    mantissa, exponent = f"{lr:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def mib(n_bytes: float, digits: int = 2) -> str:
    return f"{n_bytes / MIB:,.{digits}f}"


def _lines(text: str, width: int) -> list[str]:
    """``text``'s words on lines of at most ``width`` (a longer word stays whole)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines or [""]


def _two_line_width(text: str) -> int:
    """The narrowest width that puts ``text`` on at most two lines (breaking at spaces)."""
    for width in range(max(len(w) for w in text.split() or [""]), len(text) + 1):
        if len(_lines(text, width)) <= 2:
            return width
    return len(text)


def _column_widths(headers: Sequence[str], rows: Sequence[Sequence[str]], narrow: bool) -> list[int]:
    """Each column's width: its widest cell (a cell with spaces wraps onto two lines when
    ``narrow``); the header breaks between words to fit (a longer word widens the column)."""
    widths = []
    for i, header in enumerate(headers):
        cells = [r[i] for r in rows]
        wrapable = i > 0 and narrow and any(" " in c for c in cells)
        width = max([_two_line_width(c) if wrapable else len(c) for c in cells] or [1])
        widths.append(max([width] + [len(w) for w in header.split()]))
    return widths


def _layout(headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None) -> tuple[list[int], int, list[list[int]]]:
    """(column widths, gap, column groups): two spaces between columns when the table fits so,
    else one, else cells with spaces on two lines, else the columns split into several tables
    that each repeat the key column."""
    n = len(headers)
    for narrow, gap in ((False, 2), (False, 1), (True, 1)):
        widths = _column_widths(headers, rows, narrow)
        if width is None or sum(widths) + gap * (n - 1) <= width:
            return widths, gap, [list(range(n))]
    widths = _column_widths(headers, rows, narrow=False)  # each part has room: cells whole again
    groups, used = [[0]], widths[0]
    for i in range(1, n):
        if used + 1 + widths[i] > width and len(groups[-1]) > 1:
            groups.append([0])
            used = widths[0]
        groups[-1].append(i)
        used += 1 + widths[i]
    return widths, 1, groups


def make_tables(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], width: int | None = None) -> list:
    """Rich tables that together show the table readably in ``width`` columns (one table when it
    fits; else the columns continue in further tables, each starting with the key column). The
    first column (the key: the method) never wraps or truncates; numbers stay on one line; cells
    with spaces may wrap at them; headers break between words; nothing ends in an ellipsis."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    widths, gap, groups = _layout(headers, rows, width)
    tables = []
    for g, group in enumerate(groups):
        table = Table(title=title if g == 0 else "(continued)", box=box.SIMPLE_HEAD, show_edge=False,
                      padding=(0, 1, 0, 0) if gap == 2 else 0)
        for i in group:
            header = "\n".join(_lines(headers[i], widths[i]))
            table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0, overflow="fold",
                             min_width=widths[i], max_width=widths[i] if len(groups) > 1 or gap == 1 else None)
        for r in rows:
            table.add_row(*[Text(r[i]) for i in group])  # plain text: a variant's "[...]" is not rich markup
        tables.append(table)
    return tables


def show_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None) -> None:
    """Print on stdout at the terminal's width, ``COLUMNS`` when set, else wide enough for a log file."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=200)
    for table in make_tables(title, headers, rows, width=console.width):
        console.print(table)
    if caption:
        console.print(caption, highlight=False)


def render_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None,
                 width: int = 80) -> str:
    """The table as plain text at ``width`` columns (what a terminal that wide shows)."""
    from rich.console import Console

    console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)  # noqa: SIM115
    for table in make_tables(title, headers, rows, width=width):
        console.print(table)
    if caption:
        console.print(caption, highlight=False)
    return console.export_text()
