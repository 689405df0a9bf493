"""Loaded adapters kept in their own form (values, support, basis references), not as B·A."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert

from sparseft import MePropConfig, SparseGradConfig, SparseModel, get_sparse_model
from sparseft.loaded import LowRankUpdate, SparseFactors

BATCH = {"input_ids": torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([0, 1, 0, 1])}
CONFIGS = {
    "default (narrow side rotated)": SparseGradConfig(match_lora_rank=2),
    "both sides rotated": SparseGradConfig(match_lora_rank=2, rotation="both"),
    "calibrated support": SparseGradConfig(match_lora_rank=2, support_criterion="abs-sum"),
    "dynamic": SparseGradConfig(match_lora_rank=2, selection="dynamic"),
    "MeProp (identity)": MePropConfig(match_lora_rank=2, selection="fixed"),
    "weights' bases": SparseGradConfig(match_lora_rank=2, basis_source="weights"),
}


def _saved(config, folder, seed: int = 1) -> SparseModel:
    torch.manual_seed(0)
    model = get_sparse_model(tiny_bert(), config)
    if not model.is_calibrated:
        model.calibrate([BATCH], steps=1, show_progress=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            if layer.selection == "dynamic":  # a dynamic delta keeps what training touched: k entries
                flat = torch.zeros(layer.param.numel())
                flat[torch.randperm(flat.numel(), generator=gen)[:layer.k]] = 0.05 * torch.randn(layer.k, generator=gen)
                layer.param.copy_(flat.view_as(layer.param))
            else:
                layer.param.copy_(0.05 * torch.randn(layer.param.shape, generator=gen))
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_loaded_update_computes_the_adapters_own_update(name, tmp_path) -> None:
    own = _saved(CONFIGS[name], tmp_path / "a")
    torch.manual_seed(0)
    host = get_sparse_model(tiny_bert(), SparseGradConfig(match_lora_rank=2, basis_source="weights"))
    host.load_adapter(tmp_path / "a", "loaded")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    for layer_name, layer in own.sparse_layers().items():
        update = host.base_model.get_submodule(layer_name).extra_updates["loaded"]
        assert isinstance(update, SparseFactors)
        xin = x[..., : layer.n]
        with torch.no_grad():
            want = torch.nn.functional.linear(xin, layer.delta_weight())
        torch.testing.assert_close(update(xin), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(update.delta_weight(), layer.delta_weight().detach(), rtol=1e-5, atol=1e-6)
    host.set_adapter("loaded")
    host.eval()
    with torch.no_grad():
        torch.testing.assert_close(host(**BATCH).logits, own(**BATCH).logits, rtol=1e-5, atol=1e-5)


def test_memory_is_the_values_and_their_index_and_shared_bases_are_held_once(tmp_path) -> None:
    """As B·A a one-sided update of rank ~300 took 38× LoRA's memory; its own form takes the k
    values, one int32 column per value and a row pointer, and bases only the first holder counts."""
    config = SparseGradConfig(match_lora_rank=2, basis_source="weights")
    for i in range(2):
        _saved(config, tmp_path / f"a{i}", seed=i + 1)
    torch.manual_seed(0)
    host = get_sparse_model(tiny_bert(), config)  # its own bases: the same W0, the same SVD
    host.load_adapter(tmp_path / "a0", "first")
    host.load_adapter(tmp_path / "a1", "second")
    for layer in host.sparse_layers().values():
        first, second = layer.extra_updates["first"], layer.extra_updates["second"]
        for mine, theirs in zip(first.basis_tensors(), second.basis_tensors()):
            assert mine is theirs and any(mine is t for t in host.bases.held())  # one tensor for all three
        assert first.owned == second.owned == set()
        k = layer.k
        assert second.col.dtype == torch.int16  # a value and 2 bytes of column per entry, and a row pointer per row
        assert second.nbytes() == 4 * k + 2 * k + 4 * (second.shape[0] + 1) + sum(
            t.numel() * t.element_size() for t in (second.rows, second.cols) if t is not None)
    torch.manual_seed(0)
    own = SparseModel.from_pretrained(tiny_bert(), tmp_path / "a1")
    for name, layer in own.sparse_layers().items():
        as_product = LowRankUpdate(*layer.lora_factors(), torch.float32).nbytes()
        assert host.base_model.get_submodule(name).extra_updates["second"].nbytes() < as_product


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_own_adapter_infers_through_its_sparse_form(name, tmp_path) -> None:
    """Without gradients (generation, evaluation) a layer adds its update in the sparse form
    beside the base layer when that costs less than merging (a few tokens), built once per state
    of its values: the same outputs as the training-time forward."""
    model = _saved(CONFIGS[name], tmp_path / "a")
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))  # one token, as a generation step
    sparse_form = 0
    for layer in model.sparse_layers().values():
        xin = x[..., : layer.n].clone().requires_grad_(True)
        want = layer(xin).detach()  # the training-time forward (gradients on)
        with torch.no_grad():
            got = layer(xin.detach())
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if not layer._merge_pays(1):  # (a cached merge, or a free one for identity bases, is cheaper still)
            sparse_form += 1
            factors = layer.__dict__["_factors"][1]
            with torch.no_grad():
                layer(xin.detach())
                assert layer.__dict__["_factors"][1] is factors  # built once
                layer.param.mul_(2)  # a new state of the values: built again
                layer(xin.detach())
            assert layer.__dict__["_factors"][1] is not factors
    assert sparse_form or name in ("dynamic", "MeProp (identity)")


def _alone(model, ids, names) -> torch.Tensor:
    rows = []
    for i, adapter in enumerate(names):
        if adapter == "__base__":
            with model.disable_adapter():
                rows.append(model(input_ids=ids[i:i + 1]).logits)
        else:
            model.set_adapter(adapter)
            rows.append(model(input_ids=ids[i:i + 1]).logits)
    model.set_adapter("default")
    return torch.cat(rows)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_mixed_batch_equals_each_row_alone_and_shared_bases_rotate_once(name, tmp_path, monkeypatch) -> None:
    """Rows of the own adapter, two loaded ones (and the base) in one batch: each row as if alone.
    Adapters holding the same basis (bases from the weights: all three) rotate their rows in one
    product per layer side, not one per adapter."""
    config = CONFIGS[name]
    own = _saved(config, tmp_path / "own", seed=1)
    for i in (2, 3):
        _saved(config, tmp_path / f"a{i}", seed=i)
    own.load_adapter(tmp_path / "a2", "a2")
    own.load_adapter(tmp_path / "a3", "a3")
    calls = {"in": 0, "out": 0}
    into, out = SparseFactors._into, SparseFactors._out
    monkeypatch.setattr(SparseFactors, "_into", lambda f, t: calls.__setitem__("in", calls["in"] + (f.Q is not None)) or into(f, t))
    monkeypatch.setattr(SparseFactors, "_out", lambda f, u: calls.__setitem__("out", calls["out"] + (f.P is not None)) or out(f, u))
    rotated = sum(len(layer.basis.rotated_parts) for layer in own.sparse_layers().values())
    for names in (["default", "a2", "__base__", "a3", "a2", "default"], ["a3", "default", "a2", "a2"]):  # some rows, every row
        ids = torch.randint(0, 97, (len(names), 8), generator=torch.Generator().manual_seed(len(names)))
        with torch.no_grad():
            alone = _alone(own, ids, names)
            calls.update({"in": 0, "out": 0})
            mixed = own(input_ids=ids, adapter_names=names).logits
        torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
        if name == "weights' bases":  # one rotation per rotated side of each layer for the three adapters
            assert calls["in"] + calls["out"] == rotated


def test_in_a_mixed_batch_the_own_adapter_adds_its_sparse_form_beside_the_base_pass(tmp_path) -> None:
    """The base layer has run over every row already: the own adapter's rows then get its sparse
    form added (k per row without rotation), not a merged W0 + ΔW and a second dense pass, even
    where a merge would be chosen for the adapter alone."""
    own = _saved(CONFIGS["dynamic"], tmp_path / "own")  # dynamic selection caches its merged weight
    with torch.no_grad():
        for layer in own.sparse_layers().values():
            assert layer.cache_update and layer.inference_factors(8) is None  # alone: the cached merge
            assert isinstance(layer._sparse_form("default", 8 * layer.n), SparseFactors)  # beside the base pass
    identity = _saved(CONFIGS["MeProp (identity)"], tmp_path / "identity")
    with torch.no_grad():  # no rotation: k per row, never a merge (forming W0 + ΔW costs m·n)
        assert all(isinstance(layer.inference_factors(1), SparseFactors) for layer in identity.sparse_layers().values())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["default (narrow side rotated)", "MeProp (identity)"])
def test_a_half_precision_model_infers_through_its_sparse_form_on_the_cpu(name, dtype, tmp_path) -> None:
    """A bf16/fp16 model on the CPU generating (one token, no gradients) takes the sparse form,
    whose CSR product the CPU has no half-precision kernel for (it raised NotImplementedError):
    the product runs in float32 there, and the layer answers as its training-time forward does."""
    model = _saved(CONFIGS[name], tmp_path / "a").to(dtype)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(4)).to(dtype)
    took = 0
    for layer in model.sparse_layers().values():
        if layer._merge_pays(1):
            continue
        took += 1
        xin = x[..., : layer.n]
        want = layer(xin.clone().requires_grad_(True)).detach()
        with torch.no_grad():
            got = layer(xin)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert took
