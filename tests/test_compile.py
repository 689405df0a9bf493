"""`torch.compile` of an adapted model: the sparse update is one node of the graph (the operator
``sparseft::update``), so a compiled model trains as the eager one does, with no graph break.
(peft's LoRA compiles without one; peft's SHiRA broke the graph 17 times in 6 steps of this tiny
LLaMA: docs/performance.md.)"""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
import transformers.utils.logging  # noqa: F401  (defines logging.Logger.warning_once)
from conftest import make_batch, tiny_gpt2, tiny_llama
from torch._dynamo.utils import counters
from torch.torch_version import TorchVersion

from sparseft.layer import SparseLinear
from sparseft.methods import prepare
from sparseft.update.delta import delta_of

ARCHS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def build(method: str, arch: str, device: str = "cpu"):
    torch.manual_seed(0)
    base = ARCHS[arch]().to(device).train()
    for module in base.modules():  # (GPT-2's dropout would draw differently in the two runs)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    prepared = prepare(method, base, rank=2)
    if prepared.needs_calibration:
        prepared.sparse.calibrate([_on(make_batch(arch, i), device) for i in range(2)], steps=2, show_progress=False)
    prepared.model.train()
    return prepared.model, prepared.make_optimizer(1e-2)


def _on(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train(model, forward, optimizer, arch: str, steps: int, autocast, first_grads: list | None = None) -> list[float]:
    """The losses of ``steps`` steps; ``first_grads`` gets the trained parameters' first gradients
    (Adam's steps barely depend on a gradient's scale, so the trajectory alone would not show one)."""
    losses = []
    for s in range(steps):
        with autocast():
            loss = forward(**_on(make_batch(arch, s), next(model.parameters()).device)).loss
        loss.backward()
        if s == 0 and first_grads is not None:
            first_grads.extend(p.grad.clone() for p in model.parameters() if p.requires_grad)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def compiled_against_eager(method: str, arch: str, device: str = "cpu", precision: str = "fp32", steps: int = 4):
    """(compiled model, eager model, compiled losses, eager losses, graph breaks): the same
    method prepared twice from one seed, one trained through ``torch.compile``."""
    torch._dynamo.reset()
    counters.clear()
    autocast = ((lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if precision == "bf16"
                else contextlib.nullcontext)
    compiled, opt_c = build(method, arch, device)
    eager, opt_e = build(method, arch, device)
    grads_c, grads_e = [], []
    got = train(compiled, torch.compile(compiled), opt_c, arch, steps, autocast, grads_c)
    want = train(eager, eager, opt_e, arch, steps, autocast, grads_e)
    for g_c, g_e in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-6 + 1e-4 * float(g_e.abs().max()))
    return compiled, eager, got, want, graph_breaks()


@pytest.fixture(autouse=True)
def _dynamo_skips_transformers_warnings():
    """GPT-2's loss logs a transformers warning that Dynamo cannot trace (3 graph breaks, with
    peft's LoRA as with ours, worded differently by each torch): Dynamo skips those calls, as its
    own message advises, so every break counted is one of the model's."""
    with torch._dynamo.config.patch(ignore_logger_methods={logging.Logger.warning, logging.Logger.warning_once}):
        yield


def graph_breaks() -> int:
    """Graph breaks counted since ``counters.clear()``."""
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("method,arch", [("sparse-random", "llama"), ("sparsegrad", "llama"), ("sparsegrad-dynamic", "llama"),
                                         ("sparse-random", "gpt2")])
def test_compiled_training_equals_eager_with_no_graph_break(method, arch):
    compiled, eager, got, want, breaks = compiled_against_eager(method, arch)
    assert breaks == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        # (atol: Adam's step amplifies round-off where a gradient is near zero; torch 2.8 put one
        # trained value 1.8e-6 away after 4 steps with every gradient within tolerance)
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    compiled.eval()
    eager.eval()
    batch = make_batch(arch, 9)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(compiled)(**batch).logits, eager(**batch).logits, rtol=1e-5, atol=1e-5)


CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_bf16_autocast_step_matches_eager(device):
    """Under bf16 autocast the operator computes in bf16 as the eager function does: one step's
    loss and value gradient agree to bf16's precision (on a GPU, inductor's own kernels around
    the operator; benchmarks/gpu.sh runs that case)."""
    torch._dynamo.reset()
    counters.clear()
    compiled, _ = build("sparse-random", "llama", device)
    eager = copy.deepcopy(compiled)
    batch = _on(make_batch("llama", 0), device)
    for model, forward in ((compiled, torch.compile(compiled)), (eager, eager)):
        with torch.autocast(device, dtype=torch.bfloat16):
            out = forward(**batch)
        assert out.logits.dtype == torch.bfloat16
        out.loss.backward()
    assert graph_breaks() == 0
    grads = [(p.grad, q.grad) for p, q in zip(compiled.parameters(), eager.parameters()) if p.requires_grad]
    assert grads
    for got, want in grads:
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


