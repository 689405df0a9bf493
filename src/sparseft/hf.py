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

    # trl.SFTTrainer: the same, plus one call before train()
    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=..., processing_class=tokenizer,
                         callbacks=[SparseGradCallback()])
    move_trl_fused_head(trainer.model)

What the Trainer features rely on:
- gradient accumulation: ``attach_optimizer`` (done by :class:`SparseGradCallback` or
  :func:`sparse_optimizer`) moves dynamic top-k selection from every backward to just before
  ``optimizer.step()``, i.e. onto the whole accumulated gradient;
- gradient clipping clips the full (pre-top-k) gradient, then the step keeps the top-k;
- LR schedulers act on any torch optimizer, SparseAdamW included;
- bf16 autocast: trainable values stay float32 (``adapter_dtype``), the frozen weights run in bf16;
- gradient checkpointing: forwarded to the base model (which also makes its inputs require grad);
- ``save_steps`` / ``resume_from_checkpoint`` / ``load_best_model_at_end``: for a model that is
  not a PreTrainedModel the stock Trainer writes ``safetensors.save_file(model.state_dict())`` and
  loads it back with ``model.load_state_dict(sd, strict=False)``. SparseModel's state dict holds
  what trains and nothing of the frozen base: the values (a dynamic layer's non-zero entries), the
  supports, the bases, the heads and the base model's fingerprint; tied aliases are stored once.
  It loads onto a fresh *uncalibrated* SparseModel built on the same base with the same config (no
  calibration needed before resuming); other base weights are refused (AdapterMismatchError).
  SparseAdamW's integer state survives the reload.
- TRL: ``trl.SFTTrainer`` patches ``model.forward`` with a fused LM head that does not fit a
  wrapper; call :func:`move_trl_fused_head` on ``trainer.model`` after building the trainer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from .errors import ConfigError
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


def _trl_fused_head(sparse: SparseModel) -> Any:
    """TRL's fused-LM-head forward patched onto ``sparse`` (under accelerate's autocast wrapper
    once training started), or None."""
    for name in ("_original_forward", "forward"):
        fn = getattr(sparse.__dict__.get(name), "__func__", None)
        # functools.wraps gave it the model forward's name: recognise it by its code and module
        if fn is not None and fn.__code__.co_name == "_fused_forward" and fn.__globals__.get("__name__", "").startswith("trl."):
            return sparse.__dict__[name]
    return None


def move_trl_fused_head(model: Any) -> bool:
    """Call after building a TRL trainer (``trl.SFTTrainer`` ≥ 1.x) on a SparseModel, before
    ``train()``. TRL replaces ``model.forward`` by a fused LM head
    (``trl.trainer.utils.add_fused_lm_head``) that runs ``model.base_model`` as the backbone: on a
    PreTrainedModel that is the backbone, on a SparseModel (as on a peft model, which TRL unwraps
    first) it is the whole wrapped model, which has no ``last_hidden_state``. This undoes the patch
    on the SparseModel and adds the same head (same arguments) to the wrapped model, which the
    SparseModel's forward calls. Returns whether there was a patch to move."""
    sparse = _sparse(model)
    patched = None if sparse is None else _trl_fused_head(sparse)
    if patched is None:
        return False
    if "_original_forward" in sparse.__dict__:
        raise ConfigError("Call move_trl_fused_head() before train(): accelerate has wrapped the forward since.")
    from trl.trainer.utils import add_fused_lm_head

    fn = patched.__func__
    closure = dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__ or ())))
    names = [n for n in inspect.signature(add_fused_lm_head).parameters if n != "model"]
    del sparse.forward
    add_fused_lm_head(sparse.base_model, **{n: closure[n] for n in names if n in closure})
    return True


class SparseGradCallback(TrainerCallback):
    """When training begins: attaches the Trainer's optimizer (whichever it is: the stock AdamW,
    one from ``optimizer_cls_and_kwargs``, or one passed in ``optimizers=``) to a
    dynamic-selection SparseModel, so top-k is taken from the accumulated gradient at each
    optimizer step; and says what to do if a TRL fused LM head sits on the SparseModel
    (:func:`move_trl_fused_head`). Harmless for fixed selection and for models without sparse layers."""

    def __init__(self) -> None:
        self._attached: set[int] = set()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        sparse = _sparse(model)
        if sparse is not None and _trl_fused_head(sparse) is not None:
            raise ConfigError("A TRL trainer patched this SparseModel's forward with its fused LM head, which does "
                              "not fit a wrapper: call sparseft.hf.move_trl_fused_head(trainer.model) after building "
                              "the trainer, before train().")
        if sparse is None or optimizer is None or sparse.sparse_config.selection != "dynamic":
            return
        inner = _inner(optimizer)
        if not getattr(inner, "_sparseft_attached", False) and id(inner) not in self._attached:
            sparse.attach_optimizer(inner)
            self._attached.add(id(inner))


__all__ = ["SparseGradCallback", "move_trl_fused_head", "sparse_optimizer"]
