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


def _half_gap(code: torch.Tensor) -> float:
    """Half the largest gap between neighbouring levels of a quantization code."""
    return float(code.float().sort().values.diff().max()) / 2


@torch.no_grad()
def rounding_bounds(module: nn.Module, W: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """How far the float weight that ``W = dequantized(module)`` was quantized from can lie from
    W at each of the flat ``positions`` (float32), or None for a format this does not know
    (torchao, HQQ).

    - bitsandbytes 4-bit (NF4, FP4): the weight, flattened, is stored in blocks of ``blocksize``
      scaled by their absmax and rounded to the nearest of the code's 16 levels: half the largest
      gap between levels (h), times the absmax. The stored absmax is the block's largest
      |dequantized| entry (a); double quantization stores it in 8 bits too, off by at most e (half
      the nested code's largest gap times its block's scale), so the bound is h·(a + e) + e.
    - bitsandbytes 8-bit (LLM.int8()): each row scaled by its absmax to 127 steps: one step.

    5% is added to each, for float rounding; the bound held on every entry of a real model
    (benchmarks/rounding_bounds.py, docs/sparsegrad.md)."""
    kind = type(module.weight).__name__
    flat = W.detach().reshape(-1)
    if kind == "Params4bit":
        state = module.weight.quant_state
        size = state.blocksize
        members = (positions // size * size).unsqueeze(1) + torch.arange(size)  # each position's block
        absmax = flat[members.clamp(max=flat.numel() - 1).to(flat.device)].float().abs().amax(1).cpu()
        nested = torch.zeros_like(absmax)
        if state.nested:
            inner = state.state2
            scale = inner.absmax.float().cpu()[positions // size // inner.blocksize]
            nested = _half_gap(inner.code) * scale
        return (_half_gap(state.code) * (absmax + nested) + nested) * 1.05
    if kind == "Int8Params":
        rows = (positions // W.shape[1]).to(W.device)
        return W.detach()[rows].float().abs().amax(1).cpu() / 127 * 1.05
    return None


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


@torch.no_grad()
def unpack_for_training(model: nn.Module) -> int:
    """Undo bitsandbytes' CPU inference repacking of 4-bit weights; returns how many layers were.

    bitsandbytes 0.50.2, on a CPU with AVX512-BF16, repacks a ``Linear4bit`` weight for its
    inference kernel on the first eval-mode forward without gradients, and uses that kernel from
    then on: it has no backward, so the layer silently passes no gradient to its input, in
    training too (every layer below it then trains on a wrong gradient). Measured here: an input
    gradient of None after one eval forward. There is no public call to undo it; this uses the
    one bitsandbytes itself calls before saving or moving such a weight."""
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if type(weight).__name__ == "Params4bit" and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if hasattr(module, "quant_state"):
                module.quant_state = weight.quant_state
            count += 1
    return count


def keep_storage_layout(model: nn.Module) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel; returns how many
    layers it now leaves alone (on a GPU nothing repacks: this changes nothing there).

    Undoing that repacking (``unpack_for_training``) is inexact with double quantization: its
    inverse quantizes the nested absmax again, so a base scored once before training trained on
    slightly other weights than its file's (held-out loss 1.1e-5 relative off on reload)."""
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


QUANTIZE = ("4bit", "8bit")
HEADS = ("classifier", "score", "lm_head")  # task heads and output layers, never quantized


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' ``BitsAndBytesConfig`` for a base loaded quantized (``kind`` "4bit": NF4 with
    double quantization, as QLoRA; "8bit": LLM.int8())."""
    if kind not in QUANTIZE:
        raise ConfigError(f"quantize={kind!r} is not known; use one of {list(QUANTIZE)}.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError('A quantized base needs bitsandbytes: pip install "sparseft[quant]".') from exc
    from transformers import BitsAndBytesConfig

    keep = list(HEADS)  # the heads train densely: they stay in float
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)


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


__all__ = ["keep_storage_layout", "unpack_for_training", "QUANTIZE", "check_supported", "compute_dtype", "dequantized", "is_quantized", "quantization_config", "requantize", "rounding_bounds"]
