"""Under mixed precision the adapted layers' backward runs in the autocast dtype (bf16), like the
forward, while the trained values and the optimizer stay float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_batch, tiny_llama
from sparseft import MePropConfig, SparseGradConfig, get_sparse_model

# The linear layers' products. Attention's batched ones (bmm) are left out: they are torch's SDPA's,
# which torch 2.8's CPU computes in float32 under bf16 autocast (2.13's fused kernel runs none).
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}


class MatmulDtypes(TorchDispatchMode):
    """Records the dtype of every matrix multiply that runs."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.dtypes.append(args[-1].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("config", [SparseGradConfig(density=0.05), SparseGradConfig(density=0.05, selection="dynamic"),
                                    MePropConfig(density=0.05, selection="fixed")], ids=["fixed", "dynamic", "meprop-fixed"])
def test_backward_follows_autocast(config) -> None:
    model = get_sparse_model(tiny_llama(), config)
    model.calibrate([make_batch("llama", i) for i in range(2)], steps=2, show_progress=False)
    batch = make_batch("llama", 5)
    for layer in model.sparse_layers().values():
        layer.select_on_backward = False  # compare whole gradients, not two top-k cuts of them
    reference = copy.deepcopy(model)
    reference(**batch).loss.backward()  # float32 throughout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    recorder = MatmulDtypes()
    with recorder:
        loss.backward()
    # every matmul of the backward is bf16: the frozen base layers' (autograd's own) and the
    # adapted layers' (sparseft's function), none promoted to float32
    assert recorder.dtypes and set(recorder.dtypes) == {torch.bfloat16}, set(recorder.dtypes)
    for layer in model.sparse_layers().values():
        param = layer.param
        assert param.dtype == torch.float32 and param.grad is not None and param.grad.dtype == torch.float32
        assert bool(torch.isfinite(param.grad).all()) and float(param.grad.abs().sum()) > 0
    # ... and the bf16 gradients are the float32 ones to bf16 precision
    for (name, layer), ref in zip(model.sparse_layers().items(), reference.sparse_layers().values()):
        g, r = layer.param.grad, ref.param.grad
        assert float((g - r).norm() / r.norm()) < 5e-2, name


def test_backward_without_autocast_is_unchanged_float32() -> None:
    model = get_sparse_model(tiny_llama(), SparseGradConfig(density=0.05))
    model.calibrate([make_batch("llama", i) for i in range(2)], steps=2, show_progress=False)
    loss = model(**make_batch("llama", 5)).loss
    recorder = MatmulDtypes()
    with recorder:
        loss.backward()
    assert set(recorder.dtypes) == {torch.float32}


class LargeTensors(TorchDispatchMode):
    """Counts the new memory blocks of at least ``numel`` elements that ops allocate (views and
    in-place results share their input's block and are not counted)."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.blocks = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() >= self.numel:
                self.blocks.add(t.untyped_storage().data_ptr())
        return out


@pytest.mark.parametrize("config", [MePropConfig(density=0.05, selection="fixed", support_criterion="random"), SparseGradConfig(density=0.05),
                                    SparseGradConfig(density=0.05, rotation="both")], ids=["default", "narrow-rotated", "both-rotated"])
def test_the_merge_under_autocast_is_the_float32_merge(config) -> None:
    """Under autocast the merged weight is computed as without it: float32, by the basis' own
    route (one m×n copy of W0 for the default, with its k values scattered in), not as a dense ΔW
    in the autocast dtype."""
    model = get_sparse_model(tiny_llama(), config)
    model.calibrate([make_batch("llama", i) for i in range(2)], steps=2, show_progress=False)
    torch.manual_seed(0)
    for layer in model.sparse_layers().values():
        W0, param = layer.base_layer.weight, layer.param
        with torch.no_grad():
            param.normal_(0, 0.1)
        plain = layer.update.merge_into(W0, param)
        with torch.autocast("cpu", dtype=torch.bfloat16), LargeTensors(W0.numel()) as made:
            merged = layer.update.merge_into(W0, param)
        assert merged.dtype == torch.float32 and torch.allclose(merged, plain, rtol=0, atol=1e-6)
        assert not torch.equal(merged, W0)
        if isinstance(config, MePropConfig):
            assert len(made.blocks) == 1, f"one merge made {len(made.blocks)} blocks of W's size (the route: one copy of W0)"


@pytest.mark.parametrize("config", [MePropConfig(density=0.05, selection="fixed", support_criterion="random"), SparseGradConfig(density=0.05),
                                    SparseGradConfig(density=0.05, rotation="both")], ids=["default", "narrow-rotated", "both-rotated"])
@pytest.mark.parametrize("cache", [False, True])
def test_the_training_merge_is_made_in_the_autocast_dtype(config, cache) -> None:
    """The products' merged weight under autocast is made in autocast's dtype, as the linear would
    cast it: for the default, W0 cast once with its k merged entries summed in float32, and no m×n
    float32 copy (a third of the bytes moved where the weights are float32, as in the jobs). It is
    the float32 merge cast, bit for bit, so the layer computes what it did; the cached merge holds
    it in bf16."""
    import dataclasses

    from sparseft.update.kernels import kernels_for

    model = get_sparse_model(tiny_llama(), dataclasses.replace(config, cache_update=cache))
    model.calibrate([make_batch("llama", i) for i in range(2)], steps=2, show_progress=False)
    torch.manual_seed(0)
    for layer in model.sparse_layers().values():
        W0, param, kn = layer.base_layer.weight, layer.param, kernels_for(layer.base_layer.weight.device)
        with torch.no_grad():
            param.normal_(0, 0.1)
        plain = layer.update.merge_into(W0, param)
        x = torch.randn(3, 5, layer.n)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with LargeTensors(W0.numel()) as made:
                merged = layer.update.merged_weight(W0, param, kn)
            y = layer(x)
            want = torch.nn.functional.linear(x, plain, layer.base_layer.bias)
        assert merged.dtype == torch.bfloat16 and torch.equal(merged, plain.to(torch.bfloat16))
        assert torch.equal(y, want)
        if isinstance(config, MePropConfig):
            new = made.blocks - {W0.untyped_storage().data_ptr()}  # (a view of W0 itself, read for its k entries)
            assert len(new) == 1, f"one merge made {len(new)} blocks of W's size (the route: W0 cast once)"
