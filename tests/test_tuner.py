"""The shared tuner life cycle (sparseft.tuner) for every method: merge/unmerge, disable,
unload, verified loading that leaves the model untouched, and a new method added in one file."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import pytest
import torch
from torch import nn

from conftest import adapted, make_batch, tiny_bert
from sparseft import AdapterMismatchError, InputError, SparseModel
from sparseft.methods import REGISTRY, Budget, Prepared, prepare, register_method
from sparseft.s2ft import S2FTModel
from sparseft.targets import find_targets
from sparseft.tuner import BaseTuner, BaseTunerLayer, unwrap_model


def _trained(kind: str, seed: int = 0):
    """A tiny BERT adapted by ``kind``, with a non-zero update and a moved head."""
    tuner = adapted("bert", kind, seed, calibrate=kind != "meprop")
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in tuner.adapted_layers().values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name in tuner.heads:
            for p in tuner.base_model.get_submodule(name).parameters():
                p.add_(0.1)
    return tuner.eval()


KINDS = ["fixed", "dynamic", "meprop", "s2ft"]


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_adapter_keeps_outputs_and_restores_weights(kind: str) -> None:
    tuner = _trained(kind)
    batch = make_batch("bert", 7)
    with torch.no_grad():
        adapted = tuner(**batch).logits
        weights = {n: layer.base_layer.weight.clone() for n, layer in tuner.adapted_layers().items()}
        tuner.merge_adapter()
        assert all(layer.merged for layer in tuner.adapted_layers().values())
        torch.testing.assert_close(tuner(**batch).logits, adapted, atol=1e-5, rtol=1e-5)
        moved = sum(float((layer.base_layer.weight - weights[n]).abs().max()) for n, layer in tuner.adapted_layers().items())
        assert moved > 0  # the update is in the weights now
        tuner.unmerge_adapter()
        for n, layer in tuner.adapted_layers().items():
            torch.testing.assert_close(layer.base_layer.weight, weights[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(tuner(**batch).logits, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_merge_arguments_merge_the_same_and_safe_merge_refuses_a_broken_adapter(kind: str) -> None:
    """peft's ``merge_and_unload(progressbar=, safe_merge=, adapter_names=)`` and
    ``merge_adapter(adapter_names=, safe_merge=)``: code written for peft calls them. A finite
    adapter merges as without them; a non-finite one is refused before any weight keeps it."""
    plain = _trained(kind).merge_and_unload().state_dict()
    peft_style = _trained(kind).merge_and_unload(progressbar=True, safe_merge=True, adapter_names=["default"]).state_dict()
    assert plain.keys() == peft_style.keys() and all(torch.equal(plain[k], peft_style[k]) for k in plain)

    tuner = _trained(kind)
    weights = {n: layer.base_layer.weight.clone() for n, layer in tuner.adapted_layers().items()}
    broken, last = list(tuner.adapted_layers().items())[-1]
    with torch.no_grad():
        for param in last.adapter_parameters():
            param.view(-1)[0] = float("nan")
    with pytest.raises(InputError, match=f"{broken}: NaNs or infs in the merged weights"):
        tuner.merge_adapter(safe_merge=True)
    assert not any(layer.merged for layer in tuner.adapted_layers().values())
    for n, layer in tuner.adapted_layers().items():  # the layers merged before it are unmerged again
        torch.testing.assert_close(layer.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="seems to be broken"):
        tuner.merge_and_unload(safe_merge=True)
    tuner.merge_adapter()  # (unsafe, as in peft: the NaN goes in)
    assert not bool(torch.isfinite(last.base_layer.weight).all())


@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_is_the_base_model_and_unload_returns_it(kind: str) -> None:
    tuner = _trained(kind)
    batch = make_batch("bert", 8)
    with torch.no_grad():
        adapted = tuner(**batch).logits
        with tuner.disable_adapter():
            disabled = tuner(**batch).logits
        assert not torch.allclose(disabled, adapted)
        torch.testing.assert_close(tuner(**batch).logits, adapted)  # enabled again after the block
        tuner.disable_adapter_layers()  # peft's lasting form, and its get_base_model()
        torch.testing.assert_close(tuner(**batch).logits, disabled)
        torch.testing.assert_close(tuner.get_base_model()(**batch).logits, disabled)
        tuner.enable_adapter_layers()
        torch.testing.assert_close(tuner.get_base_model()(**batch).logits, adapted)
        assert tuner.get_base_model() is tuner.base_model
        plain = tuner.unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
        torch.testing.assert_close(plain(**batch).logits, disabled)


@pytest.mark.parametrize("kind", ["fixed", "s2ft"])
def test_failed_load_leaves_the_model_untouched(kind: str, tmp_path) -> None:
    """A head of another size (num_labels=3) is named in the error and nothing is changed."""
    tuner = _trained(kind)
    tuner.save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = tiny_bert(num_labels=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    modules_before = [type(m) for m in other.modules()]
    cls = S2FTModel if kind == "s2ft" else SparseModel
    with pytest.raises(AdapterMismatchError, match="num_labels"):
        cls.from_pretrained(other, tmp_path)
    assert [type(m) for m in other.modules()] == modules_before
    after = other.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_unwrap_model_sees_through_wrappers() -> None:
    tuner = _trained("fixed")

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert unwrap_model(Wrapper(Wrapper(tuner)), SparseModel) is tuner
    assert unwrap_model(Wrapper(nn.Linear(2, 2)), SparseModel) is None
    dp = nn.DataParallel(tuner)
    assert unwrap_model(dp) is tuner and unwrap_model(tuner) is tuner  # cls=None: strip DDP-style wrappers only


# ----------------------------------------------------------------------------- a method in one file
@dataclass
class ScaleConfig:
    """A toy method: train one scale per output row of each MLP layer (W = diag(1 + s) W0)."""

    target_modules: list[str] | None = None
    modules_to_save: list[str] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ScaleLinear(BaseTunerLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.scale = nn.Parameter(torch.zeros(self.m))

    def delta_weight(self) -> torch.Tensor:
        return self.scale[:, None] * self.base_layer.weight

    def update_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + nn.functional.linear(x, self.delta_weight())


class ScaleModel(BaseTuner):
    adapter_kind = "scale-adapter"
    layer_class = ScaleLinear
    config_class = ScaleConfig

    def _create_layers(self, model: nn.Module):
        for t in find_targets(model, self.tuner_config.target_modules):
            yield t.name, ScaleLinear(model.get_submodule(t.name))

    def _adapter_tensors(self):
        return {f"layers.{n}.scale": layer.scale for n, layer in self.adapted_layers().items()}, {}

    @torch.no_grad()
    def _load_adapter_tensors(self, tensors, meta, **_):
        for n, layer in self.adapted_layers().items():
            layer.scale.copy_(tensors[f"layers.{n}.scale"])


def _build_scale(model: nn.Module, budget: Budget) -> Prepared:
    tuner = ScaleModel.wrap(model, ScaleConfig())
    opt = lambda lr: torch.optim.AdamW([p for p in tuner.parameters() if p.requires_grad], lr=lr)  # noqa: E731
    return Prepared(tuner, opt, False, tuner.get_nb_trainable_parameters()[0])


def test_a_new_method_is_a_config_a_layer_and_a_registration(tmp_path) -> None:
    from sparseft.methods import Method

    register_method(Method("toy-scale", "one scale per MLP output row", _build_scale, {"classification": 1e-2}))
    try:
        torch.manual_seed(0)
        prepared = prepare("toy-scale", tiny_bert())
        tuner = prepared.model
        rows = sum(layer.m for layer in tuner.adapted_layers().values())
        head = sum(p.numel() for p in tuner.base_model.classifier.parameters())
        assert prepared.trainable_params == rows + head
        opt = prepared.make_optimizer(1e-2)
        for i in range(3):
            tuner(**make_batch("bert", i)).loss.backward()
            opt.step()
            opt.zero_grad()
        batch = make_batch("bert", 9)
        tuner.eval()
        with torch.no_grad():
            trained = tuner(**batch).logits
        tuner.save_pretrained(tmp_path)
        torch.manual_seed(0)
        again = ScaleModel.from_pretrained(tiny_bert().eval(), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(again(**batch).logits, trained)
            torch.testing.assert_close(copy.deepcopy(again).merge_and_unload()(**batch).logits, trained, atol=1e-5, rtol=1e-5)
    finally:
        REGISTRY.pop("toy-scale")
