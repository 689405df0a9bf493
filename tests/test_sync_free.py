"""A training step waits for no device: no op of the adapted layers or of SparseAdamW reads a
value back to the host or makes a shape out of data (``.item()``, ``nonzero``, ``masked_select``,
``unique``, ...). Recorded with a TorchDispatchMode on a tiny LLaMA on the CPU: every aten op the
step runs, against the same step of the plain model whose MLP weights train densely (what
transformers itself does is the same in both). In float32 and under bfloat16 autocast, the
precision a GPU run takes, where the products take other routes (no SDDMM; a dense support's
ΔW)."""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext

import pytest
import torch

from conftest import ARCHS, OpCounter, make_batch, make_batches
from sparseft import SparseAdamW, SparseGradConfig, get_sparse_model
from sparseft.methods import DEFAULT_METHOD, prepare
from sparseft.targets import find_targets
from sparseft.update import TorchKernels, use_kernels

# ops whose result the host must wait for: a value read back, or a shape that depends on data
SYNCING = {"item", "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_numpy", "masked_select",
           "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive", "bincount",
           "repeat_interleave", "allclose"}


def _syncs(step) -> Counter:
    with OpCounter() as rec:
        step()
    return Counter({op: n for op, n in rec.ops.items() if op in SYNCING})


def _precision(name: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else nullcontext()


def _backward(model, batch, precision: str) -> None:
    with _precision(precision):
        loss = model(**batch).loss
    loss.backward()


def _plain_step(precision: str) -> Counter:
    """The baseline: the plain tiny LLaMA, its MLP weights trained densely (forward + backward)."""
    model = ARCHS["llama"]().train()
    names = {t.name for t in find_targets(model)}
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[0] in names)
    batch = make_batch("llama", 3)
    _backward(model, batch, precision)  # warm-up
    return _syncs(lambda: _backward(model, batch, precision))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("case", ["default", "sparsegrad", "cached-merge", "dynamic-sparseadamw", "measured-paths",
                                  "loaded-sparsegrad"])
def test_a_training_step_waits_for_no_device(case, precision):
    # measured-paths: the default with the value gradient's path timed on its first backward, as on
    # CUDA (kernels.measure_paths); that first step synchronises there, the later ones must not
    with use_kernels("cpu", TorchKernels(measure_paths=True)) if case == "measured-paths" else nullcontext():
        _check_step(case, precision)


def _check_step(case: str, precision: str) -> None:
    # default: the product's default method (sparse-random: no rotation) as the jobs prepare it; sparsegrad: SparseGradConfig()
    if case in ("default", "measured-paths"):
        model = prepare(DEFAULT_METHOD, ARCHS["llama"](), rank=2).sparse
    elif case == "loaded-sparsegrad":  # an adapter loaded with the basis columns its calibrated support uses
        model = _loaded(SparseGradConfig(match_lora_rank=2, support_criterion="abs-sum"))
    else:
        config = {"sparsegrad": SparseGradConfig(match_lora_rank=2),
                  "cached-merge": SparseGradConfig(match_lora_rank=2, cache_update=True),
                  "dynamic-sparseadamw": SparseGradConfig(match_lora_rank=2, selection="dynamic")}[case]
        model = get_sparse_model(ARCHS["llama"](), config)
    if not case.startswith("loaded"):
        model.calibrate(make_batches("llama", 2), steps=2, show_progress=False)  # calibration may synchronise
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # torch's CPU AdamW (which SparseAdamW runs for fixed supports) reads its step counter back;
    # its fused CUDA form does not. So the fixed cases record forward and backward, after an
    # unrecorded update that makes a cached merge stale (the recorded step rebuilds it); the
    # dynamic case records SparseAdamW's whole step.
    optimizer = SparseAdamW(params, lr=1e-3)
    records_update = case.startswith("dynamic")
    batch = make_batch("llama", 3)

    def step() -> None:
        _backward(model, batch, precision)
        if records_update:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: CSR patterns and index views are built once per support
    step()
    if not records_update:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    ours = _syncs(step) - _plain_step(precision)
    assert not ours, f"the {case} step ({precision}) adds ops that wait for the device: {dict(ours)}"
    if case == "measured-paths" and precision == "fp32":  # (bf16 autocast: no sampled product, nothing to time)
        assert all(layer.update.measured for layer in model.sparse_layers().values())


def _loaded(config: SparseGradConfig):
    """A calibrated ``config`` adapter, saved and loaded onto its base: its bases partly held."""
    import copy
    import tempfile

    from sparseft import SparseModel

    base = ARCHS["llama"]()
    fresh = copy.deepcopy(base)
    trained = get_sparse_model(base, config)
    trained.calibrate(make_batches("llama", 2), steps=2, show_progress=False)
    with tempfile.TemporaryDirectory() as folder:
        trained.save_pretrained(folder)
        model = SparseModel.from_pretrained(fresh, folder)
    assert any(model.bases.is_partial(group) for group in model.bases.groups)
    return model


@pytest.mark.parametrize("method", ["sparse-random", "sparsegrad"])
def test_a_training_step_beside_a_4bit_base_waits_for_no_device_more_than_qloras(tmp_path, method):
    """QLoRA's setting (the base's linear layers in NF4, the command line's --quantize 4bit): the
    update's step beside the quantized kernel reads back no more than peft's LoRA does there."""
    pytest.importorskip("bitsandbytes")
    from conftest import llama64, load_nf4

    torch.manual_seed(0)
    llama64().save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    counted = {}
    for name in ("lora-mlp", method):
        prepared = prepare(name, load_nf4(tmp_path), rank=2)
        if prepared.needs_calibration:
            prepared.sparse.calibrate([batch], steps=1, show_progress=False)  # calibration may synchronise
        model = prepared.model.train()
        model(**batch).loss.backward()  # warm-up: what is built once per support
        counted[name] = _syncs(lambda: model(**batch).loss.backward())
    assert not counted[method] - counted["lora-mlp"], counted
