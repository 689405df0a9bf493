"""Several adapters on one base model, as in peft: load_adapter / set_adapter / delete_adapter,
per-adapter heads, disable_adapter, merge of the active adapter, and mixed batches
(``adapter_names=``) in forward and generate, on a tiny BERT classifier and a tiny LLaMA."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import make_batch, make_batches, tiny_bert, tiny_llama
from sparseft import AdapterMismatchError, ConfigError, InputError, S2FTConfig, S2FTModel, SparseGradConfig, SparseModel
from sparseft import get_s2ft_model, get_sparse_model
from sparseft.tuner import ADAPTER_FILE, BaseTunerLayer

BUILD = {"bert": tiny_bert, "llama": tiny_llama}
ATOL = 1e-5


def _base(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    return BUILD[arch]().eval()


def _adapter(arch: str, kind: str, seed: int, base_seed: int = 0):
    """``kind`` ("fixed" SparseGrad or "s2ft") on the base of ``base_seed``, with random values
    and head drawn from ``seed`` (a different support/channels per seed too)."""
    model = _base(arch, base_seed)
    if kind == "s2ft":
        tuner = get_s2ft_model(model, S2FTConfig(match_lora_rank=2, seed=seed))
    else:
        tuner = get_sparse_model(model, SparseGradConfig(match_lora_rank=2, support_criterion="abs-sum"))
        tuner.calibrate(make_batches(arch, 2, start=10 * seed), steps=2, show_progress=False)
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for layer in tuner.adapted_layers().values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for head in tuner.heads:
            for p in tuner.base_model.get_submodule(head).parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return tuner.eval()


@pytest.fixture
def served(tmp_path):
    """Per arch: a SparseGrad model ("default") with a SparseGrad adapter "a" and an S2FT adapter
    "b" loaded next to it, and their folders."""

    def build(arch: str):
        dirs = {"a": tmp_path / f"{arch}-a", "b": tmp_path / f"{arch}-b"}
        _adapter(arch, "fixed", 1).save_pretrained(dirs["a"])
        _adapter(arch, "s2ft", 2).save_pretrained(dirs["b"])
        model = _adapter(arch, "fixed", 0)
        model.load_adapter(dirs["a"], "a")
        model.load_adapter(dirs["b"], "b")
        return model, dirs

    return build


def _logits(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def _alone(model, batch, i: int, adapter: str) -> torch.Tensor:
    """Row i run alone with ``adapter`` set ("__base__": inside disable_adapter)."""
    row = {k: v[i : i + 1] for k, v in batch.items()}
    if adapter == "__base__":
        with model.disable_adapter():
            return _logits(model, row)
    before = model.active_adapter
    model.set_adapter(adapter)
    try:
        return _logits(model, row)
    finally:
        model.set_adapter(before)


NAMES = ["a", "__base__", "default", "b", "a", "b"]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_mixed_batch_equals_each_row_alone(arch: str, served) -> None:
    model, _ = served(arch)
    assert model.adapter_names == ["default", "a", "b"] and model.active_adapter == "default"
    batch = make_batch(arch, 7, batch=len(NAMES))
    mixed = _logits(model, batch, adapter_names=NAMES)
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(mixed[i : i + 1], _alone(model, batch, i, name), atol=ATOL, rtol=0)
    # the adapters really differ on the same input (else the test above proves nothing)
    same_row = {k: v[:1].expand(4, *v.shape[1:]) for k, v in batch.items()}
    outs = _logits(model, same_row, adapter_names=["default", "a", "b", "__base__"])
    assert min(float((outs[i] - outs[j]).abs().max()) for i in range(4) for j in range(i)) > 1e-3
    # the active adapter does not change what a named row computes ("__base__" rows keep the
    # active adapter's heads, as disable_adapter does: the same for a model without heads)
    model.set_adapter("b")
    again = _logits(model, batch, adapter_names=NAMES)
    named = [i for i, name in enumerate(NAMES) if name != "__base__" or not model.heads]
    torch.testing.assert_close(again[named], mixed[named], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_set_adapter_gives_the_model_loaded_with_that_adapter_alone(arch: str, served) -> None:
    model, dirs = served(arch)
    batch = make_batch(arch, 8)
    own = _logits(model, batch)
    for name, cls in [("a", SparseModel), ("b", S2FTModel)]:
        alone = cls.from_pretrained(_base(arch), dirs[name]).eval()
        model.set_adapter(name)
        assert model.active_adapter == name and model.active_adapters == [name]
        got = _logits(model, batch)
        torch.testing.assert_close(got, _logits(alone, batch), atol=ATOL, rtol=0)
        weights = {n: layer.base_layer.weight.clone() for n, layer in model.adapted_layers().items()}
        model.merge_adapter()  # merges the active adapter
        torch.testing.assert_close(_logits(model, batch), got, atol=ATOL, rtol=0)
        model.unmerge_adapter()
        for n, layer in model.adapted_layers().items():
            torch.testing.assert_close(layer.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    model.set_adapter("default")
    torch.testing.assert_close(_logits(model, batch), own, atol=ATOL, rtol=0)  # merge/unmerge rounded the weights


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_disable_adapter_is_the_base_model_and_restores_the_active_one(arch: str, served) -> None:
    model, _ = served(arch)
    batch = make_batch(arch, 9)
    base = _base(arch)
    model.set_adapter("b")
    active = _logits(model, batch)
    if arch == "bert":  # heads stay as the active adapter's (as sparseft's disable_adapter always did)
        base.classifier.load_state_dict(model.base_model.classifier.state_dict())
    with model.disable_adapter():
        disabled = _logits(model, batch)
    assert torch.equal(disabled, _logits(base, batch))
    assert model.active_adapter == "b"
    assert torch.equal(_logits(model, batch), active)


def test_generate_with_adapter_names_equals_each_prompt_alone(served) -> None:
    model, _ = served("llama")
    names = ["a", "default", "__base__", "b"]
    prompts = make_batch("llama", 11, batch=len(names), length=6)
    prompts.pop("labels")
    settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    for extra in ({}, {"num_beams": 2}):
        with torch.no_grad():
            mixed = model.generate(**prompts, adapter_names=names, **settings, **extra)
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in prompts.items()}
            with torch.no_grad():
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model.generate(**row, **settings, **extra)
                else:
                    model.set_adapter(name)
                    alone = model.generate(**row, **settings, **extra)
                    model.set_adapter("default")
            assert torch.equal(mixed[i : i + 1], alone), (name, extra)
        assert len({tuple(r.tolist()) for r in mixed}) > 1  # the adapters steer generation apart


def test_misuse_gives_clear_errors(served, tmp_path) -> None:
    model, dirs = served("bert")
    batch = make_batch("bert", 3, batch=2)
    with pytest.raises(InputError, match="unknown adapter"):
        _logits(model, batch, adapter_names=["a", "nope"])
    with pytest.raises(InputError, match="2 rows"):
        _logits(model, batch, adapter_names=["a", "b", "a"])
    with pytest.raises(InputError, match="list of adapter names"):
        _logits(model, batch, adapter_names="a")
    # peft's merge_adapter(adapter_names=): the active adapter only, each other name refused before any merge
    for names, says in ((["a"], "merges the active adapter"), (["default", "b"], "merges the active adapter"),
                        (["c"], "no adapter 'c'")):
        with pytest.raises(ConfigError, match=says):
            model.merge_adapter(adapter_names=names)
        assert not any(layer.merged for layer in model.adapted_layers().values())
    model.merge_adapter(adapter_names=["default"])
    model.unmerge_adapter()
    model.merge_adapter()
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        _logits(model, batch, adapter_names=["a", "b"])
    with pytest.raises(ConfigError, match="unmerge_adapter"):
        model.set_adapter("a")
    model.unmerge_adapter()
    model.train()
    with pytest.raises(ConfigError, match="eval"):
        _logits(model, batch, adapter_names=["a", "b"])
    model.set_adapter("a")
    with pytest.raises(ConfigError, match="inference only"):
        model(**batch)
    model.eval()
    with pytest.raises(ConfigError, match="active adapter"):
        model.delete_adapter("a")
    with pytest.raises(ConfigError, match="cannot be deleted"):
        model.delete_adapter("default")
    with pytest.raises(ConfigError, match="already loaded"):
        model.load_adapter(dirs["b"], "b")
    with pytest.raises(ConfigError, match="No adapter named"):
        model.set_adapter("c")
    model.set_adapter("default")
    model.delete_adapter("a")
    assert model.adapter_names == ["default", "b"]
    assert all("a" not in layer.extra_updates for layer in model.adapted_layers().values())
    with pytest.raises(InputError, match="unknown adapter"):
        _logits(model, batch, adapter_names=["a", "b"])
    # save_pretrained writes the model's own adapter, whichever is active
    want = _logits(model, batch)
    model.set_adapter("b")
    model.save_pretrained(tmp_path / "own")
    torch.testing.assert_close(_logits(SparseModel.from_pretrained(_base("bert"), tmp_path / "own").eval(), batch), want,
                               atol=ATOL, rtol=0)


def _state(model) -> tuple:
    return (model.adapter_names, model.active_adapter, [type(m) for m in model.modules()],
            {n: p.requires_grad for n, p in model.named_parameters()})


def test_a_bad_folder_fails_clearly_and_leaves_the_loaded_adapters_working(served, tmp_path, monkeypatch) -> None:
    model, dirs = served("bert")
    batch = make_batch("bert", 5, batch=len(NAMES))
    before, state = _logits(model, batch, adapter_names=NAMES), _state(model)

    corrupted = tmp_path / "corrupted"
    shutil.copytree(dirs["a"], corrupted)
    raw = bytearray((corrupted / ADAPTER_FILE).read_bytes())
    raw[-8:] = bytes(8)  # zero the last bytes of the tensor data
    (corrupted / ADAPTER_FILE).write_bytes(bytes(raw))
    exported = tmp_path / "peft-export"
    _adapter("bert", "fixed", 3).export_lora(exported)
    other_base = tmp_path / "other-base"
    _adapter("bert", "fixed", 4, base_seed=5).save_pretrained(other_base)
    other_head = tmp_path / "other-head"
    torch.manual_seed(0)  # the same base weights (adapters are fingerprinted), another head
    get_s2ft_model(tiny_bert(num_labels=3), S2FTConfig(match_lora_rank=2)).save_pretrained(other_head)
    cases = [(corrupted, "checksum|corrupted"), (exported, "peft LoRA export"), (tmp_path / "missing", "No adapter file"),
             (other_base, "other base weights"), (other_head, "num_labels")]
    for folder, message in cases:
        with pytest.raises(AdapterMismatchError, match=message):
            model.load_adapter(folder, "c")
        assert _state(model) == state
        torch.testing.assert_close(_logits(model, batch, adapter_names=NAMES), before, atol=0, rtol=0)

    # a failure after the temporary layers were injected: this model's layers come back
    def broken(self, tensors, meta, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(S2FTModel, "_load_adapter_tensors", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        model.load_adapter(dirs["b"], "c")
    assert _state(model) == state
    assert sum(isinstance(m, BaseTunerLayer) for m in model.modules()) == len(model.adapted_layers())
    torch.testing.assert_close(_logits(model, batch, adapter_names=NAMES), before, atol=0, rtol=0)
