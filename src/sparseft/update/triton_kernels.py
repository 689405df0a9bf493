"""Triton kernels behind the kernel seam: :class:`TritonKernels` is :class:`~.kernels.TorchKernels`
with the sampled product (the value gradient of a fixed support at its k entries) as one Triton
kernel, which reads any layout and any float dtype, so half precision and autocast keep the
sampled path (torch's SDDMM takes float32/float64 only and falls back to a dense product there).

Opt in on a GPU with ``register_kernels("cuda", TritonKernels())``: it is not the default until
the GPU benchmark says it pays (benchmarks/gpu.sh). On a CPU the kernel runs under Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check it against the torch reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .kernels import TorchKernels


@triton.jit
def _sampled_dot(left, right, rows, cols, out, N, k, sl_n, sl_a, sr_n, sr_b, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[i] = Σ_n left[n, rows[i]] · right[n, cols[i]], BLOCK_K entries per program, in float32."""
    offs = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    in_k = offs < k
    r = tl.load(rows + offs, mask=in_k, other=0)
    c = tl.load(cols + offs, mask=in_k, other=0)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        both = (n < N)[:, None] & in_k[None, :]
        a = tl.load(left + n[:, None] * sl_n + r[None, :] * sl_a, mask=both, other=0.0).to(tl.float32)
        b = tl.load(right + n[:, None] * sr_n + c[None, :] * sr_b, mask=both, other=0.0).to(tl.float32)
        acc += tl.sum(a * b, axis=0)
    tl.store(out + offs, acc, mask=in_k)


@dataclass(frozen=True)
class TritonKernels(TorchKernels):
    name: str = "triton"
    block_k: int = 64
    block_n: int = 32
    measure_paths: bool = True  # (the sampled kernel only where it times faster than the dense product)

    @staticmethod
    def sddmm_supported(x: torch.Tensor) -> bool:
        return x.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)

    def sampled_product(self, mask: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The entries of ``leftᵀ right`` at the CSR ``mask``'s pattern, in its order (float32
        accumulation, returned in the wider of the factors' dtypes)."""
        crow, cols = mask.crow_indices(), mask.col_indices()
        k = cols.numel()
        # the row of each stored entry, from the row pointers (no data-dependent shape)
        rows = torch.searchsorted(crow, torch.arange(k, device=crow.device), right=True) - 1
        out = torch.empty(k, dtype=torch.float32, device=left.device)
        if k:
            grid = (triton.cdiv(k, self.block_k),)
            _sampled_dot[grid](left, right, rows, cols, out, left.shape[0], k, left.stride(0), left.stride(1),
                               right.stride(0), right.stride(1), BLOCK_K=self.block_k, BLOCK_N=self.block_n)
        return out.to(torch.promote_types(left.dtype, right.dtype))


__all__ = ["TritonKernels"]
