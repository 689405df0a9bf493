"""Trainable heads of a half-precision model, kept in float32.

AdamW's state and update in float16 underflow (its eps = 1e-8 is 0 in float16): a ``.half()``
classifier's head reached NaN at its second step with no error. So a head (``modules_to_save``)
whose weights are float16/bfloat16 is upcast to float32, as the adapters' own values are
(``adapter_dtype``); hooks cast what flows in to float32 and what flows out back to the model's
dtype, so the layers around it see what they did before. ``restore`` undoes both.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HALF = (torch.float16, torch.bfloat16)


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class Float32Head:
    """One head upcast to float32 while it trains (no-op for a head that is not half precision)."""

    def __init__(self, module: nn.Module) -> None:
        half = [p.dtype for p in module.parameters() if p.dtype in HALF]
        self.module = module
        self.dtype = half[0] if half else None
        self._handles: list[Any] = []
        if self.dtype is None:
            return
        module.float()
        self._handles = [
            module.register_forward_pre_hook(lambda _, args, kwargs: (_cast(args, torch.float32), _cast(kwargs, torch.float32)),
                                             with_kwargs=True),
            module.register_forward_hook(lambda _, args, output: _cast(output, self.dtype)),
        ]

    def restore(self) -> None:
        """The head back in the model's dtype, without hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.dtype is not None:
            self.module.to(self.dtype)


__all__ = ["Float32Head"]
