"""Text-classification data: the embedded Rotten Tomatoes task and the user's CSV/JSONL files.

Splits are deterministic and group-disjoint: each row goes to train/validation/test by a hash of
its group (the movie for Rotten Tomatoes, else the text itself), so no movie (or duplicate
text) appears on both sides, and the split is the same on every machine and run.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from .resources import rotten_tomatoes_path


@dataclass
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, keep: list[int]) -> "TextDataset":
        return TextDataset([self.texts[i] for i in keep], [self.labels[i] for i in keep], self.label_names, [self.groups[i] for i in keep])


def _open_text(path: Path) -> io.TextIOBase:
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    return opener(path, "rt", encoding="utf-8-sig", newline="")  # (-sig: a byte-order mark, as Excel writes, is not text)


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a JSONL file (optionally .gz/.bz2)."""
    rows = []
    try:
        with _open_text(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {i} is not valid JSON ({exc.msg}); one JSON object per line.") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path}: line {i} is not a JSON object.")
                rows.append((i, row))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): re-save it as UTF-8.") from exc
    except (OSError, EOFError) as exc:
        raise DataError(f"Cannot read {path}: {exc}.") from exc
    return rows


def _read_rows(path: Path) -> list[dict]:
    name = path.name.removesuffix(".bz2").removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return [row for _, row in read_jsonl(path)]
    if not name.endswith((".csv", ".tsv")):
        raise DataError(f"{path}: unknown file type; use .csv, .tsv or .jsonl (optionally .gz/.bz2).")
    try:
        with _open_text(path) as f:
            return list(csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ","))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): re-save it as UTF-8.") from exc
    except (OSError, EOFError, csv.Error) as exc:
        raise DataError(f"Cannot read {path}: {exc}.") from exc


MISSING_LABELS = {"nan", "none", "null", "na", "n/a"}  # how spreadsheets and pandas write an empty cell


def _label_order(values: list[str]) -> list[str]:
    uniq = sorted(set(values))
    try:
        return sorted(uniq, key=float)
    except ValueError:
        return uniq


def _numeric_labels(path: Path, labels: list[str]) -> list[str]:
    """Numeric labels as one spelling per class ("1" and "1.0" are one class); a label with a
    fractional part is a regression target, which a classifier cannot learn: refused."""
    try:
        values = [float(label) for label in labels]
    except ValueError:
        return labels  # class names
    fractional = sorted({v for v in values if v != int(v)})
    if fractional:
        raise DataError(f"{path}: {len(fractional)} label values are not whole numbers (e.g. {fractional[:3]}); "
                        "sparseft trains classifiers: give class names or integers in the label column.")
    return [str(int(v)) for v in values]


def load_table(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    group_column: str | None = None,
    drop_labels: tuple[str, ...] = (),
) -> TextDataset:
    """Rows of a CSV/TSV/JSONL file as a labelled dataset. Labels may be strings or numbers;
    they are numbered in sorted (numeric when possible) order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"No data file at {path}.")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path} has no rows.")
    columns = set().union(*(r.keys() for r in rows[:100]))
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column"), (group_column, "--group-column")):
        if col is not None and col not in columns:
            raise DataError(f"{path} has no column {col!r} (columns: {sorted(columns)}); choose one with {flag}.")
    texts, labels, groups = [], [], []
    no_label = no_text = 0
    for i, r in enumerate(rows, 1):
        text, label = r.get(text_column), r.get(label_column)
        if isinstance(text, (dict, list)) or isinstance(label, (dict, list)):
            raise DataError(
                f"{path}: row {i} has a list/object in {text_column!r} or {label_column!r}; each must be "
                "one string or number."
            )
        if str(label) in drop_labels:
            continue
        if label is None or str(label).strip() == "" or str(label).strip().lower() in MISSING_LABELS:
            no_label += 1
            continue
        text = "" if text is None else str(text).strip()
        if not text:
            no_text += 1
            continue
        texts.append(text)
        labels.append(str(label).strip())
        groups.append(str(r.get(group_column, text)) if group_column else text)
    if no_label or no_text:  # said, not silent: the user counts their rows
        print(f"{path}: {len(texts)} rows used; skipped {no_label} with no label (blank, NaN, None) and {no_text} with "
              "no text", file=sys.stderr)
    if len(texts) < 2:
        raise DataError(f"{path} has {len(texts)} usable row(s) (non-empty text and label); at least a few dozen are needed.")
    labels = _numeric_labels(path, labels)
    names = _label_order(labels)
    if len(names) < 2:
        raise DataError(f"{path}: every row has label {names[0]!r}; classification needs at least two classes.")
    index = {n: i for i, n in enumerate(names)}
    return TextDataset(texts, [index[lab] for lab in labels], names, groups)


def rotten_tomatoes() -> TextDataset:
    """The embedded task: Rotten Tomatoes snippets, rotten (0) vs fresh (1), grouped by movie."""
    return load_table(rotten_tomatoes_path(), "text", "category", group_column="movie_name", drop_labels=("plot",))


def split_dataset(ds: TextDataset, test: float = 0.15, validation: float = 0.1, salt: str = "sparseft") -> dict[str, TextDataset]:
    """Deterministic group-disjoint split into train / validation / test."""
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for i, group in enumerate(ds.groups):
        u = int(hashlib.sha256(f"{salt}:{group}".encode()).hexdigest()[:12], 16) / 16**12
        parts["test" if u < test else "validation" if u < test + validation else "train"].append(i)
    for name, keep in parts.items():
        if not keep:
            raise DataError(f"The {name} split is empty ({len(ds)} rows, {len(set(ds.groups))} groups): use more data.")
    return {name: ds.subset(keep) for name, keep in parts.items()}


def encode(tokenizer, ds: TextDataset, max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(ds.texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": torch.tensor(ds.labels)}


def trim_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut right-padding shared by the whole batch (dynamic padding: fewer tokens, same outputs)."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return batch
    length = max(1, int(mask.sum(1).max()))
    return {k: (v[:, :length] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.items()}


def batches(data: dict[str, torch.Tensor], batch_size: int, seed: int, steps: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled batches, reshuffled each epoch, from a seeded generator; endless if steps is None."""
    n = len(data["labels"])
    gen = torch.Generator().manual_seed(seed)
    done = 0
    while steps is None or done < steps:
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            idx = order[start : start + batch_size]
            yield trim_padding({k: v[idx] for k, v in data.items()})
            done += 1
            if steps is not None and done >= steps:
                return
