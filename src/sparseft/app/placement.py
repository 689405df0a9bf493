"""Where a job runs: its device and the precision of its training and evaluation (``--device``,
``--precision``), resolved once, printed at the start and recorded in each results record.

``auto`` device: CUDA when available, else the CPU. ``auto`` precision: bf16 autocast on a CUDA
device that supports it, else fp32. Under bf16/fp16 autocast the matmuls run in half precision
while the weights, the trained values and the optimizer state stay float32 (torch.amp); fp16
also scales the loss (``torch.amp.GradScaler``) so that small gradients do not underflow.
Importing this module loads no torch (the command line checks its arguments first).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICE_HELP = "auto (CUDA when available, else the CPU), cpu, cuda or cuda:N"


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda:0", ...
    precision: str  # "fp32", "bf16", "fp16"

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def autocast(self) -> AbstractContextManager:
        """Autocast to the precision (nothing for fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        import torch

        return torch.autocast(self.device_type, dtype=torch.bfloat16 if self.precision == "bf16" else torch.float16)

    def grad_scaler(self) -> Any:
        """A GradScaler, enabled for fp16 only (bf16 keeps float32's range)."""
        import torch

        return torch.amp.GradScaler(self.device_type, enabled=self.precision == "fp16")

    def device_name(self) -> str:
        if self.device_type != "cuda":
            return "CPU"
        import torch

        return torch.cuda.get_device_name(self.device)

    def describe(self, weights: str = "float32") -> str:
        """The device and precision as printed at a run's start; ``weights``: the base weights' dtype
        where a caller casts them (a benchmark), float32 in the jobs."""
        if self.precision == "fp32":
            how = "fp32"
        elif weights == "float32":
            how = f"{self.precision} autocast (weights and trained values float32)"
        else:
            how = f"{self.precision} autocast (weights {weights}, trained values float32)"
        return f"{self.device} ({self.device_name()}), {how}"

    def move(self, model: Any) -> Any:
        """``model`` on this device; left alone where it already is (a quantized model loads onto
        its device, and bitsandbytes models refuse some ``.to`` calls)."""
        import torch

        target = torch.device(self.device)
        if any(p.device.type != target.type or (target.index is not None and p.device.index != target.index)
               for p in model.parameters()):
            model.to(target)
        return model

    def load_pretrained(self, auto_class: Any, model_dir: Any, quantize: str | None = None, **options: Any) -> Any:
        """``auto_class.from_pretrained(model_dir)`` for a base on this device: float32 weights, or
        quantized with bitsandbytes (``quantize`` "4bit"/"8bit", computing in this placement's
        precision, placed on the device as it loads, its 4-bit weights never repacked for
        bitsandbytes' CPU inference kernel: ``quantized.keep_storage_layout``)."""
        import torch

        if quantize is None:
            return auto_class.from_pretrained(str(model_dir), dtype=torch.float32, **options)
        from ..quantized import keep_storage_layout, quantization_config

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        model = auto_class.from_pretrained(str(model_dir), dtype=torch.float32, device_map={"": self.device},
                                           quantization_config=quantization_config(quantize, compute), **options)
        keep_storage_layout(model)
        return model

    def record(self) -> dict[str, str]:
        return {"device": self.device, "device_name": self.device_name(), "precision": self.precision}


def placement_of(model: Any) -> Placement:
    """Where ``model`` is, in fp32 (a job given no placement)."""
    device = next(model.parameters()).device
    return Placement(str(device) if device.type != "cuda" else f"cuda:{device.index or 0}", "fp32")


def check_choice(device: str, precision: str) -> None:
    """The spelling of ``--device``/``--precision`` (no torch needed)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} is not known; use one of {', '.join(PRECISIONS)}.")
    kind, _, index = device.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"--device {device!r} is not known; use {DEVICE_HELP}.")


def resolve(device: str = "auto", precision: str = "auto") -> Placement:
    """The placement a job runs with; errors name the problem and the fix."""
    import torch

    check_choice(device, precision)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu "
                              "(or auto), or install a CUDA build of torch on a machine with a GPU.")
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 to "
                              f"cuda:{torch.cuda.device_count() - 1}); pick one of them.")
        device = f"cuda:{index}"
    if precision == "auto":
        precision = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16; use --precision fp16 or fp32.")
    return Placement(device, precision)


__all__ = ["DEVICE_HELP", "PRECISIONS", "Placement", "check_choice", "placement_of", "resolve"]
