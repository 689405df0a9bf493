"""The autograd function of an adapted layer: ``y = x (W0 + ΔW)ᵀ + b`` with ∂L/∂param computed
in the basis (``SparseDelta.value_grad``), never by autograd through ΔW. It saves only x, so no
m×n tensor outlives a call, and it picks the device's kernels (``kernels_for``) once per call.

Two entry points compute the same thing:

- ``SparseUpdate`` (eager): an ``autograd.Function`` over the delta object itself;
- ``compiled_update`` (under ``torch.compile``): the operator ``sparseft::update``, registered
  with ``torch.library.custom_op``, with its shapes from a fake implementation and its gradient
  from the same ``gradients``. torch.compile cannot trace the delta's Python state (the merge
  cache, the supports' patterns), so the graph holds the layer as one opaque node that names its
  delta by a string handle: the rest of the model compiles around it, with no graph break.
"""

from __future__ import annotations

import contextlib

import torch

from .delta import SparseDelta, delta_of
from .kernels import autocast_dtype_of, is_n_major, kernels_for


def _precision(device: str, autocast_dtype: torch.dtype | None):
    """Autocast at ``autocast_dtype`` (the forward's, restored for its backward as
    torch.amp.custom_bwd does, and inside the compiled operator), or nothing."""
    if autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=autocast_dtype)


def gradients(delta: SparseDelta, grad_y: torch.Tensor, x: torch.Tensor, param: torch.Tensor, W0: torch.Tensor | None,
              autocast_dtype: torch.dtype | None, need_x: bool, need_param: bool, keep_layout: bool = True):
    """(∂L/∂x, ∂L/∂param), each None where not needed. Mixed precision: the matmuls run in the
    forward's autocast dtype, as its own did; the trained values and their gradient stay float32.
    Without autocast, in the widest of grad, input and weight dtypes. ``keep_layout``: ∂L/∂x in
    x's layout (token-column-major from a wide partner)."""
    if autocast_dtype is None:
        dtype = torch.promote_types(grad_y.dtype, x.dtype)
        dtype = dtype if W0 is None else torch.promote_types(dtype, W0.dtype)
        grad_y, x = grad_y.to(dtype), x.to(dtype)
    kn = kernels_for(x.device)
    with _precision(x.device.type, autocast_dtype):
        grad_x = delta.input_grad(grad_y, W0, param, kn, n_major=keep_layout and is_n_major(x)) if need_x else None
        grad_param = delta.value_grad(grad_y.reshape(-1, delta.m), x.reshape(-1, delta.n), kn).to(param.dtype) if need_param else None
    return grad_x, grad_param


class SparseUpdate(torch.autograd.Function):
    """``SparseUpdate.apply(x, param, W0, bias, delta)``: W0 and bias frozen, param trained; W0
    None: the update's part alone (a quantized base computes its own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, W0: torch.Tensor, bias: torch.Tensor | None,
                delta: SparseDelta) -> torch.Tensor:
        ctx.delta, ctx.W0 = delta, W0
        ctx.save_for_backward(x, param)  # param: autograd's version check (no in-place edits between)
        ctx.autocast_dtype = autocast_dtype_of(x.device.type)  # (backward runs outside autocast: remember it)
        kn = kernels_for(x.device)
        return delta.forward(x, W0, bias, param, kn, n_major=delta.hands_off_n_major(x, kn))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x, param = ctx.saved_tensors
        grad_x, grad_param = gradients(ctx.delta, grad_y, x, param, ctx.W0, ctx.autocast_dtype, *ctx.needs_input_grad[:2])
        return grad_x, grad_param, None, None, None


# ----------------------------------------------------------------------------- under torch.compile
# (not cudagraph-safe: the merge cache decides at run time which kernels run)
_TAGS = tuple(t for t in (getattr(torch.Tag, "cudagraph_unsafe", None),) if t is not None)


@torch.library.custom_op("sparseft::update", mutates_args=(), tags=_TAGS)
def _update(x: torch.Tensor, param: torch.Tensor, W0: torch.Tensor | None, bias: torch.Tensor | None, handle: str,
            autocast_dtype: torch.dtype | None) -> torch.Tensor:
    delta = delta_of(handle)
    with _precision(x.device.type, autocast_dtype):
        y = delta.forward(x, W0, bias, param, kernels_for(x.device))
    return y.to(autocast_dtype or x.dtype).contiguous()


@_update.register_fake
def _(x, param, W0, bias, handle, autocast_dtype):
    return x.new_empty((*x.shape[:-1], delta_of(handle).m), dtype=autocast_dtype or x.dtype)


@torch.library.custom_op("sparseft::update_backward", mutates_args=(), tags=_TAGS)
def _update_backward(grad_y: torch.Tensor, x: torch.Tensor, param: torch.Tensor, W0: torch.Tensor | None, handle: str,
                     autocast_dtype: torch.dtype | None, need_x: bool, need_param: bool) -> tuple[torch.Tensor, torch.Tensor]:
    grad_x, grad_param = gradients(delta_of(handle), grad_y, x, param, W0, autocast_dtype, need_x, need_param,
                                   keep_layout=False)
    return (grad_x.to(x.dtype).contiguous() if need_x else x.new_empty(0),
            grad_param if need_param else param.new_empty(0))  # (an operator returns tensors: empty where not needed)


@_update_backward.register_fake
def _(grad_y, x, param, W0, handle, autocast_dtype, need_x, need_param):
    return x.new_empty(x.shape if need_x else (0,)), param.new_empty(param.shape if need_param else (0,))


def _setup_context(ctx, inputs, output) -> None:
    x, param, W0, _, handle, autocast_dtype = inputs
    ctx.save_for_backward(x, param, W0)
    ctx.handle, ctx.autocast_dtype = handle, autocast_dtype


def _backward(ctx, grad_y: torch.Tensor):
    x, param, W0 = ctx.saved_tensors
    need_x, need_param = ctx.needs_input_grad[:2]
    grad_x, grad_param = _update_backward(grad_y, x, param, W0, ctx.handle, ctx.autocast_dtype, need_x, need_param)
    return grad_x if need_x else None, grad_param if need_param else None, None, None, None, None


_update.register_autograd(_backward, setup_context=_setup_context)


def compiled_update(x: torch.Tensor, param: torch.Tensor, W0: torch.Tensor | None, bias: torch.Tensor | None,
                    delta: SparseDelta) -> torch.Tensor:
    """``SparseUpdate.apply``'s result as one node of a compiled graph (``sparseft::update``)."""
    return _update(x, param, W0, bias, delta.handle, autocast_dtype_of(x.device.type))


__all__ = ["SparseUpdate", "compiled_update", "gradients"]
