"""Bases from each layer's own weights (``basis_source="weights"``, as SVFT/PiSSA): W0 = U S Vᵀ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_bert

from sparseft import AdapterMismatchError, SparseGradConfig, SparseModel, get_sparse_model
from sparseft.layer import adapted_weight
from sparseft.methods import prepare
from sparseft.serialization import load_tensors
from sparseft.targets import weight_of
from sparseft.update.weight_bases import canonical_signs, weight_bases

BATCH = {"input_ids": torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 1, 0, 1])}


def _model(rotation: str = "narrow", **config) -> SparseModel:
    torch.manual_seed(0)
    return get_sparse_model(tiny_bert(), SparseGradConfig(match_lora_rank=2, basis_source="weights", rotation=rotation,
                                                          modules_to_save=["classifier"], **config))


def _train(model: SparseModel, steps: int = 3) -> SparseModel:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**BATCH).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_the_bases_are_the_singular_vectors_leading_first_with_fixed_signs() -> None:
    W = torch.randn(48, 20, generator=torch.Generator().manual_seed(1))
    U, V = weight_bases(W)
    assert U.shape == (48, 20) and V.shape == (20, 20)  # the narrow side's factor is square (complete)
    torch.testing.assert_close(U.T @ U, torch.eye(20), atol=1e-5, rtol=0)
    torch.testing.assert_close(V.T @ V, torch.eye(20), atol=1e-5, rtol=0)
    S = torch.linalg.svdvals(W)
    # diagonal: the singular values, largest first (the gradient bases' ordering); each side's
    # signs are fixed on its own, so a diagonal entry may be -σ
    core = U.T @ W @ V
    torch.testing.assert_close(core.abs(), torch.diag(S), atol=1e-4, rtol=0)
    flips = torch.tensor([1.0, -1.0] * 10)
    torch.testing.assert_close(canonical_signs(V * flips), V)  # whatever signs a solver returns


@pytest.mark.parametrize("rotation", ["narrow", "both"])
def test_no_calibration_pass_and_each_layer_its_own_bases(rotation) -> None:
    model = _model(rotation)
    assert model.is_calibrated and not prepare("sparsegrad[basis_source=weights]", tiny_bert(), rank=2).needs_calibration
    for name, layer in model.sparse_layers().items():
        assert layer.group.startswith(name + ":")  # one group per layer
        W0 = weight_of(layer.base_layer)
        U, V = weight_bases(W0)
        if "Q" in layer.basis.rotated_parts:
            torch.testing.assert_close(model.bases.full(layer.group, "Q"), V)
        if "P" in layer.basis.rotated_parts:
            torch.testing.assert_close(model.bases.full(layer.group, "P"), U)
        if rotation == "both":  # thin bases: the support stays in the span of W0
            assert layer.block == (min(layer.m, layer.n),) * 2


@pytest.mark.parametrize("rotation", ["narrow", "both"])
def test_the_value_gradient_is_the_dense_gradient_in_the_basis(rotation) -> None:
    model = _model(rotation)
    layer = model.base_model.bert.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        layer.param.normal_(0, 0.05)
    gen = torch.Generator().manual_seed(2)
    x, proj = torch.randn(5, layer.n, generator=gen), torch.randn(5, layer.m, generator=gen)
    (layer(x) * proj).sum().backward()
    ours = layer.param.grad.clone()
    layer.param.grad = None
    W = weight_of(layer.base_layer) + layer.delta_weight()
    (F.linear(x, W, layer.base_layer.bias) * proj).sum().backward()
    torch.testing.assert_close(ours, layer.param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rotation", ["narrow", "both"])
def test_saved_without_bases_and_round_trips(rotation, tmp_path, monkeypatch) -> None:
    model = _train(_model(rotation))
    with torch.no_grad():
        want = model(**BATCH).logits
    model.save_pretrained(tmp_path / "a")
    tensors, meta = load_tensors(tmp_path / "a" / "adapter_model.safetensors")
    assert not meta["bases_included"] and not [k for k in tensors if k.startswith("bases.")]
    torch.manual_seed(0)
    loaded = SparseModel.from_pretrained(tiny_bert(), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**BATCH).logits, want, rtol=0, atol=1e-6)
    # merge and export: the same function
    layer = loaded.base_model.bert.encoder.layer[1].output.dense
    merged_weight = adapted_weight(layer)
    plain = loaded.merge_and_unload()
    torch.testing.assert_close(plain.bert.encoder.layer[1].output.dense.weight, merged_weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain(**BATCH).logits, want, rtol=0, atol=1e-5)
    # a solver that returned other bases is caught by the corner the file keeps
    import sparseft.model as M

    monkeypatch.setattr(M, "weight_bases", lambda W: tuple(-b for b in weight_bases(W)))
    torch.manual_seed(0)
    with pytest.raises(AdapterMismatchError, match="recomputed from its weights differ"):
        SparseModel.from_pretrained(tiny_bert(), tmp_path / "a")


def test_export_to_peft_lora_is_exact(tmp_path) -> None:
    from peft import PeftModel

    model = _train(_model("narrow"))
    with torch.no_grad():
        want = model(**BATCH).logits
    model.export_lora(tmp_path / "lora")
    torch.manual_seed(0)
    peft_model = PeftModel.from_pretrained(tiny_bert(), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**BATCH).logits, want, rtol=0, atol=1e-5)
