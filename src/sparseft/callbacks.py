"""``transformers.Trainer`` callback for fixed-selection support re-selection."""

from __future__ import annotations

from itertools import islice
from typing import Any

from transformers import TrainerCallback

from .model import SparseModel
from .tuner import unwrap_model


class ReselectSupportCallback(TrainerCallback):
    """Every ``config.reselect_every`` optimizer steps, re-choose part of the fixed support
    (``SparseModel.reselect_support``) from ``batches`` training batches, resetting the optimizer
    state of the swapped entries. ``Trainer(..., callbacks=[ReselectSupportCallback()])``."""

    def __init__(self, every: int | None = None, batches: int = 2) -> None:
        self.every = every
        self.batches = batches

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                    train_dataloader: Any = None, **kwargs: Any) -> None:
        sparse = _unwrap(model)
        every = self.every or sparse.sparse_config.reselect_every
        if not every or state.global_step % every or train_dataloader is None:
            return
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        sparse.reselect_support(list(islice(iter(train_dataloader), self.batches)), optimizer=optimizer)


def _unwrap(model: Any) -> SparseModel:
    sparse = unwrap_model(model, SparseModel)
    if sparse is None:
        raise TypeError("ReselectSupportCallback needs a SparseModel (from get_sparse_model).")
    return sparse
