"""Stock ``transformers.Trainer`` checkpoints of a SparseModel hold what trains, not the base.

Tiny random-init BERT classifier (dropout on, so the RNG state matters too). The Trainer writes
``safetensors.save_file(model.state_dict())``; SparseModel's state dict leaves out the frozen base
weights, and resuming onto a fresh, uncalibrated model built on the same base reproduces the
uninterrupted run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_bert
from safetensors import safe_open
from transformers import Trainer, TrainerCallback, TrainingArguments

from sparseft import AdapterMismatchError, SparseGradConfig, get_sparse_model
from sparseft.hf import SparseGradCallback, sparse_optimizer

ROWS = [{k: v[j] for k, v in make_batch("bert", 300 + i).items()} for i in range(6) for j in range(4)]


def sparse_bert(selection: str, calibrate: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.2, selection=selection))
    if calibrate:
        model.calibrate([make_batch("bert", i) for i in range(2)], steps=2, show_progress=False)
    return model


class StopAt(TrainerCallback):
    """Interrupts a run after ``step`` (after its checkpoint is written): the first half of a run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(model, out, selection: str, resume=None, stop_at: int | None = None, **kw) -> Trainer:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=2e-2,
                    save_strategy="steps", save_steps=3, use_cpu=True, report_to="none", disable_tqdm=True,
                    logging_steps=1, seed=0, dataloader_num_workers=0)
    settings.update(kw)
    args = TrainingArguments(**settings)
    extra = {"optimizers": (sparse_optimizer(model, args), None)} if selection == "dynamic" else {}
    trainer = Trainer(model=model, args=args, train_dataset=ROWS, eval_dataset=ROWS[:8],
                      callbacks=[SparseGradCallback()] + ([StopAt(stop_at)] if stop_at else []), **extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)


def loaded(path, selection: str):
    """A fresh uncalibrated model with ``path``'s model.safetensors loaded (strict)."""
    model = sparse_bert(selection, calibrate=False)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
    return model


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_checkpoint_holds_the_adapter_and_not_the_base_weights(tmp_path, selection):
    model = sparse_bert(selection)
    train(model, tmp_path, selection, max_steps=3)
    checkpoint = tmp_path / "checkpoint-3"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {p.name for p in checkpoint.iterdir()}
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    # exactly: per layer its trained entries and support, the bases, the head, the fingerprint
    parts = ["values", "_extra_state"] if selection == "fixed" else ["delta_index", "delta_values", "_extra_state"]
    expected = {f"base_model.{name}.{part}" for name in model.sparse_layers() for part in parts}
    expected |= {f"bases.{b}" for b, _ in model.bases.named_buffers() if b != "_anchor"} | {"bases._extra_state"}
    expected |= {"base_model.classifier.weight", "base_model.classifier.bias", "_extra_state"}
    assert keys == expected
    assert not keys & model._frozen_names() and model._frozen_names()
    if selection == "dynamic":  # the non-zero entries only: at most 3 steps of k per layer
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
            for name, layer in model.sparse_layers().items():
                assert 0 < f.get_slice(f"base_model.{name}.delta_values").get_shape()[0] <= 3 * layer.k
    # it restores the trained model exactly; a full state dict (base weights included) loads too
    assert_same(trainable(loaded(checkpoint, selection)), trainable(model))
    full = {**{f"base_model.{k}": v for k, v in model.base_model.state_dict().items()}, **model.state_dict()}
    fresh = sparse_bert(selection, calibrate=False)
    fresh.load_state_dict(full)
    assert_same(trainable(fresh), trainable(model))


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, selection):
    straight = sparse_bert(selection)
    train(straight, tmp_path / "straight", selection)
    first_half = sparse_bert(selection)
    train(first_half, tmp_path / "halves", selection, stop_at=3)  # 6 steps planned (LR schedule), stopped
    # a fresh model and Trainer, *not* calibrated: values, supports and bases come from the checkpoint
    resumed = sparse_bert(selection, calibrate=False)
    train(resumed, tmp_path / "halves", selection, resume=str(tmp_path / "halves" / "checkpoint-3"))
    assert_same(trainable(resumed), trainable(straight))
    assert not torch.equal(trainable(resumed)["base_model.classifier.weight"], trainable(first_half)["base_model.classifier.weight"])


def test_resume_onto_other_base_weights_is_refused(tmp_path):
    train(sparse_bert("fixed"), tmp_path, "fixed", max_steps=3)
    other = sparse_bert("fixed", calibrate=False, seed=1)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        train(other, tmp_path, "fixed", resume=str(tmp_path / "checkpoint-3"))


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    model = sparse_bert("fixed")
    # "best" = highest eval loss, i.e. the first checkpoint: loading it visibly changes the model
    trainer = train(model, tmp_path, "fixed", max_steps=6, eval_strategy="steps", eval_steps=3,
                    load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-3")
    assert_same(trainable(model), trainable(loaded(tmp_path / "checkpoint-3", "fixed")))
    last = trainable(loaded(tmp_path / "checkpoint-6", "fixed"))
    assert not torch.equal(last["base_model.classifier.weight"], trainable(model)["base_model.classifier.weight"])
