"""The Triton kernels behind the kernel seam, against the torch reference: the sampled product
alone, and whole layers with the backend registered. Without a GPU they run in Triton's
interpreter (conftest.py sets ``TRITON_INTERPRET=1`` before anything imports triton)."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
# (on a GPU machine the interpreter is off and these CPU tensors would not run: benchmarks/gpu.sh
# times the kernel there, and its correctness is this file's, on the interpreter)
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU)")

from test_fast_paths import as_n_major, check, make_layer  # noqa: E402

from sparseft.update.kernels import REFERENCE, SAMPLED, use_kernels  # noqa: E402
from sparseft.update.triton_kernels import TritonKernels  # noqa: E402


@pytest.mark.parametrize("n_major", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 2, 1), (37, 9, 7, 20), (70, 16, 40, 300)])
def test_sampled_product_equals_the_reference(shape, n_major):
    N, a, b, k = shape
    gen = torch.Generator().manual_seed(N)
    left, right = torch.randn(N, a, generator=gen), torch.randn(N, b, generator=gen)
    if n_major:
        left, right = as_n_major(left), as_n_major(right)
    flat = torch.randperm(a * b, generator=gen)[:min(k, a * b)].sort().values
    rows, cols = flat // b, flat % b
    crow = torch.zeros(a + 1, dtype=torch.long)
    crow[1:] = torch.bincount(rows, minlength=a).cumsum(0)
    mask = REFERENCE.csr(crow, cols, torch.zeros(flat.numel()), (a, b))
    got = TritonKernels(block_k=16, block_n=8).sampled_product(mask, left, right)
    torch.testing.assert_close(got, REFERENCE.sampled_product(mask, left, right), atol=1e-5, rtol=1e-5)


class _Counted(TritonKernels):
    calls: list = []  # (class attribute: the dataclass is frozen)

    def sampled_product(self, mask, left, right):
        self.calls.append(left.dtype)
        return super().sampled_product(mask, left, right)


# identity: no rotation at all, the product default's layer (sparse-random)
@pytest.mark.parametrize("rotation,identity", [("narrow", False), ("both", False), ("both", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layers_on_the_triton_backend_equal_the_formula(rotation, identity, dtype):
    """A fixed layer's value gradient through the Triton sampled product, in float32 and under
    bf16 autocast (where the torch reference falls back to a dense product)."""
    layer, gen = make_layer(24, 10, 40, "fixed", identity, False, SAMPLED, seed=3, cache=False, rotation=rotation)
    _Counted.calls.clear()
    triton = use_kernels("cpu", _Counted(block_k=16, block_n=8))
    if dtype == torch.float32:
        with triton:
            check(layer, gen, (3, 5))
    else:
        x = torch.randn(3, 5, layer.n, generator=gen)
        with triton:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = layer(x)
            y.float().sum().backward()
        got = layer.values.grad.clone()
        layer.values.grad = None
        layer(x).sum().backward()  # the reference: float32, torch kernels (outside the Triton backend)
        torch.testing.assert_close(got, layer.values.grad, atol=0.02 * float(layer.values.grad.abs().max()), rtol=0.02)
    assert _Counted.calls and _Counted.calls[0] == dtype  # the Triton kernel ran, on factors of that dtype
