#!/usr/bin/env bash
# The tests on other versions of the dependencies than .venv's, each set in a virtual environment
# of its own (.venv-floor, .venv-device), with the repository's src/ (no install):
#   bash scripts/check_versions.sh floor    # pyproject.toml's lower bounds, each `>=X` taken as `==X`
#   bash scripts/check_versions.sh device   # the GPU machine's (torch 2.11.0, transformers 5.17.0,
#                                           # peft 0.21.0, triton 3.6.0): what benchmarks/gpu.sh meets
#   bash scripts/check_versions.sh device tests/test_cuda.py -x   # arguments after the set go to pytest
# torch other than 2.13.0 comes from PyPI as its CUDA build (about 5 GB in the environment; it runs
# on the CPU). The offline sources come from the same cache as .venv's (SPARSEFT_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=${1:-}
shift || true
# Test-only packages, beside the pins; bitsandbytes so the 4-bit tests run too.
extra=(pytest hypothesis pytest-timeout "bitsandbytes==0.50.2" kernels)
case "$set_name" in
  floor)
    mapfile -t pins < <(python3 - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + project["optional-dependencies"]["hf"] + project["optional-dependencies"]["bench"]
for spec in wanted:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)\s*", spec)
    if m:  # (sparseft[hf] and unpinned names are not floors)
        print(f"{m[1]}=={m[2]}")
EOF
    ) ;;
  device)
    # numpy below 2.4: triton 3.6's interpreter (the Triton tests here) turns a 1-element array
    # into an int, which numpy 2.4 refuses; the GPU machine compiles its kernels instead.
    pins=("torch==2.11.0" "transformers==5.17.0" "peft==0.21.0" "triton==3.6.0" "accelerate==1.15.0" "numpy<2.4"
          rich matplotlib tqdm pyyaml gguf) ;;
  *) echo "usage: bash scripts/check_versions.sh floor|device [pytest arguments]" >&2; exit 2 ;;
esac
[ ${#pins[@]} -gt 0 ] || { echo "check_versions: no versions for $set_name (pyproject.toml unreadable?)" >&2; exit 1; }
venv=.venv-$set_name
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "check_versions: $set_name: ${pins[*]}"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" "${extra[@]}"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${pins[@]}"  # (the extras may not lift a pin)
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$venv/bin/python" -c "import torch, transformers, peft; print('check_versions:', 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
"$venv/bin/python" -m sparseft.app.sources
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
