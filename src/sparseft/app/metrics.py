"""Exact training-state bytes and peak memory (per process, or per run where the OS can reset it)."""

from __future__ import annotations

import ctypes
import gc
import re
import resource
import sys
from pathlib import Path

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


_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _release_freed_memory() -> None:
    # The window starts at the current RSS: an earlier job's model kept alive by a reference cycle,
    # or heap pages malloc has not handed back, would count in the next job's peak.
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # (not glibc)
        pass


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: ``5`` into /proc/self/clear_refs resets VmHWM), so that a
    worker which runs several jobs reports each job's own peak: what is garbage is freed first, so
    the window starts from what the process really holds. False where the OS cannot."""
    _release_freed_memory()
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since it started or since ``reset_peak_rss()``."""
    try:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", _STATUS.read_text(), re.M).group(1)) * 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):  # (not Linux: getrusage has no reset)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)
