"""A model split over devices (transformers' ``device_map="auto"`` on several GPUs): a layer
group's bases are stored once, on the first target's device, and every product of a layer runs
on that layer's own device, reading a copy of the bases there.

This CPU has one device, so the second is ``meta``: the tiny LLaMA's last block, norm and head
move there, with a hook that moves their inputs (as accelerate's does). Torch multiplies a CPU
and a meta tensor without complaint, so a dispatch mode records every op whose tensors sit on
two devices. Meta tensors hold no data, so the check is of placement only (values: the CUDA
tests); a backward cannot cross back to the CPU (the meta part's own gradients are taken); and
what is built once per support by reading values (its CSR patterns: host reads a GPU makes once)
is built by a first step on the CPU, then copied. A loaded adapter's partly held bases check a
support's columns once per device by reading values, so they are not covered here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from conftest import make_batch, make_batches, tiny_llama
from sparseft import SparseGradConfig, get_sparse_model
from sparseft.update import TorchKernels, use_kernels
from sparseft.update.bank import BasisBank

CONFIGS = {
    "both-rotated": SparseGradConfig(match_lora_rank=2, rotation="both"),
    "one-sided": SparseGradConfig(match_lora_rank=2, rotation="narrow"),
    "dynamic": SparseGradConfig(match_lora_rank=2, selection="dynamic"),
    "cached-merge": SparseGradConfig(match_lora_rank=2, rotation="both", cache_update=True),
}


class MixedDevices(TorchDispatchMode):
    """Every op whose tensor arguments sit on more than one device (CPU scalars aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        devices = {t.device for t in tree_leaves((args, kwargs or {}))
                   if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1:
            self.mixed.append(f"{func.overloadpacket.__name__} on {sorted(map(str, devices))}")
        return func(*args, **(kwargs or {}))


class MetaKernels(TorchKernels):
    """The torch reference, but meta has no sparse CSR kernels: the two products that take a CSR
    return a meta tensor of their result's shape and dtype on the CSR's device (placement only)."""

    @staticmethod
    def sparse_dense(D, B_T, base=None):
        out = torch.empty(D.shape, dtype=B_T.dtype, device=D.device) @ B_T
        return out if base is None else base + out

    @staticmethod
    def sampled_product(mask, left, right):
        return torch.empty(mask.values().shape, dtype=left.dtype, device=mask.device) + (left.sum() + right.sum())


def _to_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _split(tuner) -> torch.nn.Module:
    """The last decoder block, the norm and the head on ``meta``, their inputs moved there."""
    llama = tuner.base_model
    last = llama.model.layers[-1]
    torch.__future__.set_swap_module_params_on_conversion(True)  # (parameters stay the same objects, as on a GPU)
    try:
        for module in (last, llama.model.norm, llama.lm_head):
            module.to("meta")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    last.register_forward_pre_hook(lambda module, args, kwargs: (tree_map(_to_meta, args), tree_map(_to_meta, kwargs)),
                                   with_kwargs=True)
    return last


def _mixed_in_training_and_eval(tuner, last) -> list[str]:
    batch = make_batch("llama", 5)
    trained = [p for p in last.parameters() if p.requires_grad]
    assert trained and all(p.device.type == "meta" for p in trained)
    with use_kernels("meta", MetaKernels()), MixedDevices() as seen:
        tuner.train()
        logits = tuner(input_ids=batch["input_ids"]).logits
        assert logits.device.type == "meta"
        torch.autograd.grad(logits.float().square().sum(), trained)  # (the meta part's: no data crosses back)
        tuner.eval()
        with torch.no_grad():
            tuner(input_ids=batch["input_ids"])
    return seen.mixed


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_layer_of_a_split_model_computes_on_its_own_device(name):
    torch.manual_seed(0)
    tuner = get_sparse_model(tiny_llama(), copy.deepcopy(CONFIGS[name]))
    tuner.calibrate(make_batches("llama", 2), steps=2, show_progress=False)
    with torch.no_grad():
        for layer in tuner.sparse_layers().values():
            layer.param.normal_(0, 0.05)
    tuner.train()
    tuner(**make_batch("llama", 4)).loss.backward()  # (what is built once per support by reading values: on the CPU)
    tuner.zero_grad()
    last = _split(tuner)
    assert all(t.device.type == "cpu" for t in tuner.bases.held())  # stored once, on the first device
    assert _mixed_in_training_and_eval(tuner, last) == []


def test_the_bank_copies_a_basis_to_another_device_once_and_again_when_it_changes():
    bank = BasisBank()
    bank.set("g", torch.linalg.qr(torch.randn(6, 6))[0], torch.linalg.qr(torch.randn(4, 4))[0])
    meta = torch.device("meta")
    idx = torch.tensor([0, 2, 5], device=meta)
    first = bank.columns("g", "P", idx, meta)
    assert first.device == meta and first.shape == (6, 3)
    copied = bank._replicas[(0, "P", meta)][1]
    assert bank.columns("g", "P", slice(0, 2), meta).device == meta and bank._replicas[(0, "P", meta)][1] is copied
    assert bank.columns("g", "P", torch.tensor([1])).device.type == "cpu"  # (its own device: the stored basis)
    with torch.no_grad():
        bank.full("g", "P").mul_(-1)  # changed in place (a load, a recalibration)
    bank.columns("g", "P", idx, meta)
    assert bank._replicas[(0, "P", meta)][1] is not copied
    bank.to(torch.float64)
    assert bank._replicas == {}  # (moved or cast: the copies went with the old tensors)


def test_a_gram_term_from_a_layer_on_another_device_is_added_on_the_grams():
    """Calibrating a split model sums each group's Gram on its first layer's device; a later
    layer's gradient on another device forms its term there and sends it (a full calibration on
    meta cannot run here: its backward would cross back to the CPU)."""
    from sparseft.calibration import add_gram_terms

    G = torch.randn(5, 3)
    on_cpu = {"P": torch.zeros(5, 5), "Q": torch.zeros(3, 3)}
    add_gram_terms(on_cpu, G)
    torch.testing.assert_close(on_cpu["P"], G @ G.T)
    torch.testing.assert_close(on_cpu["Q"], G.T @ G)
    elsewhere = {"P": torch.zeros(5, 5, device="meta"), "Q": torch.zeros(3, 3, device="meta")}
    with MixedDevices() as seen:
        add_gram_terms(elsewhere, G)
        add_gram_terms({"Q": torch.zeros(3, 3, device="meta")}, G)  # (a one-sided group: Q only)
    assert seen.mixed == [] and all(g.device.type == "meta" for g in elsewhere.values())
