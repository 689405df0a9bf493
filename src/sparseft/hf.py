"""``transformers.Trainer`` integration: a SparseModel trains inside the stock Trainer.

Recipe (see docs/llm.md)::

    model = get_sparse_model(AutoModelForCausalLM.from_pretrained(...), SparseGradConfig(...))
    model.calibrate(batches, steps=20)                  # before the Trainer is built
    # fixed selection: the stock optimizer (AdamW over the k-entry `values` vectors)
    trainer = Trainer(model=model, args=args, train_dataset=..., data_collator=...)
    # dynamic selection: O(k)-state SparseAdamW, top-k taken at optimizer-step time
    trainer = Trainer(model=model, args=args, ..., optimizers=(sparse_optimizer(model, args), None),
                      callbacks=[SparseGradCallback()])
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)
    model.save_pretrained("adapter")     # O(k) adapter; model.merge_and_unload() for inference

What the Trainer features rely on:
- gradient accumulation: ``attach_optimizer`` (done by :class:`SparseGradCallback` or
  :func:`sparse_optimizer`) moves dynamic top-k selection from every backward to just before
  ``optimizer.step()``, i.e. onto the whole accumulated gradient;
- gradient clipping clips the full (pre-top-k) gradient, then the step keeps the top-k;
- LR schedulers act on any torch optimizer, SparseAdamW included;
- bf16 autocast: trainable values stay float32 (``adapter_dtype``), the frozen weights run in bf16;
- gradient checkpointing: forwarded to the base model (which also makes its inputs require grad);
- ``save_steps`` / ``resume_from_checkpoint``: Trainer saves ``model.state_dict()`` with
  safetensors; SparseModel's state dict carries the bases and fixed supports and drops tied
  aliases, so it loads onto a fresh *uncalibrated* SparseModel built with the same config (no
  calibration needed before resuming). SparseAdamW's integer state survives the reload.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from .model import SparseModel
from .optim import SparseAdamW
from .tuner import unwrap_model


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper(s)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _sparse(model: Any) -> SparseModel | None:
    return unwrap_model(model, SparseModel)


def sparse_optimizer(
    model: SparseModel, args: TrainingArguments | None = None, lr: float | None = None, **kwargs: Any
) -> SparseAdamW:
    """SparseAdamW over ``model``'s trainable parameters (lr and betas/eps/weight decay from
    ``args`` unless given), attached for dynamic selection. Pass it as
    ``Trainer(optimizers=(sparse_optimizer(model, args), None))``; the Trainer still builds the
    LR scheduler from ``args``."""
    if args is not None:
        kwargs.setdefault("betas", (args.adam_beta1, args.adam_beta2))
        kwargs.setdefault("eps", args.adam_epsilon)
        kwargs.setdefault("weight_decay", args.weight_decay)
    lr = lr if lr is not None else (args.learning_rate if args is not None else 1e-3)
    optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)
    model.attach_optimizer(optimizer)
    optimizer._sparseft_attached = True  # SparseGradCallback: do not attach twice
    return optimizer


class SparseGradCallback(TrainerCallback):
    """Attaches the Trainer's optimizer (whichever it is: the stock AdamW, one from
    ``optimizer_cls_and_kwargs``, or one passed in ``optimizers=``) to a dynamic-selection
    SparseModel when training begins, so top-k is taken from the accumulated gradient at each
    optimizer step. Harmless for fixed selection and for models without sparse layers."""

    def __init__(self) -> None:
        self._attached: set[int] = set()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        sparse = _sparse(model)
        if sparse is None or optimizer is None or sparse.sparse_config.selection != "dynamic":
            return
        inner = _inner(optimizer)
        if not getattr(inner, "_sparseft_attached", False) and id(inner) not in self._attached:
            sparse.attach_optimizer(inner)
            self._attached.add(id(inner))


__all__ = ["SparseGradCallback", "sparse_optimizer"]
