"""sparseft: sparse fine-tuning of transformer MLP layers (SparseGrad, MeProp, S2FT)."""

__version__ = "0.1.0"

from .config import MePropConfig, SparseConfig, SparseGradConfig  # noqa: E402
from .errors import (  # noqa: E402
    AdapterMismatchError,
    CalibrationError,
    ConfigError,
    DataError,
    InputError,
    NotCalibratedError,
    SparseFTError,
    TargetError,
)
from .model import SparseModel, get_sparse_model  # noqa: E402
from .optim import SparseAdamW  # noqa: E402
from .s2ft import S2FTConfig, S2FTModel, get_s2ft_model  # noqa: E402

__all__ = [
    "AdapterMismatchError",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "InputError",
    "MePropConfig",
    "S2FTConfig",
    "S2FTModel",
    "NotCalibratedError",
    "SparseAdamW",
    "SparseConfig",
    "SparseFTError",
    "SparseGradConfig",
    "SparseModel",
    "TargetError",
    "get_s2ft_model",
    "get_sparse_model",
]
