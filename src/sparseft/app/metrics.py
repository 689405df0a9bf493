"""Exact training-state bytes and process peak memory."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of trainable parameters, their gradients (as allocated now) and optimizer state."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = {
        "param_bytes": sum(_bytes(p) for p in params),
        "grad_bytes": sum(_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_bytes": 0,
    }
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optimizer_bytes"] += sum(_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    out["state_bytes"] = out["param_bytes"] + out["grad_bytes"] + out["optimizer_bytes"]
    out.update(adapter_buffer_bytes(model))
    return out


def adapter_buffer_bytes(model: nn.Module) -> dict[str, int]:
    """What SparseGrad holds besides trainable state (not part of ``state_bytes``, which LoRA's
    numbers are compared on): the bases P, Q of every group, and the support index of fixed
    selection (int32 positions + the distinct rows/columns)."""
    from ..update.bank import BasisBank
    from ..layer import SparseLinear

    out = {"bases_bytes": 0, "support_index_bytes": 0}
    for module in model.modules():
        if isinstance(module, BasisBank):
            out["bases_bytes"] += sum(_bytes(b) for b in module.buffers())
        elif isinstance(module, SparseLinear):  # its buffers and its support's, not the base layer's
            base = getattr(module, "base_layer", None)
            skip = {id(b) for b in base.buffers()} if isinstance(base, nn.Module) else set()
            out["support_index_bytes"] += sum(_bytes(b) for b in module.buffers() if id(b) not in skip)
    return out


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
