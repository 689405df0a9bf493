"""Under mixed precision the adapted layers' backward runs in the autocast dtype (bf16), like the
forward, while the trained values and the optimizer stay float32."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import make_batch, tiny_llama
from sparseft import MePropConfig, SparseGradConfig, get_sparse_model

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


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
