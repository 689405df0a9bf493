"""The layer's compute paths on a CUDA device (skipped without one; `benchmarks/gpu.sh` runs them).

Each case builds a layer on the CPU, takes the straightforward formula's output and gradients
there in float32 (``test_fast_paths.reference``), moves layer and bases to the GPU in float32 or
bfloat16 and checks that the fused path computes the same numbers there."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from sparseft.update.kernels import is_n_major
from test_fast_paths import as_n_major, make_layer, reference

# SPARSEFT_TEST_DEVICE=cpu runs the same checks on the CPU (to check the tests themselves)
DEVICE = os.environ.get("SPARSEFT_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")]

CASES = [(sel, ident, path) for sel in ("fixed", "dynamic") for ident in (False, True)
         for path in ("auto", "activations", "weights") + (("sampled",) if sel == "fixed" else ())]


def _on(layer, device, dtype):
    moved = copy.deepcopy(layer)
    moved._bank.to(device=device, dtype=dtype)
    moved.base_layer.to(device=device, dtype=dtype)
    return moved.to(device)  # the trained values stay float32 (adapter dtype)


def _assert_matches_on_device(layer, gen, dtype, n_major=False):
    """The layer moved to DEVICE in ``dtype`` computes the CPU float32 formula's output, input
    gradient and value gradient (``n_major``: the input laid out column-major over the tokens,
    as a wider partner layer hands it on)."""
    x = torch.randn(4, 33, layer.n, generator=gen)
    grad_y = torch.randn(4, 33, layer.m, generator=gen)
    y_ref, gx_ref, gp_ref = reference(layer, x, grad_y)
    gpu = _on(layer, DEVICE, dtype)
    xg = x.to(DEVICE, dtype)
    if n_major:
        xg = as_n_major(xg)
        assert is_n_major(xg)
    xg.requires_grad_(True)
    y = gpu(xg)
    y.backward(grad_y.to(DEVICE, dtype))
    tol = 1e-3 if dtype == torch.float32 else 3e-2  # bf16: 2% passed on the CPU; a 10% error fails
    for got, want in ((y, y_ref), (xg.grad, gx_ref), (gpu.param.grad, gp_ref)):
        scale = 1 + float(want.abs().max())
        torch.testing.assert_close(got.float().cpu(), want, atol=tol * scale, rtol=tol)
    return gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection,identity,path", CASES)
def test_gpu_paths_match_the_formula(selection, identity, path, dtype):
    layer, gen = make_layer(96, 48, 300, selection, identity, False, path, seed=11)
    _assert_matches_on_device(layer, gen, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["auto", "sampled"])
@pytest.mark.parametrize("tall", [True, False])
def test_gpu_grouped_support_matches_the_formula(tall, path, dtype):
    """A grouped support's batched products (value gradient, merge) on the device."""
    from test_grouped_support import _grouped_layer

    layer, gen = _grouped_layer(96 if tall else 24, 24 if tall else 96, 3, 8, seed=5, path=path)
    assert layer.support.grouped is not None
    _assert_matches_on_device(layer, gen, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotation", ["narrow", "both"])
def test_gpu_wide_input_handed_on_column_major(rotation, dtype):
    """A wide-input layer fed column-major activations (ops.linear_n_major's layout) on the device."""
    layer, gen = make_layer(48, 96, 300, "fixed", False, False, "sampled", seed=13, rotation=rotation)
    _assert_matches_on_device(layer, gen, dtype, n_major=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tall", [True, False])
def test_gpu_one_sided_merge_matches_the_formula(tall, dtype):
    """The one-sided merge (the narrow side rotated; "weights": forward and input gradient through
    W0 + ΔW) on the device, whose bf16 merge is one fused sparse product where cuSPARSE has the
    kernel (``sparse_products_in``); a random support touches every wide row, as here."""
    from sparseft.update.kernels import sparse_products_in

    layer, gen = make_layer(96 if tall else 48, 48 if tall else 96, 2000, "fixed", False, False, "weights", seed=19,
                            rotation="narrow", cache=False)
    assert layer.support.index()[0 if tall else 1] == slice(0, 96)
    _assert_matches_on_device(layer, gen, dtype)
    if torch.device(DEVICE).type == "cuda":  # (says whether the GPU took the fused bf16 route)
        assert sparse_products_in(torch.bfloat16, torch.device(DEVICE))


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_gpu_cached_merge_follows_optimizer_steps(selection):
    layer, gen = make_layer(64, 32, 100, selection, False, False, "auto", seed=3, cache=True)
    cached = _on(layer, DEVICE, torch.float32)
    fresh = copy.deepcopy(cached)
    fresh.cache_update = False
    fresh.update.merged_forward = lambda tokens: True
    opts = [torch.optim.AdamW([m.param], lr=0.05, fused=True) for m in (cached, fresh)]
    for _ in range(3):
        x = torch.randn(8, 32, device=DEVICE)
        outs = [m(x) for m in (cached, fresh)]
        assert torch.equal(outs[0], outs[1])
        for out in outs:
            out.square().sum().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotation,identity", [("narrow", False), ("both", False), ("both", True)])  # identity: the default's layer
def test_gpu_triton_sampled_product_matches_the_formula(rotation, identity, dtype):
    """The Triton backend's sampled product (sparseft.update.triton_kernels) on the device."""
    pytest.importorskip("triton")
    from sparseft.update.kernels import use_kernels
    from sparseft.update.triton_kernels import TritonKernels

    layer, gen = make_layer(96, 48, 300, "fixed", identity, False, "sampled", seed=17, rotation=rotation)
    with use_kernels(torch.device(DEVICE).type, TritonKernels()):
        _assert_matches_on_device(layer, gen, dtype)


@pytest.mark.parametrize("there,back", [(DEVICE, "cpu"), ("cpu", DEVICE)])
@pytest.mark.parametrize("optimizer", ["AdamW", "SparseAdamW", "the jobs' AdamW"])
def test_a_checkpoint_resumes_on_the_other_device(tmp_path, there, back, optimizer):
    """A checkpoint written with the model on one device resumes with it on the other: the next
    step there equals the step the uninterrupted run takes. The jobs' AdamW is fused on a GPU
    (``optim.fused_on_gpu``) and not on the CPU, so that case crosses implementations too."""
    from conftest import tiny_bert

    import sparseft
    from sparseft import SparseGradConfig, get_sparse_model
    from sparseft.app.checkpoint import load_checkpoint, save_checkpoint

    from sparseft.methods import _adamw

    def make(model, lr):
        if optimizer == "the jobs' AdamW":  # as prepare() makes it
            return _adamw(model)(lr)
        return (getattr(torch.optim, optimizer, None) or getattr(sparseft, optimizer))(
            [p for p in model.parameters() if p.requires_grad], lr=lr)

    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 97, (4, 8), generator=gen), "labels": torch.tensor([0, 1, 0, 1])} for _ in range(3)]

    def build(device):
        torch.manual_seed(0)
        # eval(): no dropout, so the two runs' steps draw nothing from the RNG the checkpoint restores
        return get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05, modules_to_save=["classifier"])).to(device).eval()

    def step(model, opt, batch):
        device = next(model.parameters()).device
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        opt.step()
        opt.zero_grad()

    first = build(there)
    first.calibrate([{k: v.to(there) for k, v in batches[0].items()}], show_progress=False)
    opt = make(first, lr=1e-2)
    if optimizer == "the jobs' AdamW":
        assert bool(opt.defaults["fused"]) == (torch.device(there).type == "cuda")
    for batch in batches[:2]:
        step(first, opt, batch)
    save_checkpoint(tmp_path, first, opt, step=2)
    second = build(back)
    opt2 = make(second, lr=1e-2)
    assert load_checkpoint(tmp_path, second, opt2)["step"] == 2
    step(first, opt, batches[2])
    step(second, opt2, batches[2])
    ours = {n: p.detach().cpu() for n, p in second.named_parameters() if p.requires_grad}
    for name, p in first.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(ours[name], p.detach().cpu(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("identity", [False, True])  # sparsegrad (the narrow side rotated); the default
def test_gpu_value_gradient_path_is_measured_there(identity):
    """On CUDA the value gradient's path is timed, not counted (``measure_paths``): in float32 the
    sampled product and the dense bracketing both run once per layer, the faster is kept, and the
    gradient is the formula's."""
    from sparseft.update.kernels import SAMPLED, kernels_for

    if DEVICE == "cuda":
        assert kernels_for(DEVICE).measure_paths
    layer, gen = make_layer(96, 48, 300, "fixed", identity, False, "auto", seed=12, rotation="narrow")
    assert layer.update.path_for(4 * 33) == SAMPLED
    moved = _assert_matches_on_device(layer, gen, torch.float32)
    if DEVICE == "cuda":
        ((path, seconds),) = moved.update.measured.values()
        assert SAMPLED in seconds and len(seconds) == 2 and path in seconds


def test_a_seeded_random_support_is_the_same_on_every_device(monkeypatch):
    """The adapter file stores a random support's seed, and loading rebuilds the support from it on
    the CPU: it must not depend on where the layer was when it was chosen. Seed 9 ties three
    entries of a 5632×2048 block at the k-th score (TinyLlama's MLP), of which the CPU's topk keeps
    two; a device's topk may keep two others, so the choice runs on the CPU."""
    from torch import nn

    import sparseft.calibration as calibration
    from sparseft.layer import SparseLinear
    from sparseft.update.bank import BasisBank

    monkeypatch.setattr(calibration, "random_support_seed", lambda index: 9)
    chosen = {}
    for device in ("cpu", DEVICE):
        base = nn.Linear(2048, 5632, bias=False, device=device)
        layer = SparseLinear(base, group="g", k=61440, selection="fixed", identity=True, bank=BasisBank(), block=(5632, 2048))
        calibration.choose_random_supports({"mlp": layer})
        assert layer.rows.device.type == torch.device(device).type
        chosen[device] = (layer.rows.cpu(), layer.cols.cpu())
    assert all(torch.equal(a, b) for a, b in zip(chosen["cpu"], chosen[DEVICE]))


def _train_then_score(model, batches) -> torch.Tensor:
    """A few AdamW steps (lr 1e-2) over ``batches``, then the eval model's logits on the first, on the CPU."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        return model(**batches[0]).logits.cpu()


@pytest.mark.parametrize("method", ["default", "sparsegrad"])
def test_an_adapter_trained_on_the_device_loads_on_the_cpu_and_merges_there(tmp_path, method):
    """The library on the device end to end: prepared and calibrated there, a few AdamW steps,
    saved; the file loaded onto the float32 base on the CPU answers as the device model did, and
    merge_and_unload on the device answers the same too. ``default``: the product's default (a
    seeded random support, no rotation); ``sparsegrad``: SparseGradConfig() (the narrow side
    rotated, bases from a calibration pass, stored in the file)."""
    from conftest import tiny_bert

    from sparseft import SparseGradConfig, SparseModel, get_sparse_model
    from sparseft.methods import DEFAULT_METHOD, prepare

    torch.manual_seed(0)
    weights = tiny_bert().state_dict()
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 97, (4, 8), generator=gen), "labels": torch.tensor([0, 1, 0, 1])} for _ in range(3)]
    on = [{k: v.to(DEVICE) for k, v in b.items()} for b in batches]

    def base():
        model = tiny_bert()
        model.load_state_dict(weights)
        return model.eval()

    if method == "default":
        model = prepare(DEFAULT_METHOD, base().to(DEVICE), rank=2).sparse
    else:
        model = get_sparse_model(base().to(DEVICE), SparseGradConfig(match_lora_rank=2))
        model.calibrate(on[:1], steps=1, show_progress=False)
    want = _train_then_score(model, on)
    model.save_pretrained(tmp_path)
    loaded = SparseModel.from_pretrained(base(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, want, atol=1e-4, rtol=1e-4)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**on[0]).logits.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("identity", [True, False])  # the default's layer; one side rotated
def test_gpu_merge_in_the_autocast_dtype_is_the_cast_float32_merge(identity):
    """Under bf16 autocast with float32 weights on the device, the merged weight the products read
    is made in bf16 (the default: W0 cast once, its k entries summed in float32 and written in
    through an int32 index) and equals the float32 merge cast, bit for bit."""
    from sparseft.update.kernels import kernels_for

    layer, gen = make_layer(96, 48, 300, "fixed", identity, False, "auto", seed=12, cache=False, rotation="narrow")
    gpu = _on(layer, DEVICE, torch.float32)
    W0, param = gpu.base_layer.weight, gpu.param
    plain = gpu.update.merge_into(W0, param)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        merged = gpu.update.merged_weight(W0, param, kernels_for(W0.device))
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, plain.to(torch.bfloat16))


def test_gpu_a_loaded_adapter_with_partly_held_bases(tmp_path):
    """An adapter whose file holds some basis columns (a calibrated support), loaded onto its base
    on the device, answers as on the CPU, reading its columns through their places there."""
    from conftest import make_batch, tiny_llama

    from sparseft import SparseGradConfig, SparseModel, get_sparse_model

    torch.manual_seed(0)
    weights = tiny_llama().state_dict()

    def base():
        model = tiny_llama()
        model.load_state_dict(weights)
        return model.eval()

    model = get_sparse_model(base(), SparseGradConfig(match_lora_rank=2, support_criterion="abs-sum"))
    model.calibrate([make_batch("llama", i) for i in range(2)], steps=2, show_progress=False)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.param.normal_(0, 0.05)
    model.save_pretrained(tmp_path)
    batch = make_batch("llama", 3)
    on_cpu = SparseModel.from_pretrained(base(), tmp_path).eval()
    on_device = SparseModel.from_pretrained(base().to(DEVICE), tmp_path).eval()
    assert any(on_device.bases.is_partial(group) for group in on_device.bases.groups)
    with torch.no_grad():
        want = on_cpu(**batch).logits
        got = on_device(**{k: v.to(DEVICE) for k, v in batch.items()}).logits.cpu()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["default", "sparsegrad"])
def test_gpu_a_4bit_base_trains_there_and_its_adapter_serves_on_the_full_precision_base(tmp_path, method):
    """QLoRA's route on the device: the base loaded in 4 bits there (the command line's NF4 with
    double quantization), the adapter calibrated and trained beside it, its value gradient the
    dense one through the dequantized weight; saved, it loads onto the float32 checkpoint on the
    CPU with its update entry for entry, and onto a float model holding the dequantized weights
    it answers as the 4-bit model did."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from conftest import llama64, load_nf4
    from sparseft import SparseGradConfig, SparseModel, get_sparse_model
    from sparseft.methods import DEFAULT_METHOD, prepare
    from sparseft.quantized import dequantized, is_quantized

    torch.manual_seed(0)
    llama64().save_pretrained(tmp_path / "ck")
    base = load_nf4(tmp_path / "ck", DEVICE)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": (ids := torch.randint(0, 97, (4, 12), generator=gen)).to(DEVICE), "labels": ids.to(DEVICE)}
               for _ in range(3)]
    if method == "default":
        model = prepare(DEFAULT_METHOD, base, rank=4).sparse
    else:
        model = get_sparse_model(base, SparseGradConfig(match_lora_rank=4))
        model.calibrate(batches[:2], steps=2, show_progress=False)
    layer = model.base_model.model.layers[1].mlp.up_proj
    assert is_quantized(layer.base_layer) and layer.base_layer.weight.device.type == torch.device(DEVICE).type
    with torch.no_grad():
        layer.param.normal_(0, 0.05)
    x = torch.randn(6, layer.n, generator=gen).to(DEVICE)
    proj = torch.randn(6, layer.m, generator=gen).to(DEVICE)
    (layer(x) * proj).sum().backward()
    ours, layer.param.grad = layer.param.grad.clone(), None
    W = dequantized(layer.base_layer).float() + layer.delta_weight().float()
    (torch.nn.functional.linear(x, W) * proj).sum().backward()
    torch.testing.assert_close(ours, layer.param.grad, rtol=1e-4, atol=1e-5)
    want = _train_then_score(model, batches)
    model.save_pretrained(tmp_path / "a")
    loaded = SparseModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32), tmp_path / "a")
    for name, trained in model.sparse_layers().items():
        torch.testing.assert_close(loaded.sparse_layers()[name].delta_weight(), trained.delta_weight().cpu(), rtol=0, atol=1e-6)
    twin = AutoModelForCausalLM.from_pretrained(tmp_path / "ck", dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.base_model.named_modules():
            if is_quantized(module):
                twin.get_submodule(name.replace(".base_layer", "")).weight.copy_(dequantized(module).float().cpu())
    twin = SparseModel.from_pretrained(twin, tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(**{k: v.cpu() for k, v in batches[0].items()}).logits, want, atol=1e-4, rtol=1e-4)
