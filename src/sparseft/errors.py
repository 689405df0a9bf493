"""Exceptions that name the problem and the fix. All derive from ``SparseFTError`` (a
``ValueError``), so callers can catch one type."""


class SparseFTError(ValueError):
    """Base class of every error sparseft raises on bad input or misuse."""


class ConfigError(SparseFTError):
    """A config field is out of range or inconsistent."""


class TargetError(SparseFTError):
    """No adaptable layer was found, or a named target does not exist."""


class CalibrationError(SparseFTError):
    """Calibration could not run (no loss, non-finite gradients, no batches)."""


class NotCalibratedError(SparseFTError, RuntimeError):
    """Training was attempted before ``calibrate()``."""


class AdapterMismatchError(SparseFTError):
    """A saved adapter or bases file does not fit the base model it is loaded onto."""


class CorruptFileError(AdapterMismatchError):
    """A saved file fails its checksum or cannot be read: it changed after saving."""


class InputError(SparseFTError):
    """A tensor or batch given to the model does not fit it (wrong feature size, not a dict)."""


class DataError(SparseFTError):
    """A dataset file is missing, empty, or lacks the columns asked for."""
