"""Reselection gives grown entries a fresh Adam start: their first update has a fresh Adam's
size (lr), at any step count, instead of inheriting the global bias correction."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from conftest import make_batch
from sparseft import SparseGradConfig, get_sparse_model


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize("late_step", [None, 1000])
def test_grown_entries_take_a_fresh_adam_step(late_step) -> None:
    model = get_sparse_model(bert(), SparseGradConfig(k=20))
    model.calibrate([make_batch("bert", i) for i in range(3)], steps=3, show_progress=False)
    lr = 1e-3
    values = [layer.values for layer in model.sparse_layers().values()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for i in range(30):
        model(**make_batch("bert", 10 + i)).loss.backward()
        opt.step()
        opt.zero_grad()
    if late_step is not None:  # late in training: the global step count is large
        for v in values:
            opt.state[v]["step"].fill_(float(late_step))
    batch = make_batch("bert", 99)
    before = {name: set(zip(layer.rows.tolist(), layer.cols.tolist())) for name, layer in model.sparse_layers().items()}
    model.reselect_support([batch], optimizer=opt, fraction=0.25)
    grown = {}
    for name, layer in model.sparse_layers().items():
        pos = list(zip(layer.rows.tolist(), layer.cols.tolist()))
        grown[name] = [i for i, p in enumerate(pos) if p not in before[name]]
        assert len(grown[name]) == 5
    start = {name: layer.values.detach().clone() for name, layer in model.sparse_layers().items()}
    model(**batch).loss.backward()
    opt.step()
    ratios = []
    for name, layer in model.sparse_layers().items():
        idx = torch.tensor(grown[name])
        step = (layer.values.detach() - start[name])[idx].abs()
        ratios += (step / lr).tolist()
    ratios = torch.tensor(ratios)
    # a fresh Adam's first step is lr·g/|g|: every grown entry moves by ≈ lr
    assert float(ratios.median()) == pytest.approx(1.0, abs=0.1), ratios
    assert float(ratios.max()) < 1.5 and float(ratios.min()) > 0.5, ratios
