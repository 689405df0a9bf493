"""Block-diagonal bases (``basis_blocks``): each rotated side's basis is block-diagonal, each block
the eigenbasis of the Gram's matching diagonal block, applied block by block."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import ARCHS, assert_save_load_merge_round_trip, make_batch, make_batches
from sparseft import MePropConfig, SparseGradConfig, get_sparse_model
from sparseft.update.bank import block_eigenbasis
from sparseft.update.kernels import REFERENCE, block_bounds
from sparseft.errors import ConfigError
from test_core import _backward_beside_dense

apply_basis = REFERENCE.rotate


def _psd(size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(size, 3 * size, generator=g)
    return A @ A.T


@pytest.mark.parametrize("size,blocks", [(12, 1), (12, 3), (13, 4), (5, 8)])
def test_block_eigenbasis_is_an_eigenbasis_of_each_diagonal_block(size: int, blocks: int) -> None:
    gram = _psd(size)
    B = block_eigenbasis(gram, blocks)
    torch.testing.assert_close(B.T @ B, torch.eye(size), atol=1e-5, rtol=0)
    bounds = block_bounds(size, blocks)
    assert bounds[0][0] == 0 and bounds[-1][1] == size and len(bounds) == min(blocks, size)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for a, b in bounds:
        mask[a:b, a:b] = True
        inner = B[a:b, a:b].T @ gram[a:b, a:b] @ B[a:b, a:b]  # diagonal, largest first
        values = torch.diagonal(inner)
        torch.testing.assert_close(inner, torch.diag(values), atol=1e-3 * float(values.max()), rtol=0)
        assert bool((values[:-1] >= values[1:] - 1e-4 * float(values.max())).all())
    assert bool((B[~mask] == 0).all())  # exactly zero off the diagonal blocks


def test_apply_basis_equals_the_dense_product() -> None:
    B = block_eigenbasis(_psd(12), 3)
    t = torch.randn(7, 12)
    torch.testing.assert_close(apply_basis(t, B, slice(0, 12), 3), t @ B)
    idx = torch.tensor([0, 5, 11])
    torch.testing.assert_close(apply_basis(t, B[:, idx], idx, 3), t @ B[:, idx])  # columns: the dense product
    for blocks, index, basis in ((3, slice(0, 12), B), (1, slice(0, 12), B), (3, idx, B[:, idx])):
        out = apply_basis(t, basis, index, blocks, n_major=True)  # the SDDMM's layout: contiguous along N
        torch.testing.assert_close(out, t @ basis)
        assert out.T.is_contiguous()


def _calibrated(arch: str, config: SparseGradConfig):
    torch.manual_seed(0)
    base = ARCHS[arch]().eval()
    model = get_sparse_model(copy.deepcopy(base), config)
    model.calibrate(make_batches(arch, 4), steps=4, show_progress=False)
    return base, model


@pytest.mark.parametrize("rotation", ["narrow", "both"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_fixed_gradient_is_the_dense_gradient_in_the_block_bases(arch: str, rotation: str) -> None:
    """The values' gradient is the dense autograd gradient rotated by the block-diagonal bases,
    with the support covering whole sides so that the block-by-block path runs."""
    base, model = _calibrated(arch, SparseGradConfig(density=0.6, rotation=rotation, basis_blocks=2))
    dense = _backward_beside_dense(base, model, arch, make_batch(arch, 12))
    for name, layer in model.sparse_layers().items():
        R, C = layer.support.index()
        assert isinstance(R, slice) and isinstance(C, slice)  # whole sides: the block path
        P = layer.basis.matrix("P", slice(None), layer.m).float()
        Q = layer.basis.matrix("Q", slice(None), layer.n).float()
        for side, B in (("P", P), ("Q", Q)):
            if side in layer.basis.rotated_parts:
                half = B.shape[0] // 2
                assert bool((B[:half, half:] == 0).all()) and bool((B[half:, :half] == 0).all()), (name, side)
        rotated = P.T @ dense[name] @ Q
        torch.testing.assert_close(layer.values.grad, rotated[layer.rows, layer.cols], atol=1e-5, rtol=1e-4)


def test_block_bases_save_load_and_merge_round_trip(tmp_path) -> None:
    base, model = _calibrated("bert", SparseGradConfig(match_lora_rank=2, basis_blocks=4))
    loaded = assert_save_load_merge_round_trip(model, copy.deepcopy(base), tmp_path)
    assert loaded.sparse_config.basis_blocks == 4


def test_basis_blocks_is_checked() -> None:
    for bad in (0, 2.0, None, True):
        with pytest.raises(ConfigError, match="basis_blocks"):
            SparseGradConfig(basis_blocks=bad)
    with pytest.raises(ConfigError, match="basis_blocks"):
        MePropConfig(basis_blocks=2)
