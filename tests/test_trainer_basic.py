"""Plain use inside transformers.Trainer: the stock optimizer for fixed selection,
SparseAdamW for dynamic selection."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, make_batches, tiny_bert
from transformers import Trainer, TrainingArguments

from sparseft import SparseAdamW, SparseGradConfig, get_sparse_model


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def rows(n=48):
    out = []
    for i in range(n // 4):
        b = make_batch("bert", 200 + i)
        out.extend({k: v[j] for k, v in b.items()} for j in range(4))
    return out


def eval_loss(model):
    model.eval()
    with torch.no_grad():
        return sum(model(**make_batch("bert", 200 + i)).loss.item() for i in range(12)) / 12


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_trainer_trains_a_sparse_model(selection, tmp_path):
    torch.manual_seed(0)
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.2, selection=selection))
    model.calibrate(make_batches("bert", 4), steps=4, show_progress=False)
    before = eval_loss(model)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=4, learning_rate=5e-2,
                             logging_steps=100, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    optimizers = (None, None)
    if selection == "dynamic":
        optimizer = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        model.attach_optimizer(optimizer)
        optimizers = (optimizer, None)
    trainer = Trainer(model=model, args=args, train_dataset=ListDataset(rows()), optimizers=optimizers)
    # Trainer sees the model's real input names (no column silently dropped) and label name
    trainer.train()
    assert {"input_ids", "attention_mask", "labels"} <= set(trainer._signature_columns)
    assert trainer.label_names == ["labels"]
    assert eval_loss(model) < before
    if selection == "fixed":
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        assert isinstance(optimizer, torch.optim.AdamW)
        values = sum(l.values.numel() for l in model.sparse_layers().values())
        state = sum(s["exp_avg"].numel() for s in optimizer.state.values())
        head = sum(p.numel() for p in model.base_model.classifier.parameters())
        assert state == values + head  # O(k) optimizer state


def test_trainer_callback_reselects_the_support(tmp_path):
    from sparseft.callbacks import ReselectSupportCallback

    model = get_sparse_model(tiny_bert(), SparseGradConfig(k=20, reselect_every=2))
    model.calibrate(make_batches("bert", 2), steps=2, show_progress=False)
    before = {n: set(zip(l.rows.tolist(), l.cols.tolist())) for n, l in model.sparse_layers().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=ListDataset(rows(32)), callbacks=[ReselectSupportCallback()]).train()
    for name, layer in model.sparse_layers().items():
        after = set(zip(layer.rows.tolist(), layer.cols.tolist()))
        assert len(after) == 20 and after != before[name]
