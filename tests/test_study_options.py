"""The study's knobs: per-layer bases (``shared_bases=False``) and the training options a method
variant may set (``calibration_steps``, ``warmup_fraction``, the config's ``reselect_every``)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import assert_save_load_merge_round_trip, make_batches, tiny_bert
from sparseft import SparseGradConfig, SparseModel, get_sparse_model
from sparseft.errors import AdapterMismatchError, ConfigError
from sparseft.methods import prepare, training_options

LAYER0 = "bert.encoder.layer.0.intermediate.dense"


def _calibrated(config: SparseGradConfig, seed: int = 0) -> SparseModel:
    torch.manual_seed(seed)
    tuner = get_sparse_model(tiny_bert().eval(), config)
    tuner.calibrate(make_batches("bert", 3), steps=3, show_progress=False)
    return tuner


def _rotated(tuner: SparseModel, name: str) -> torch.Tensor:
    layer = tuner.sparse_layers()[name]
    side = layer.basis.rotated_parts[0]
    return tuner.bases.full(layer.group, side)


def test_per_layer_bases_give_each_layer_its_own_group_and_basis() -> None:
    shared = _calibrated(SparseGradConfig(match_lora_rank=2))
    own = _calibrated(SparseGradConfig(match_lora_rank=2, shared_bases=False))
    layers = own.sparse_layers()
    assert len(shared.bases.groups) == 2 and len(own.bases.groups) == len(layers) == 4
    assert len({layer.group for layer in layers.values()}) == 4
    # the two up-projections share one basis in the shared model and have different ones here
    a, b = _rotated(own, LAYER0), _rotated(own, LAYER0.replace(".0.", ".1."))
    assert not torch.allclose(a.abs(), b.abs(), atol=1e-3)
    assert torch.equal(_rotated(shared, LAYER0), _rotated(shared, LAYER0.replace(".0.", ".1.")))


def test_per_layer_basis_is_the_layers_own_hosvd() -> None:
    """Metamorphic: a layer's own basis equals the shared basis of a group holding that layer alone."""
    own = _calibrated(SparseGradConfig(match_lora_rank=2, shared_bases=False))
    alone = _calibrated(SparseGradConfig(match_lora_rank=2, target_modules=[LAYER0]))
    torch.testing.assert_close(_rotated(own, LAYER0).abs(), _rotated(alone, LAYER0).abs(), atol=1e-5, rtol=0)


def test_per_layer_bases_save_load_and_merge_round_trip(tmp_path) -> None:
    tuner = _calibrated(SparseGradConfig(match_lora_rank=2, shared_bases=False))
    torch.manual_seed(0)
    loaded = assert_save_load_merge_round_trip(tuner, tiny_bert().eval(), tmp_path)
    assert loaded.sparse_config.shared_bases is False
    # a shared-bases model cannot take per-layer bases: the groups differ, and it says so
    tuner.save_bases(tmp_path / "bases")
    torch.manual_seed(0)
    shared = get_sparse_model(tiny_bert().eval(), SparseGradConfig(match_lora_rank=2))
    with pytest.raises(AdapterMismatchError, match="no basis for layer group"):
        shared.load_bases(tmp_path / "bases")


def test_shared_bases_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="shared_bases"):
        SparseGradConfig(shared_bases="no")


def test_training_options_are_checked_and_kept_out_of_the_config() -> None:
    assert training_options("sparsegrad[calibration_steps=4;warmup_fraction=0.2;support_narrow=8]") == {
        "calibration_steps": 4, "warmup_fraction": 0.2}
    prepared = prepare("sparsegrad[calibration_steps=4;shared_bases=false]", tiny_bert(), rank=2)
    assert prepared.sparse.sparse_config.shared_bases is False  # config options still reach the config
    prepare("lora-mlp[warmup_fraction=0.1]", tiny_bert(), rank=2)  # every method takes training options
    for bad in ("sparsegrad[calibration_steps=0]", "sparsegrad[calibration_steps=2.5]", "sparsegrad[warmup_fraction=1]",
                "sparsegrad[warmup_fraction=true]"):
        with pytest.raises(ConfigError, match="calibration_steps|warmup_fraction"):
            prepare(bad, tiny_bert(), rank=2)
    with pytest.raises(ConfigError, match="takes no config"):
        prepare("lora-mlp[calibration_steps=4;r=2]", tiny_bert(), rank=2)


def test_a_variant_may_carry_its_own_default_rate() -> None:
    """``lr`` in a variant sets its default rate (the suite's centre, `sparseft train`'s default);
    without it a variant starts at its method's."""
    from sparseft.app.suite import SuiteSettings
    from sparseft.methods import DEFAULT_LR, variant_lr

    random_identity = "meprop-fixed[support_criterion=random;lr=0.009]"
    assert training_options(random_identity) == {"lr": 0.009}
    assert variant_lr(random_identity, "suite-peft") == 0.009 == DEFAULT_LR[random_identity]
    assert SuiteSettings(regime="paper").centre(random_identity) == 0.009
    assert SuiteSettings().centre("meprop-fixed[support_criterion=random]") == variant_lr("meprop-fixed", "suite-peft") == 3e-3
    prepared = prepare(random_identity, tiny_bert(), rank=2)  # the option stays out of the config
    assert prepared.sparse.sparse_config.support_criterion == "random"
    for bad in ("lr=0", "lr=-1e-3", "lr=inf", "lr=true", "lr=fast"):
        with pytest.raises(ConfigError, match="lr must be"):
            training_options(f"sparsegrad[{bad}]")


