"""Support criteria of fixed-selection calibration, checked against dense autograd gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from conftest import make_batch
from sparseft import ConfigError, MePropConfig, SparseGradConfig, get_sparse_model


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def _per_step_grads(batches):
    """Dense weight gradient of every MLP layer, per batch (plain autograd on the base model)."""
    model = bert()
    names = [n for n, _ in model.named_modules() if n.endswith(("intermediate.dense", "output.dense")) and "attention" not in n]
    grads = {n: [] for n in names}
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        for n in names:
            grads[n].append(model.get_submodule(n).weight.grad.detach().clone())
    return grads


@pytest.mark.parametrize("criterion", ["abs-sum", "sum", "snr", "balanced"])
@pytest.mark.parametrize("config_class", [SparseGradConfig, MePropConfig, "one-sided"])
def test_support_is_the_topk_of_the_criterion(criterion: str, config_class) -> None:
    batches = [make_batch("bert", i) for i in range(3)]
    k = 40
    if config_class == "one-sided":
        config = SparseGradConfig(k=k, support_criterion=criterion, rotation="narrow")
    else:
        config = config_class(k=k, selection="fixed", support_criterion=criterion)
    model = get_sparse_model(bert(), config)
    model.calibrate(batches, steps=3, show_progress=False)
    grads = _per_step_grads(batches)
    for name, layer in model.sparse_layers().items():
        P = layer.basis.matrix("P", slice(None), layer.m).float()  # I on an identity side
        Q = layer.basis.matrix("Q", slice(None), layer.n).float()
        rotated = torch.stack([P.T @ g @ Q for g in grads[name]])
        total = rotated.abs().sum(0)
        score = {"abs-sum": total, "sum": rotated.sum(0).abs(),
                 "snr": rotated.sum(0).abs() / rotated.pow(2).sum(0).sqrt(),
                 "balanced": total / (total.sum(1, keepdim=True) * total.sum(0, keepdim=True)).sqrt()}[criterion]
        chosen = score[layer.rows, layer.cols]
        outside = score.clone()
        outside[layer.rows, layer.cols] = -1
        assert float(chosen.min()) >= float(outside.max()) * (1 - 1e-4), name


def test_balanced_support_spreads_over_more_rows_and_columns() -> None:
    """Energy per row/column: the same k entries touch more rotated rows and columns than Σ|G̃|'s."""
    spread = {}
    for criterion in ("abs-sum", "balanced"):
        torch.manual_seed(0)
        model = get_sparse_model(bert(), SparseGradConfig(k=40, support_criterion=criterion, rotation="both"))
        report = model.calibrate([make_batch("bert", i) for i in range(3)], steps=3, show_progress=False)
        spread[criterion] = sum(r + c for r, c in report.support_spread.values())
    assert spread["balanced"] > spread["abs-sum"], spread


def test_criteria_choose_differently_and_random_ignores_gradients() -> None:
    supports = {}
    for criterion in ("abs-sum", "sum", "random"):
        model = get_sparse_model(bert(), SparseGradConfig(k=40, support_criterion=criterion))
        model.calibrate([make_batch("bert", i) for i in range(3)], steps=3, show_progress=False)
        layer = next(iter(model.sparse_layers().values()))
        supports[criterion] = set(zip(layer.rows.tolist(), layer.cols.tolist()))
    assert supports["abs-sum"] != supports["sum"]
    other = get_sparse_model(bert(), MePropConfig(k=40, selection="fixed", support_criterion="random"))
    other.calibrate([make_batch("bert", i) for i in range(7, 9)], steps=2, show_progress=False)
    layer = next(iter(other.sparse_layers().values()))
    assert set(zip(layer.rows.tolist(), layer.cols.tolist())) == supports["random"]  # same seeds, other batches


@pytest.mark.parametrize("criterion,passes", [("random", 1), ("abs-sum", 2)])
def test_a_random_support_calibrates_in_one_pass(criterion: str, passes: int) -> None:
    """Bases need one pass over the calibration batches; only a gradient criterion needs a second."""
    model = get_sparse_model(bert(), SparseGradConfig(k=40, support_criterion=criterion))
    calls = []
    model.base_model.bert.embeddings.register_forward_hook(lambda *_: calls.append(1))
    model.calibrate([make_batch("bert", i) for i in range(3)], steps=3, show_progress=False)
    assert len(calls) == 3 * passes and model.is_calibrated


def test_unknown_criterion_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="support_criterion"):
        SparseGradConfig(support_criterion="magnitude")


@pytest.mark.parametrize("criterion", ["abs-sum", "snr"])
def test_scoring_in_chunks_chooses_the_same_support_with_bounded_memory(criterion: str) -> None:
    """A score budget smaller than all layers' scores splits them into chunks, one pass each; the
    supports are the same as from one pass, and no chunk's scores exceed the budget."""
    batches = [make_batch("bert", i) for i in range(3)]
    supports, reports = {}, {}
    for budget in (None, 1):  # 1 byte: every layer alone
        model = get_sparse_model(bert(), SparseGradConfig(k=40, support_criterion=criterion))
        reports[budget] = model.calibrate(batches, steps=3, show_progress=False, max_score_bytes=budget)
        supports[budget] = {n: (l.rows.tolist(), l.cols.tolist()) for n, l in model.sparse_layers().items()}
        layers = model.sparse_layers()
    per_layer = (2 if criterion == "snr" else 1) * 4 * 64 * 32
    assert supports[None] == supports[1]
    assert reports[None].score_passes == 1 and reports[None].peak_score_bytes == len(layers) * per_layer
    assert reports[1].score_passes == len(layers) and reports[1].peak_score_bytes == per_layer
    calls = []
    model = get_sparse_model(bert(), SparseGradConfig(k=40, support_criterion=criterion))
    model.base_model.bert.embeddings.register_forward_hook(lambda *_: calls.append(1))
    model.calibrate(batches, steps=3, show_progress=False, max_score_bytes=2 * per_layer)  # two layers per chunk
    assert len(calls) == 3 * (1 + len(layers) // 2)


def test_rotation_is_checked() -> None:
    with pytest.raises(ConfigError, match="rotation='left' is not known"):
        SparseGradConfig(rotation="left")
    with pytest.raises(ConfigError, match="MeProp rotates nothing"):
        MePropConfig(rotation="narrow")
    config = SparseGradConfig(rotation="narrow")
    assert SparseGradConfig.from_dict(config.to_dict()).rotation == "narrow"
    # an adapter config written before the field existed was trained two-sided, and loads so
    old = {k: v for k, v in SparseGradConfig().to_dict().items() if k != "rotation"}
    assert SparseGradConfig.from_dict(old).rotation == "both"
