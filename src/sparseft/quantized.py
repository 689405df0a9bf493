"""Frozen base layers stored quantized: bitsandbytes 4-bit / 8-bit (and any layer whose weight
``peft.utils.integrations.dequantize_module_weight`` reads: torchao, HQQ).

A quantized W0 is never merged into during training: the layer computes ``base(x)`` with the
quantization library's own kernel (and its input gradient), and the update is added beside it in
factored form (``y = base(x) + x Q_C Dᵀ P_Rᵀ``). Only calibration needs W0's m×n gradient, which
it forms from the layer's input and output gradient (``gradients.gradient_pass``). Merging a
quantized layer dequantizes W0, adds ΔW and quantizes again, as peft does for LoRA: the result
carries the format's rounding error, and a warning says so.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .errors import ConfigError

# weight classes of quantized layers that subclass nn.Linear (bitsandbytes)
_QUANTIZED_WEIGHTS = ("Params4bit", "Int8Params")


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored in a quantized format (not a plain float tensor)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    return (type(weight).__name__ in _QUANTIZED_WEIGHTS or type(weight).__module__.startswith("torchao.")
            or not weight.dtype.is_floating_point)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype ``module`` computes in: its weight's, or a quantized layer's compute dtype
    (float32 where the format does not say)."""
    if not is_quantized(module):
        return module.weight.dtype
    dtype = getattr(module, "compute_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def dequantized(module: nn.Module) -> torch.Tensor:
    """W0 as an m×n float tensor (peft's dequantization, which knows the formats)."""
    from peft.utils.integrations import dequantize_module_weight

    W = dequantize_module_weight(module)
    return W.detach().to(compute_dtype(module))


@torch.no_grad()
def requantize(module: nn.Module, W: torch.Tensor) -> None:
    """Store the m×n float ``W`` as ``module``'s weight, quantized in its own format again."""
    import bitsandbytes as bnb

    weight = module.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        module.weight = bnb.nn.Params4bit(W.to("cpu"), requires_grad=False, blocksize=weight.blocksize,
                                          compress_statistics=weight.compress_statistics, quant_type=weight.quant_type,
                                          quant_storage=weight.quant_storage, module=module).to(weight.device)
    elif kind == "Int8Params":
        module.weight = bnb.nn.Int8Params(W.to("cpu"), requires_grad=False,
                                          has_fp16_weights=weight.has_fp16_weights).to(weight.device)
        if getattr(module, "state", None) is not None:
            module.state.reset_grads()
    else:
        raise ConfigError(f"Merging into a {type(module).__name__} ({kind} weights) is not supported: keep the adapter "
                          "unmerged, or load the base in full precision and merge there (export_lora is exact).")
    warnings.warn(f"Merged an update into a quantized {type(module).__name__}: W0 + ΔW was quantized again, so the "
                  "merged model differs from the unmerged one by the format's rounding error.", stacklevel=3)


# quantized layers that are not nn.Linear subclasses: named, with the fix (the layer's class name
# is all a GPTQ/AWQ/EETQ model shows sparseft)
_UNSUPPORTED = ("QuantLinear", "WQLinear", "EetqLinear", "QLinear", "Marlin")


def check_supported(name: str, module: nn.Module) -> None:
    """Raise for a quantized layer kind sparseft cannot adapt, naming what works."""
    kind = type(module).__name__
    if any(part in kind for part in _UNSUPPORTED):
        raise ConfigError(f"{name} is a {kind}, a quantized layer sparseft cannot adapt (GPTQ/AWQ-style kernels hide "
                          "W0): load the base with transformers' BitsAndBytesConfig(load_in_4bit=True) or "
                          "load_in_8bit=True instead, or in full precision.")


__all__ = ["check_supported", "compute_dtype", "dequantized", "is_quantized", "requantize"]
