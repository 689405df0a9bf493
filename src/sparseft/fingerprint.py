"""Short fingerprints of a model's frozen weights: which base an adapter or a run belongs to.

A fingerprint hashes names, shapes and a strided sample of each weight (64 numbers, rounded),
so it costs microseconds per layer and still tells apart another architecture, other targets,
and other pretrained weights of the same shape. It is a guard against loading onto the wrong
base, not a checksum of the weights (files carry those).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable

import torch
from torch import nn

from .targets import Target, weight_of

SAMPLES = 64


def _stride(numel: int) -> int:
    return max(1, numel // SAMPLES)


def sample_positions(numel: int) -> torch.Tensor:
    """The flat positions of the ``SAMPLES`` evenly strided entries a fingerprint hashes."""
    return torch.arange(0, numel, _stride(numel))[:SAMPLES]


def weight_samples(weight: torch.Tensor) -> torch.Tensor:
    """The entries of a weight at ``sample_positions`` (float32, CPU; a strided view, no index copy)."""
    flat = weight.detach().reshape(-1)
    return flat[:: _stride(flat.numel())][:SAMPLES].float().cpu()


def _add(h: "hashlib._Hash", label: str, weight: torch.Tensor) -> None:
    h.update(label.encode())
    h.update(weight_samples(weight).numpy().round(5).tobytes())


def base_fingerprint(model: nn.Module, targets: Iterable[Target]) -> str:
    """The fingerprint of ``model``'s target layers (the weights an adapter is added to)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for t in targets:
        _add(h, f"{t.name}:{t.m}x{t.n}", weight_of(model.get_submodule(t.name)))
    return h.hexdigest()[:16]


def base_samples(model: nn.Module, targets: Iterable[Target]) -> dict:
    """What an adapter file keeps beside the fingerprint so that its base is recognised in another
    precision (``same_base_in_another_precision``): the dtype and the fingerprint's samples of
    each target weight. A quantized weight (bitsandbytes 4-bit/8-bit) is sampled dequantized, with
    how far the float weight it was quantized from can lie from each sample (``bounds``), so that
    an adapter trained on a quantized base loads onto its full-precision checkpoint (the QLoRA
    route to serving) and the other way round. {} where a format is not known."""
    from .quantized import dequantized, is_quantized, rounding_bounds

    samples, bounds, dtype = {}, {}, None
    for t in targets:
        layer = model.get_submodule(t.name)
        if is_quantized(layer):
            weight = dequantized(layer)
            bound = rounding_bounds(layer, weight, sample_positions(weight.numel()))
            if bound is None:
                return {}
            bounds[t.name] = bound.tolist()
        else:
            weight = weight_of(layer)
        if not weight.is_floating_point():
            return {}
        samples[t.name] = weight_samples(weight).tolist()
        dtype = dtype or weight.dtype
    if not samples:
        return {}
    return {"dtype": str(dtype).removeprefix("torch."), "samples": samples, **({"bounds": bounds} if bounds else {})}


def same_base_in_another_precision(saved: dict | None, now: dict) -> bool:
    """Whether two ``base_samples`` records sampled the same weights, held in two precisions: a
    base trained on in bfloat16 on a GPU and loaded in float32 for serving (or the other way
    round) hashes to another fingerprint, since rounding moves its samples, but each sample agrees
    to within one unit in the last place of the coarser dtype, plus the rounding bound of a
    quantized side (``bounds``)."""
    if not saved or not now or set(now["samples"]) != set(saved["samples"]):
        return False
    coarse = max(getattr(torch, saved["dtype"]), getattr(torch, now["dtype"]), key=lambda d: torch.finfo(d).eps)
    eps, tiny = torch.finfo(coarse).eps, torch.finfo(coarse).tiny
    for name, values in saved["samples"].items():
        a = torch.tensor(values).to(coarse).float()
        b = torch.tensor(now["samples"][name]).to(coarse).float()
        if a.shape != b.shape:
            return False
        slack = sum(torch.tensor(r.get("bounds", {}).get(name, 0.0)) for r in (saved, now))
        if not bool(((a - b).abs() <= eps * torch.maximum(a.abs(), b.abs()) + tiny + slack).all()):
            return False
    return True


def weights_fingerprint(module: nn.Module, skip: Collection[str] = ()) -> str:
    """The fingerprint of every floating-point parameter and buffer of ``module`` (e.g. a
    transformers model's ``base_model``, the backbone without its task head), but those named in
    ``skip``."""
    h, skip = hashlib.sha256(type(module).__name__.encode()), set(skip)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and name not in skip:
            _add(h, f"{name}:{'x'.join(map(str, tensor.shape))}", tensor)
    return h.hexdigest()[:16]


def _backbone(model: nn.Module) -> nn.Module:
    body = getattr(model, "base_model", None)
    return body if isinstance(body, nn.Module) and body is not model else model


def backbone_fingerprint(model: nn.Module, skip: Collection[str] = ()) -> str:
    """The fingerprint of a transformers model's pretrained body (``model.base_model``, without
    the task head a run adds and trains), or of the whole module otherwise; ``skip``: names in
    it left out (``quantized_weights`` of the same checkpoint loaded quantized)."""
    return weights_fingerprint(_backbone(model), skip)


def quantized_weights(model: nn.Module) -> list[str]:
    """The backbone's tensors that ``backbone_fingerprint`` leaves out because they are not
    floating point (a quantized base's codes): the same checkpoint loaded in full precision
    hashes to the same fingerprint when it skips these."""
    body = _backbone(model)
    return [name for name, tensor in [*body.named_parameters(), *body.named_buffers()] if not tensor.is_floating_point()]


__all__ = ["backbone_fingerprint", "base_fingerprint", "base_samples", "quantized_weights", "same_base_in_another_precision",
           "sample_positions", "weight_samples", "weights_fingerprint"]
