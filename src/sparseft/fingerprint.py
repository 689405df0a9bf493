"""Short fingerprints of a model's frozen weights: which base an adapter or a run belongs to.

A fingerprint hashes names, shapes and a strided sample of each weight (64 numbers, rounded),
so it costs microseconds per layer and still tells apart another architecture, other targets,
and other pretrained weights of the same shape. It is a guard against loading onto the wrong
base, not a checksum of the weights (files carry those).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from .targets import Target, weight_of

SAMPLES = 64


def _add(h: "hashlib._Hash", label: str, weight: torch.Tensor) -> None:
    flat = weight.detach().reshape(-1)
    h.update(label.encode())
    h.update(flat[:: max(1, flat.numel() // SAMPLES)][:SAMPLES].float().cpu().numpy().round(5).tobytes())


def base_fingerprint(model: nn.Module, targets: Iterable[Target]) -> str:
    """The fingerprint of ``model``'s target layers (the weights an adapter is added to)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for t in targets:
        _add(h, f"{t.name}:{t.m}x{t.n}", weight_of(model.get_submodule(t.name)))
    return h.hexdigest()[:16]


def weights_fingerprint(module: nn.Module) -> str:
    """The fingerprint of every parameter and buffer of ``module`` (e.g. a transformers model's
    ``base_model``, the backbone without its task head)."""
    h = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            _add(h, f"{name}:{'x'.join(map(str, tensor.shape))}", tensor)
    return h.hexdigest()[:16]


def backbone_fingerprint(model: nn.Module) -> str:
    """The fingerprint of a transformers model's pretrained body (``model.base_model``, without
    the task head a run adds and trains), or of the whole module otherwise."""
    body = getattr(model, "base_model", None)
    return weights_fingerprint(body if isinstance(body, nn.Module) and body is not model else model)


__all__ = ["backbone_fingerprint", "base_fingerprint", "weights_fingerprint"]
