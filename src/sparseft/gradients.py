"""One gradient pass over calibration batches, shared by the methods that choose what to train
from gradients (SparseGrad's calibration, S2FT's channel selection): forward/backward each batch
and hand each adapted layer's m×n base-weight gradient to a callback as it is produced, then free
it, so at most one layer's gradient is alive at a time. The pass changes nothing in the model:
``.grad`` and ``requires_grad`` are restored; callers put the RNG state back with ``RngState``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError, InputError
from .progress import progress
from .quantized import is_quantized, unpack_for_training
from .targets import is_transposed

LossFn = Callable[[Any, Mapping[str, Any]], torch.Tensor]


class RngState:
    """The torch RNG state (CPU and every initialised CUDA device), to put back afterwards."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks (in place), so every process sees the gradient of the
    global batch: calibrating on W processes then equals 1 process on the global batches."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


def require_dict(batch: Any) -> None:
    if not isinstance(batch, Mapping):
        raise InputError(
            f"Batches must be dicts of model inputs (got {type(batch).__name__}); "
            "yield e.g. {'input_ids': ..., 'attention_mask': ..., 'labels': ...}."
        )


def move_batch(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    require_dict(batch)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def batch_loss(model: nn.Module, batch: Mapping[str, Any], loss_fn: LossFn | None) -> torch.Tensor:
    """``model(**batch).loss``, or ``loss_fn(outputs, batch)``; a clear error when neither gives one."""
    if not isinstance(batch, Mapping):
        raise CalibrationError(
            f"Calibration batches must be dicts of model inputs (got {type(batch).__name__}); "
            "yield e.g. {'input_ids': ..., 'attention_mask': ..., 'labels': ...}."
        )
    _check_rows_and_labels(model, batch)
    try:
        outputs = model(**batch)
    except TypeError as exc:  # an input name the model's forward does not take
        raise CalibrationError(
            f"The model rejected a calibration batch with keys {sorted(batch)} ({exc}): yield dicts whose keys "
            "are the model's forward arguments."
        ) from exc
    except IndexError as exc:  # e.g. a token id past the embedding table
        raise CalibrationError(f"A calibration batch indexes past the model's tables ({exc}): check its token ids "
                               "and labels against the model's vocabulary and num_labels.") from exc
    if loss_fn is not None:
        loss = loss_fn(outputs, batch)
    else:
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if loss is None:
        raise CalibrationError(
            "The model returned no loss for a calibration batch: include 'labels' in the batches, "
            "or pass loss_fn=lambda outputs, batch: ... to calibrate()."
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CalibrationError("The calibration loss must be a scalar tensor.")
    return loss


def _check_rows_and_labels(model: nn.Module, batch: Mapping[str, Any]) -> None:
    """A batch has rows, and integer labels lie in the model's range (one label per row:
    ``num_labels``; one per token: the vocabulary; -100 is ignored), before a forward fails on
    them with an IndexError (or, on a GPU, a device-side assert that ends the process)."""
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    if any(t.shape[0] == 0 for t in tensors):
        raise CalibrationError(f"A calibration batch has 0 rows (keys {sorted(batch)}): drop empty batches.")
    labels = batch.get("labels")
    config = getattr(model, "config", None)
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or config is None:
        return
    limit = getattr(config, "num_labels", None) if labels.dim() == 1 else getattr(config, "vocab_size", None)
    valid = labels[labels != -100]
    if isinstance(limit, int) and valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= limit):
        what = "num_labels" if labels.dim() == 1 else "vocab_size"
        raise CalibrationError(f"Calibration labels run from {int(valid.min())} to {int(valid.max())}, outside the model's "
                               f"[0, {limit}) ({what} = {limit}): map the labels to 0..{limit - 1}, or load the model "
                               f"with {what} to match.")


def gradient_pass(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: list[Mapping[str, Any]],
    loss_fn: LossFn | None,
    on_grad: Callable[[str, nn.Module, torch.Tensor], None],
    desc: str,
    show_progress: bool,
) -> None:
    """Forward/backward each batch; call ``on_grad(name, layer, G)`` with each layer's m×n
    weight gradient as it is produced, then free it. Parameters keep their .grad untouched.

    A quantized base weight has no float gradient to hook: its G = gᵀx is formed from the
    layer's input x and output gradient g instead, caught by a zero "probe" added to the layer's
    output (its gradient is what makes autograd reach the layer at all when nothing before it trains)."""
    weights = {name: layer.base_layer.weight for name, layer in layers.items() if not is_quantized(layer.base_layer)}
    probes: list[torch.Tensor] = []
    saved = {name: (w.requires_grad, w.grad) for name, w in weights.items()}
    bad: list[str] = []
    step = {"i": 0}

    def hook_for(name: str, layer: nn.Module):
        def hook(param: torch.Tensor) -> None:
            grad = param.grad
            param.grad = None  # free it now: streaming, never the stack of gradients
            if grad is None:
                return
            # Under torch.distributed each rank holds its shard's gradient: reduce it first (the
            # Gram of a sum is not the sum of the ranks' Grams). Hooks fire in the same order on
            # every rank, so the collectives match up.
            grad = _mean_over_ranks(grad)
            # Conv1D stores W as (in, out): transpose by the layer kind, never by the shape
            # (a square Conv1D's gradient has the right shape the wrong way round)
            G = grad.t() if is_transposed(layer.base_layer) else grad
            if not bool(torch.isfinite(G).all()):
                bad.append(f"{name} (step {step['i']})")
                return
            on_grad(name, layer, G)

        return hook

    def probe_for(name: str, layer: nn.Module):
        def on_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0].detach()
            probe = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            probes.append(probe)
            out = output + probe

            def on_output_grad(g: torch.Tensor) -> None:
                G = _mean_over_ranks(g.reshape(-1, layer.m).float().T @ x.reshape(-1, layer.n).float())
                if not bool(torch.isfinite(G).all()):
                    bad.append(f"{name} (step {step['i']})")
                    return
                on_grad(name, layer, G)

            out.register_hook(on_output_grad)
            return out

        return on_output

    handles = []
    device = next(iter(layers.values())).base_layer.weight.device
    unpack_for_training(model)  # (bitsandbytes' CPU inference packing drops input gradients)
    try:
        for name, w in weights.items():
            w.grad = None
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(hook_for(name, layers[name])))
        for name, layer in layers.items():
            if name not in weights:
                handles.append(layer.base_layer.register_forward_hook(probe_for(name, layer)))
        for i, batch in enumerate(progress(batches, desc=desc, disable=not show_progress)):
            step["i"] = i
            loss = batch_loss(model, move_batch(batch, device), loss_fn)
            if not bool(torch.isfinite(loss.detach())):
                raise CalibrationError(
                    f"Calibration loss is {loss.item()} at step {i}: check the inputs and labels, use "
                    "float32 or bf16 instead of fp16, or calibrate on other batches."
                )
            loss.backward(inputs=[*weights.values(), *probes])
            probes.clear()
            if bad:
                raise CalibrationError(
                    f"Non-finite (NaN/inf) gradients during calibration in {bad[:3]}: check the data "
                    "and labels, load the model in float32/bf16, or lower the loss scale."
                )
    finally:
        for h in handles:
            h.remove()
        for name, w in weights.items():
            requires_grad, grad = saved[name]
            w.requires_grad_(requires_grad)
            w.grad = grad


__all__ = ["LossFn", "RngState", "batch_loss", "gradient_pass", "move_batch", "require_dict"]
