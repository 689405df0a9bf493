"""Bad input gives a clear error that names the problem and the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ARCHS, make_batch, make_batches, tiny_bert
from torch import nn

from sparseft import (
    AdapterMismatchError,
    CalibrationError,
    ConfigError,
    InputError,
    MePropConfig,
    NotCalibratedError,
    SparseFTError,
    SparseGradConfig,
    SparseModel,
    TargetError,
    get_sparse_model,
)


def test_no_mlp_layer_found_names_target_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(TargetError, match="target_modules"):
        get_sparse_model(model, SparseGradConfig())
    # and the override works on the same model
    sparse = get_sparse_model(model, SparseGradConfig(k=2, target_modules=["0", "2"]))
    assert set(sparse.sparse_layers()) == {"0", "2"}


def test_target_modules_regex_and_bad_target():
    model = tiny_bert()
    sparse = get_sparse_model(model, SparseGradConfig(k=3, target_modules=r".*layer\.0\.intermediate\.dense"))
    assert list(sparse.sparse_layers()) == ["bert.encoder.layer.0.intermediate.dense"]
    with pytest.raises(TargetError, match="only nn.Linear"):
        get_sparse_model(tiny_bert(), SparseGradConfig(k=3, target_modules=["LayerNorm"]))


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5])
def test_density_out_of_range(density):
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        SparseGradConfig(density=density)


def test_k_larger_than_a_layer():
    with pytest.raises(ConfigError, match="larger than"):
        get_sparse_model(tiny_bert(), SparseGradConfig(k=64 * 32 + 1))
    with pytest.raises(ConfigError, match="widen the support"):
        get_sparse_model(tiny_bert(), SparseGradConfig(k=50, support_rows=4, support_cols=4))


@pytest.mark.parametrize("bad", [dict(selection="sometimes"), dict(k=0), dict(match_lora_rank=-1), dict(reselect_every=0),
                                 dict(compute_path="gpu"), dict(density=None)])
def test_bad_config_fields(bad):
    with pytest.raises(ConfigError):
        SparseGradConfig(**bad)


def test_training_before_calibrate():
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05))
    model.train()
    with pytest.raises(NotCalibratedError, match=r"calibrate\(batches\)"):
        model(**make_batch("bert", 0))
    # eval before calibration is the base model, and MeProp dynamic needs no calibration
    model.eval()
    with torch.no_grad():
        model(**make_batch("bert", 0))
    meprop = get_sparse_model(tiny_bert(), MePropConfig(density=0.05)).train()
    meprop(**make_batch("bert", 0)).loss.backward()


def test_batches_without_loss():
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05))
    batch = make_batch("bert", 0)
    del batch["labels"]
    with pytest.raises(CalibrationError, match="labels"):
        model.calibrate([batch], show_progress=False)
    # loss_fn= is the documented way out
    labels = make_batch("bert", 0)["labels"]
    loss_fn = lambda out, b: torch.nn.functional.cross_entropy(out.logits, labels)  # noqa: E731
    model.calibrate([batch], steps=1, loss_fn=loss_fn, show_progress=False)
    assert model.is_calibrated


def test_no_batches_and_non_dict_batches():
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05))
    with pytest.raises(CalibrationError, match="no batches"):
        model.calibrate([], show_progress=False)
    with pytest.raises(InputError, match="dicts"):
        model.calibrate([torch.zeros(2, 3)], show_progress=False)


def test_non_finite_gradients_during_calibration():
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    # finite loss (0) whose gradient is NaN: d sqrt(x)/dx at 0 is inf, times 0
    loss_fn = lambda out, b: torch.sqrt(out.logits.abs() * 0).sum()  # noqa: E731
    with pytest.raises(CalibrationError, match="Non-finite"):
        model.calibrate(make_batches("bert", 2), loss_fn=loss_fn, show_progress=False)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert all(not l.base_layer.weight.requires_grad for l in model.sparse_layers().values())
    with pytest.raises(CalibrationError, match="loss is nan"):
        model.calibrate(make_batches("bert", 1), loss_fn=lambda o, b: o.logits.sum() * float("nan"), show_progress=False)


def _trained_adapter(tmp_path, arch="bert"):
    base = ARCHS[arch]().eval()
    model = get_sparse_model(copy.deepcopy(base), SparseGradConfig(density=0.05))
    model.calibrate(make_batches(arch, 2), steps=2, show_progress=False)
    model.save_pretrained(tmp_path / "adapter")
    model.save_bases(tmp_path / "bases.safetensors")
    return base, tmp_path / "adapter", tmp_path / "bases.safetensors"


def test_adapter_for_another_architecture(tmp_path):
    _, adapter, _ = _trained_adapter(tmp_path, "llama")
    with pytest.raises(AdapterMismatchError, match="LlamaForCausalLM"):
        SparseModel.from_pretrained(tiny_bert(), adapter)


def test_adapter_for_another_shape(tmp_path):
    _, adapter, bases = _trained_adapter(tmp_path)
    from transformers import BertConfig, BertForSequenceClassification

    wider = BertForSequenceClassification(BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=48, max_position_embeddings=64))
    with pytest.raises(AdapterMismatchError, match="do not fit"):
        SparseModel.from_pretrained(wider, adapter)
    with pytest.raises(AdapterMismatchError, match="another base model"):
        get_sparse_model(wider, SparseGradConfig(density=0.05), bases=bases)
    # a failed load leaves the model untouched and usable
    assert not any(type(m).__name__ == "SparseLinear" for m in wider.modules())
    assert all(p.requires_grad for p in wider.parameters())


def test_adapter_for_other_weights_of_the_same_shape(tmp_path):
    _, adapter, bases = _trained_adapter(tmp_path)
    torch.manual_seed(999)
    other = tiny_bert()  # same architecture, other weights
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        SparseModel.from_pretrained(other, adapter)
    with pytest.raises(AdapterMismatchError, match="calibrate"):
        get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05), bases=bases)


def test_corrupted_or_missing_adapter(tmp_path):
    base, adapter, _ = _trained_adapter(tmp_path)
    with pytest.raises(AdapterMismatchError, match="No adapter file"):
        SparseModel.from_pretrained(copy.deepcopy(base), tmp_path / "nowhere")
    path = adapter / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterMismatchError, match="checksum"):
        SparseModel.from_pretrained(copy.deepcopy(base), adapter)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(AdapterMismatchError, match="truncated or corrupted"):
        SparseModel.from_pretrained(copy.deepcopy(base), adapter)


def test_adapting_twice_and_wrong_config_type():
    model = get_sparse_model(tiny_bert(), SparseGradConfig(k=3))
    with pytest.raises(ConfigError, match="already adapted"):
        get_sparse_model(model.base_model, SparseGradConfig(k=3))
    with pytest.raises(ConfigError, match="SparseGradConfig"):
        get_sparse_model(tiny_bert(), {"density": 0.1})


def test_modules_to_save_must_exist():
    with pytest.raises(TargetError, match="modules_to_save"):
        get_sparse_model(tiny_bert(), SparseGradConfig(k=3, modules_to_save=["nonexistent_head"]))


def test_every_error_is_a_sparseft_error_and_value_error():
    for cls in (AdapterMismatchError, CalibrationError, ConfigError, NotCalibratedError, TargetError):
        assert issubclass(cls, SparseFTError) and issubclass(cls, ValueError)
