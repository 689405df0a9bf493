"""The autograd function of an adapted layer: ``y = x (W0 + ΔW)ᵀ + b`` with ∂L/∂param computed
in the basis (``SparseDelta.value_grad``), never by autograd through ΔW. It saves only x, so no
m×n tensor outlives a call, and it picks the device's kernels (``kernels_for``) once per call."""

from __future__ import annotations

import torch

from .delta import SparseDelta
from .kernels import is_n_major, kernels_for


class SparseUpdate(torch.autograd.Function):
    """``SparseUpdate.apply(x, param, W0, bias, delta)``: W0 and bias frozen, param trained; W0
    None: the update's part alone (a quantized base computes its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, W0: torch.Tensor, bias: torch.Tensor | None,
                delta: SparseDelta) -> torch.Tensor:
        ctx.delta, ctx.W0 = delta, W0
        ctx.save_for_backward(x, param)  # param: autograd's version check (no in-place edits between)
        # Remember the autocast state, as torch.amp.custom_fwd does: backward runs outside it.
        device = x.device.type
        ctx.autocast = torch.is_autocast_enabled(device)
        ctx.autocast_dtype = torch.get_autocast_dtype(device) if ctx.autocast else None
        kn = kernels_for(x.device)
        return delta.forward(x, W0, bias, param, kn, n_major=delta.hands_off_n_major(x, kn))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, param = ctx.saved_tensors
        if ctx.autocast:
            # Mixed precision: the backward matmuls run in the autocast dtype, as the forward's
            # did (torch.amp.custom_bwd); the trained values and their gradient stay float32.
            with torch.autocast(x.device.type, dtype=ctx.autocast_dtype):
                return SparseUpdate._grads(ctx, grad_y, x, param)
        # Without autocast, compute in the widest of grad, input and weight dtypes (the engine
        # casts grad_x back to x's dtype).
        dtype = torch.promote_types(grad_y.dtype, x.dtype)
        dtype = dtype if ctx.W0 is None else torch.promote_types(dtype, ctx.W0.dtype)
        return SparseUpdate._grads(ctx, grad_y.to(dtype), x.to(dtype), param)

    @staticmethod
    def _grads(ctx, grad_y: torch.Tensor, x: torch.Tensor, param: torch.Tensor):
        delta: SparseDelta = ctx.delta
        kn = kernels_for(x.device)
        # the input's gradient in the input's layout (token-column-major from a wide partner)
        grad_x = delta.input_grad(grad_y, ctx.W0, param, kn, n_major=is_n_major(x)) if ctx.needs_input_grad[0] else None
        grad_param = None
        if ctx.needs_input_grad[1]:
            grad_param = delta.value_grad(grad_y.reshape(-1, delta.m), x.reshape(-1, delta.n), kn).to(param.dtype)
        return grad_x, grad_param, None, None, None


__all__ = ["SparseUpdate"]
