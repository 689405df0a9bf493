"""Dynamic selection's saved update is the union of every step's top-k: reported, not hidden."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import make_batch, tiny_bert
from sparseft import SparseAdamW, SparseGradConfig, SparseModel, get_sparse_model


def test_dynamic_adapter_size_is_reported_after_many_steps(tmp_path) -> None:
    torch.manual_seed(0)
    model = get_sparse_model(tiny_bert(), SparseGradConfig(k=40, selection="dynamic"))
    model.calibrate([make_batch("bert", i) for i in range(2)], steps=2, show_progress=False)
    opt = SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sizes = []
    for step in range(120):
        model(**make_batch("bert", step % 30)).loss.backward()
        opt.step()
        opt.zero_grad()
        if step in (2, 20, 119):
            sizes.append(sum(model.adapter_entries().values()))
    k = sum(layer.k for layer in model.sparse_layers().values())
    block = sum(layer.block[0] * layer.block[1] for layer in model.sparse_layers().values())
    nonzero = sum(int((layer.delta != 0).sum()) for layer in model.sparse_layers().values())
    assert sizes[0] < sizes[1] < sizes[2] == nonzero  # it grows with training...
    assert k < sizes[2] <= block  # ... past k, bounded by the dense block
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = model.save_pretrained(tmp_path)
    assert info["values"] == nonzero and info["k"] == k
    assert any("per-step budget" in str(w.message) for w in caught) == (nonzero > 4 * k)
    torch.manual_seed(0)
    fresh = SparseModel.from_pretrained(tiny_bert(), tmp_path)  # the union round-trips
    for name, layer in model.sparse_layers().items():
        assert torch.equal(fresh.sparse_layers()[name].delta, layer.delta)


@pytest.mark.parametrize("selection", ["fixed"])
def test_fixed_adapter_stays_at_k(selection, tmp_path) -> None:
    model = get_sparse_model(tiny_bert(), SparseGradConfig(k=40, selection=selection))
    model.calibrate([make_batch("bert", i) for i in range(2)], steps=2, show_progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(30):
        model(**make_batch("bert", step)).loss.backward()
        opt.step()
        opt.zero_grad()
    assert set(model.adapter_entries().values()) == {40}
    assert model.save_pretrained(tmp_path)["values"] == 40 * len(model.sparse_layers())