def test_a_copied_model_has_deltas_of_its_own():
    """The graph names each layer's delta by a handle: a deep copy (a DPO reference model, a
    frozen teacher) must not share its original's, or one model would compute with the other's
    support."""
    model, _ = build("sparse-random", "llama")
    twin = copy.deepcopy(model)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    copies = [m for m in twin.modules() if isinstance(m, SparseLinear)]
    assert layers and len(layers) == len(copies)
    for layer, twin_layer in zip(layers, copies):
        assert layer.update.handle != twin_layer.update.handle
        assert delta_of(layer.update.handle) is layer.update and delta_of(twin_layer.update.handle) is twin_layer.update
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.add_(0.5)
        for twin_layer in copies:  # another support: a delta shared with the original would compute on its entries
            twin_layer.choose_support(torch.rand(twin_layer.support.block, generator=gen))
    batch = make_batch("llama", 3)
    with torch.no_grad():
        assert not torch.allclose(torch.compile(model)(**batch).logits, torch.compile(twin)(**batch).logits)
        torch.testing.assert_close(torch.compile(twin)(**batch).logits, twin(**batch).logits, rtol=1e-5, atol=1e-5)


def test_compiled_training_on_a_4bit_base_equals_eager(tmp_path):
    """A quantized base computes x W0ᵀ itself; the operator adds the update beside it (W0 None)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from sparseft.quantized import quantization_config

    torch.manual_seed(0)
    tiny_llama().save_pretrained(tmp_path)
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization_config("4bit"), dtype=torch.float32)
        prepared = prepare("sparse-random", base, rank=2)
        runs.append((prepared.model.train(), prepared.make_optimizer(1e-2)))
    (compiled, opt_c), (eager, opt_e) = runs
    assert any(type(m).__name__ == "Linear4bit" for m in compiled.modules())
    got = train(compiled, torch.compile(compiled), opt_c, "llama", 3, contextlib.nullcontext)
    want = train(eager, eager, opt_e, "llama", 3, contextlib.nullcontext)
    assert graph_breaks() == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled.parameters(), eager.parameters()):
        if p.requires_grad:  # (atol: Adam's round-off at a near-zero gradient, 1.1e-5 under torch 2.8;
            torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5)  # a wrong update is ~1e-2 off)


# torch 2.8's and 2.11's CPU inductor fail a plain transformers LLaMA (no sparseft) over dynamic
# lengths ("'tmp2' was not declared", C++); 2.13 compiles it (scripts/check_versions.sh floor).
@pytest.mark.skipif(TorchVersion(torch.__version__) < "2.13", reason="torch's CPU inductor before 2.13 cannot compile the plain model over dynamic lengths")
@pytest.mark.parametrize("method", ["sparse-random", "sparsegrad"])
def test_sequences_of_other_lengths_reuse_one_dynamic_graph(method):
    """Padding to each batch's longest sequence changes the token count every step: after the
    first new length Dynamo compiles one graph with a symbolic length (the operator's fake
    implementation takes symbolic shapes), and trains on as the eager model does."""
    torch._dynamo.reset()
    counters.clear()
    lengths = (12, 17, 23, 9, 30)
    runs = [build(method, "llama") for _ in range(2)]
    losses = []
    for (model, optimizer), forward in zip(runs, (torch.compile(runs[0][0]), runs[1][0])):
        run = []
        for s, length in enumerate(lengths):
            loss = forward(**make_batch("llama", s, length=length)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert graph_breaks() == 0
    assert counters["stats"]["unique_graphs"] == 2  # the static first length, then one for every other
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_loaded_adapters_and_mixed_batches_compile_to_the_eager_outputs(tmp_path):
    """Adapters loaded for inference keep their sparse form (CSR, which Dynamo cannot trace): its
    product is an operator (``sparseft::csr_product``), so an active loaded adapter compiles with
    no graph break (34 before). A mixed batch's routing runs eagerly (graph breaks), its rows of
    the model's own adapter through that adapter's operator: with a rotated loaded adapter it
    crashed Dynamo (InternalTorchDynamoError on a CSR tensor) before."""
    from test_multi_adapter import NAMES, _adapter

    for name, kind, seed in (("a", "fixed", 1), ("b", "s2ft", 2)):
        _adapter("llama", kind, seed).save_pretrained(tmp_path / name)
    model = _adapter("llama", "fixed", 0)
    model.load_adapter(tmp_path / "a", "a")
    model.load_adapter(tmp_path / "b", "b")
    batch = make_batch("llama", 3, batch=len(NAMES))
    cases = [({}, "a"), ({"adapter_names": NAMES}, "default")]  # (the own adapter alone: the tests above; "b" is B·A)
    for kwargs, active in cases:
        torch._dynamo.reset()
        counters.clear()
        model.set_adapter(active)
        with torch.no_grad():
            got, want = torch.compile(model)(**batch, **kwargs).logits, model(**batch, **kwargs).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{active} {kwargs}")
        if not kwargs:
            assert graph_breaks() == 0
