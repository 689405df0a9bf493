"""The baselines the benchmark compares: MeProp changes exactly k entries per step, LoRA goes
through peft on the intended modules, the sparse methods get LoRA's budget."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from sparseft import MePropConfig, SparseAdamW, get_sparse_model
from sparseft.layer import adapted_weight
from sparseft.methods import METHODS, prepare


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (8, 12), generator=g), "attention_mask": torch.ones(8, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (8,), generator=g)}


def effective_weights(model):
    return {name: adapted_weight(layer) for name, layer in model.sparse_layers().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-attached", "sparse-adamw"])
def test_meprop_changes_exactly_k_entries_per_step(optimizer):
    k = 37
    model = get_sparse_model(bert(), MePropConfig(k=k, selection="dynamic"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SparseAdamW(params, lr=1e-2) if optimizer == "sparse-adamw" else torch.optim.SGD(params, lr=0.5)
    if optimizer == "sgd-attached":
        model.attach_optimizer(opt)  # top-k at step time instead of after each backward
    model.train()
    before = effective_weights(model)
    for step in range(3):
        model(**batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()
        after = effective_weights(model)
        for name in before:
            changed = int((after[name] != before[name]).sum())
            assert changed == k, f"step {step}: {name} changed {changed} entries, expected k={k}"
        before = after
    # over several steps different entries were chosen: the selection is dynamic
    total = sum(int((layer.delta != 0).sum()) for layer in model.sparse_layers().values())
    assert total > k * len(before)


def test_meprop_step_matches_topk_of_dense_gradient():
    """The k entries MeProp moves are the k largest |∂L/∂W| of the plain model."""
    k = 20
    dense = bert()
    dense(**batch(0)).loss.backward()
    G = dense.bert.encoder.layer[0].intermediate.dense.weight.grad
    expected = set(torch.topk(G.abs().flatten(), k).indices.tolist())
    model = get_sparse_model(bert(), MePropConfig(k=k))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(**batch(0)).loss.backward()
    opt.step()
    delta = model.sparse_layers()["bert.encoder.layer.0.intermediate.dense"].delta
    assert set(delta.flatten().nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("method,suffixes", [
    ("lora-mlp", {"intermediate.dense", "output.dense"}),
    ("lora-attn", {"attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}),
])
def test_lora_goes_through_peft_on_the_intended_modules(method, suffixes):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    prepared = prepare(method, bert(), rank=4)
    assert isinstance(prepared.model, PeftModel)
    adapted = {name for name, m in prepared.model.named_modules() if isinstance(m, LoraLayer)}
    want = {f"base_model.model.bert.encoder.layer.{i}.{s}" for i in range(2) for s in suffixes}
    assert adapted == want
    trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "classifier" in n for n in trainable)
    assert prepared.trainable_params == sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("rank", [2, 8])
def test_sparse_budgets_match_lora_mlp(rank):
    lora = prepare("lora-mlp", bert(), rank=rank).trainable_params
    head = 32 * 2 + 2
    assert lora - head == rank * 2 * 2 * (32 + 64)  # 2 blocks × 2 layers × r(m+n)
    for method in ("meprop", "sparsegrad-fixed", "sparsegrad-dynamic", "s2ft"):
        assert prepare(method, bert(), rank=rank).trainable_params == lora, method


def test_full_and_head_budgets():
    model = bert()
    total = sum(p.numel() for p in model.parameters())
    assert prepare("full", bert()).trainable_params == total
    assert prepare("head", bert()).trainable_params == 32 * 2 + 2


def test_every_method_trains_one_step():
    """prepare() knows every method, and each one's optimizer moves its trainable parameters."""
    for method in METHODS:
        prepared = prepare(method, bert(), rank=2)
        model = prepared.model
        if prepared.needs_calibration:
            prepared.sparse.calibrate([batch(9), batch(10)], steps=2, show_progress=False)
        opt = prepared.make_optimizer(1e-2)
        model.train()
        model(**batch(1)).loss.backward()
        opt.step()
        moved = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0]
        assert moved, method
