"""Helpers for torch.distributed (DDP via torchrun or ``accelerate launch``).

What DDP needs to know about an adapted model (tested in tests/test_distributed.py):

- Calibrate before wrapping: calibration averages each layer's gradient over the ranks before
  it forms Grams and support scores, so every rank builds bit-identical bases and supports, equal
  to one process calibrating on the same global batches.
- Dynamic selection must see the all-reduced gradient: use ``SparseAdamW`` (it takes the top-k
  at step time) or ``model.attach_optimizer(opt)``. The layers' per-backward masking would cut
  each rank's *local* gradient before the all-reduce, so it refuses to run when the world size
  is above 1.
- Every trainable tensor (``values`` / ``delta`` / heads) takes part in every forward, so
  ``find_unused_parameters=False`` (DDP's default) is right.
- The bases and supports are buffers, which DDP re-broadcasts before every forward by default
  (26 MB per forward for all-MiniLM-L6-v2, 35× its fixed-mode gradient all-reduce). They are the
  same on every rank and constant, so ``SparseModel._ddp_params_and_buffers_to_ignore`` (read by
  DDP, and so by accelerate) lists them and DDP leaves them alone; no DDP argument is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SHARDED_DYNAMIC = (
    "Dynamic selection needs the whole gradient of each layer to take its top-k, but its `delta` "
    "parameter was replaced, e.g. sharded by FSDP (each rank would pick from its own shard, and the "
    "optimizer would no longer know it is sparse). Use selection='fixed' with FSDP, or DDP "
    "(torchrun / accelerate launch without FSDP) for dynamic selection."
)


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor split across ranks (FSDP2's fully_shard parameters and gradients)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(tensor, DTensor) and not all(p.is_replicate() for p in tensor.placements)


@dataclass
class AllReduceCounter:
    """Bytes and buckets DDP all-reduces for gradients (counted by a communication hook)."""

    bytes: int = 0
    buckets: int = 0
    per_bucket: list[int] = field(default_factory=list)
    process_group: Any = None

    def reset(self) -> None:
        self.bytes, self.buckets, self.per_bucket = 0, 0, []


def _counting_allreduce(state: AllReduceCounter, bucket):  # no annotations: DDP checks them literally
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buffer = bucket.buffer()
    size = buffer.numel() * buffer.element_size()
    state.bytes += size
    state.buckets += 1
    state.per_bucket.append(size)
    return default_hooks.allreduce_hook(state.process_group, bucket)


def count_allreduce_bytes(ddp_model: torch.nn.parallel.DistributedDataParallel) -> AllReduceCounter:
    """Register a communication hook on ``ddp_model`` that all-reduces as usual and counts the
    bytes of every gradient bucket it sends; read ``counter.bytes`` after a step."""
    counter = AllReduceCounter(process_group=torch.distributed.group.WORLD)
    ddp_model.register_comm_hook(counter, _counting_allreduce)
    return counter


def count_broadcast_bytes() -> dict[str, int]:
    """Count the bytes every DDP instance broadcasts (buffers before each forward, and the
    parameters and buffers at construction) from now on; returns the live counter dict."""
    from torch.nn.parallel import DistributedDataParallel

    counter = {"bytes": 0}
    original = DistributedDataParallel._distributed_broadcast_coalesced

    def counting(self, tensors, buffer_size, authoritative_rank=0):
        counter["bytes"] += sum(t.numel() * t.element_size() for t in tensors)
        return original(self, tensors, buffer_size, authoritative_rank)

    DistributedDataParallel._distributed_broadcast_coalesced = counting
    return counter


__all__ = ["AllReduceCounter", "count_allreduce_bytes", "count_broadcast_bytes", "is_sharded"]
