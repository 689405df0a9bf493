"""sparseft: sparse fine-tuning of transformer MLP layers (SparseGrad, MeProp, S2FT).

The public names are imported on first use (PEP 562), so ``import sparseft`` and the command
line's argument parsing do not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MePropConfig": ".config",
    "SparseConfig": ".config",
    "SparseGradConfig": ".config",
    "AdapterMismatchError": ".errors",
    "CalibrationError": ".errors",
    "ConfigError": ".errors",
    "CorruptFileError": ".errors",
    "DataError": ".errors",
    "InputError": ".errors",
    "NotCalibratedError": ".errors",
    "SparseFTError": ".errors",
    "TargetError": ".errors",
    "BaseTuner": ".tuner",
    "SparseModel": ".model",
    "get_sparse_model": ".model",
    "SparseAdamW": ".optim",
    "S2FTConfig": ".s2ft",
    "S2FTModel": ".s2ft",
    "get_s2ft_model": ".s2ft",
}

__all__ = sorted(_EXPORTS)


# The built-in methods' modules: each registers its adapter kind (BaseTuner.__init_subclass__) so
# that any tuner loads any kind's adapter; imported together with the first torch-backed name.
_BUILTIN_METHODS = (".model", ".s2ft")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        if _EXPORTS[name] not in (".config", ".errors"):
            for module in _BUILTIN_METHODS:
                importlib.import_module(module, __name__)
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'sparseft' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