def _train_data(rows: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 97, (rows, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (rows,), generator=g)}


def _fit(method: str, monkeypatch, steps: int = 6):
    from sparseft.app import train as train_module

    seen: dict = {"calibration_steps": None, "warmup_steps": None, "reselections": 0}
    prepared = prepare(method, tiny_bert(), rank=2)
    calibrate = prepared.sparse.calibrate
    reselect = prepared.sparse.reselect_support

    def spy_calibrate(batches, steps, **kwargs):
        seen["calibration_steps"] = steps
        return calibrate(batches, steps=steps, **kwargs)

    def spy_reselect(*args, **kwargs):
        seen["reselections"] += 1
        return reselect(*args, **kwargs)

    schedule = train_module.get_linear_schedule_with_warmup

    def spy_schedule(optimizer, warmup, total):
        seen["warmup_steps"] = warmup
        return schedule(optimizer, warmup, total)

    monkeypatch.setattr(prepared.sparse, "calibrate", spy_calibrate)
    monkeypatch.setattr(prepared.sparse, "reselect_support", spy_reselect)
    monkeypatch.setattr(train_module, "get_linear_schedule_with_warmup", spy_schedule)
    train_module.fit(prepared, _train_data(), lr=1e-3, method=method, steps=steps, seed=0, batch_size=4,
                     calibration_steps=3, warmup_fraction=0.0, loss_every=2, show_progress=False)
    return seen


def test_fit_applies_a_variants_training_options(monkeypatch) -> None:
    assert _fit("sparsegrad", monkeypatch) == {"calibration_steps": 3, "warmup_steps": 0, "reselections": 0}
    seen = _fit("sparsegrad[calibration_steps=5;warmup_fraction=0.5;reselect_every=2]", monkeypatch)
    # reselection after steps 2 and 4 (never after the last step)
    assert seen == {"calibration_steps": 5, "warmup_steps": 3, "reselections": 2}


def test_the_registry_says_which_methods_reselect():
    """`--reselect-every` reaches the fixed-support SparseGrad methods only (the app asks the registry)."""
    from sparseft.methods import REGISTRY, method_spec

    assert {n for n, m in REGISTRY.items() if m.reselects} == {"sparsegrad-fixed", "sparsegrad-random", "sparsegrad-onesided"}
    assert method_spec("sparsegrad[support_narrow=8]").reselects and not method_spec("shira").reselects


def test_identity_bases_with_a_random_support_need_no_calibration_pass(tmp_path) -> None:
    """Identity × random (the study's cell beside peft's SHiRA) is ready at construction, with the
    support a calibration pass would have drawn, and saves and loads like the rest."""
    from sparseft import MePropConfig

    config = dict(selection="fixed", support_criterion="random", match_lora_rank=2)
    base = tiny_bert().eval()  # no dropout: the round trip compares outputs
    ready = get_sparse_model(copy.deepcopy(base), MePropConfig(**config))
    assert ready.is_calibrated and not prepare("meprop-fixed[support_criterion=random]", tiny_bert(), rank=2).needs_calibration
    calibrated = get_sparse_model(tiny_bert(), MePropConfig(**config))
    calibrated.calibrate(make_batches("bert", 2), steps=1, show_progress=False)
    for (name, a), b in zip(ready.sparse_layers().items(), calibrated.sparse_layers().values()):
        assert torch.equal(a.support.rows, b.support.rows) and torch.equal(a.support.cols, b.support.cols), name
    assert_save_load_merge_round_trip(ready, base, tmp_path)


def test_sparse_random_is_the_studys_identity_random_cell_and_the_papers_method_is_one_name_away() -> None:
    """`sparse-random`, the product's default, is exactly the cell the study ran (identity bases, a
    fixed random support, no calibration pass), at SparseGrad's rate; `meprop-fixed` is the
    calibrated identity cell; `sparsegrad-paper` is two-sided gradient bases with a top-k every step."""
    from sparseft.methods import DEFAULT_METHOD, DEFAULT_LR, canonical

    assert canonical(DEFAULT_METHOD) == "sparse-random" and DEFAULT_LR["sparse-random"] == DEFAULT_LR["sparsegrad"]
    default = prepare("sparse-random", tiny_bert(), rank=2)
    config = default.sparse.sparse_config
    assert (config.identity_bases, config.selection, config.support_criterion) == (True, "fixed", "random")
    assert not default.needs_calibration
    studied = prepare("meprop-fixed[support_criterion=random;lr=0.009]", tiny_bert(), rank=2).sparse.sparse_config
    assert studied.to_dict() == config.to_dict()
    calibrated = prepare("meprop-fixed", tiny_bert(), rank=2)
    assert calibrated.sparse.sparse_config.support_criterion == "abs-sum" and calibrated.needs_calibration
    assert canonical("sparsegrad-paper") == "sparsegrad-dynamic"
    paper = prepare("sparsegrad-paper", tiny_bert(), rank=2).sparse.sparse_config
    assert (paper.rotation, paper.selection, paper.basis_source) == ("both", "dynamic", "gradients")
