"""S2FT: structured sparse fine-tuning of MLP channels (Yang et al., NeurIPS 2024, arXiv 2412.06289).

In an MLP block ``h = act(x W_inᵀ)`` (LLaMA: ``act(x W_gateᵀ) ⊙ (x W_upᵀ)``), ``y = h W_outᵀ``,
intermediate channel j is row j of every in-projection and column j of the out-projection.
S2FT picks a set S of channels per block and trains exactly those rows and columns as dense
slices; everything else stays frozen:

    W_in  = W_in⁰  + E_S Δ_in        Δ_in  : |S|×n   (rows S of up/gate, BERT intermediate.dense)
    W_out = W_out⁰ + Δ_out E_Sᵀ      Δ_out : m×|S|   (columns S of down, BERT output.dense)

with E_S the I×|S| channel-selection matrix. The forward adds ``x Δ_inᵀ`` into output channels S
of each in-layer and ``x[..., S] Δ_outᵀ`` to the out-layer's output, so gradients and optimizer
state are O(|S|·width) and no dense weight gradient is formed. The slices are stored as
updates (zero at the start, so the model is exactly the base model until it trains) and
``merge_and_unload`` adds them into the weights: plain layers of the model's own class again.

Budget per block: ``density`` δ gives |S| = round(δ·I); ``match_lora_rank`` r gives the
trainable count of LoRA at rank r on the same layers, |S| = round(r·Σ(m+n) / (Σ_in n + Σ_out m))
(BERT/MiniLM, h=384, I=1536, r=8: |S| = 8·2·1920/768 = 40 channels).

Selection: ``"random"`` draws S per block from a seeded generator (the paper's choice);
``"gradient"`` ranks channels by the squared gradient norm of their rows and column over a few
calibration batches (``model.calibrate(batches)``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .errors import AdapterMismatchError, ConfigError, NotCalibratedError, TargetError
from .gradients import RngState, gradient_pass, require_dict
from .fingerprint import base_fingerprint, base_samples, same_base_in_another_precision
from .quantized import is_quantized
from .targets import Target, find_targets, weight_of
from .tuner import BaseTuner, BaseTunerLayer


# Out-projections of an MLP block, by name (needed when hidden == intermediate size).
_OUT_NAME = re.compile(r".*(?:down_proj|output\.dense|c_proj|fc2|dense_4h_to_h|lin2|wo)$")
_BLOCK = re.compile(r"(.*\.\d+)\.")


@dataclass
class S2FTConfig:
    """Which channels of each MLP block train.

    Budget (first set wins): ``match_lora_rank`` r (same trainable count as LoRA at rank r on
    the same layers), else ``density`` (fraction of the intermediate channels).
    """

    density: float | None = None
    match_lora_rank: int | None = 8
    selection: Literal["random", "gradient"] = "random"
    seed: int = 0
    # Module names/suffixes or a regex (as in SparseGradConfig); None: the MLP layers found.
    target_modules: list[str] | str | None = None
    # Trained densely and saved with the adapter; None: a classifier/score head if present.
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.match_lora_rank is None and self.density is None:
            raise ConfigError("S2FTConfig needs a budget: set match_lora_rank (e.g. 8) or density (e.g. 0.02).")
        if self.match_lora_rank is not None and int(self.match_lora_rank) < 1:
            raise ConfigError(f"match_lora_rank={self.match_lora_rank} must be a positive LoRA rank.")
        if self.match_lora_rank is None and not (0.0 < float(self.density) <= 1.0):
            raise ConfigError(f"density={self.density} must be in (0, 1]: the fraction of each MLP's channels that train.")
        if self.selection not in ("random", "gradient"):
            raise ConfigError(f"selection={self.selection!r} is not known; use 'random' (the paper's) or 'gradient'.")

    def channels(self, intermediate: int, lora_count: int, per_channel: int) -> int:
        """|S| for a block of ``intermediate`` channels."""
        if self.match_lora_rank is not None:
            c = max(1, round(lora_count / per_channel))
        else:
            c = max(1, round(float(self.density) * intermediate))
        if c > intermediate:
            raise ConfigError(
                f"The budget asks for {c} channels but the MLP has only {intermediate}; lower match_lora_rank/density."
            )
        return c

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class S2FTLinear(BaseTunerLayer):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) plus a trainable dense slice: rows
    ``channels`` of its m×n weight (``axis='rows'``) or those columns (``axis='cols'``)."""

    def __init__(self, base_layer: nn.Module, channels: torch.Tensor, axis: Literal["rows", "cols"]) -> None:
        super().__init__(base_layer)
        W0 = weight_of(base_layer)
        self.axis = axis
        dtype = torch.float32 if W0.dtype in (torch.float16, torch.bfloat16) else W0.dtype
        shape = (channels.numel(), self.n) if axis == "rows" else (self.m, channels.numel())
        self.delta = nn.Parameter(torch.zeros(shape, dtype=dtype, device=W0.device))
        self.register_buffer("channels", channels.to(W0.device, torch.long), persistent=False)

    def set_channels(self, channels: torch.Tensor) -> None:
        if channels.numel() != self.channels.numel():
            raise ValueError(f"expected {self.channels.numel()} channels, got {channels.numel()}")
        self.channels = channels.to(self.channels.device, torch.long)

    def update_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        delta = self.delta.to(x.dtype)
        if self.axis == "rows":
            return y.index_add(-1, self.channels, F.linear(x, delta))
        return y + F.linear(x.index_select(-1, self.channels), delta)

    def delta_weight(self) -> torch.Tensor:
        """ΔW: the slice placed at its rows (or columns) of an m×n zero matrix."""
        dim = 0 if self.axis == "rows" else 1
        return self.delta.new_zeros(self.m, self.n).index_add(dim, self.channels, self.delta)

    @torch.no_grad()
    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A row slice is E_S Δ (B = E_S, A = Δ); a column slice is Δ E_Sᵀ (B = Δ, A = E_Sᵀ)."""
        delta = self.delta.detach().float()
        if self.axis == "rows":
            return torch.eye(self.m, device=delta.device).index_select(1, self.channels), delta
        return delta, torch.eye(self.n, device=delta.device).index_select(0, self.channels)

    def extra_repr(self) -> str:
        return f"{self.m}x{self.n}, {self.channels.numel()} {self.axis} trainable"


@dataclass(frozen=True)
class MLPBlock:
    """The in-projections (up/gate) and out-projection(s) (down) of one MLP block."""

    name: str
    inputs: tuple[Target, ...]
    outputs: tuple[Target, ...]
    intermediate: int


def find_mlp_blocks(model: nn.Module, target_modules: list[str] | str | None = None) -> list[MLPBlock]:
    """Pair the MLP layers of each block: in-layers map hidden→I, out-layers map I→hidden."""
    by_block: dict[str, list[Target]] = {}
    for t in find_targets(model, target_modules):
        match = _BLOCK.match(t.name)
        by_block.setdefault(match.group(1) if match else "", []).append(t)
    blocks = []
    for name, targets in by_block.items():
        outs = [t for t in targets if _OUT_NAME.fullmatch(t.name)]
        if not outs:  # unknown naming: the out-layer is the one fed by the others' outputs
            outs = [t for t in targets if any(o is not t and o.m == t.n and o.n == t.m for o in targets)]
            outs = [t for t in outs if t.m < t.n] or outs[:1]
        ins = [t for t in targets if t not in outs]
        sizes = {t.m for t in ins} | {t.n for t in outs}
        if not ins or not outs or len(sizes) != 1:
            raise TargetError(
                f"Cannot pair the MLP layers of block {name or '<root>'!r} into in/out projections "
                f"({[(t.name, t.m, t.n) for t in targets]}); pass target_modules= naming the up/gate and down layers."
            )
        blocks.append(MLPBlock(name, tuple(ins), tuple(outs), sizes.pop()))
    return blocks


class S2FTModel(BaseTuner):
    """A model whose MLP blocks train |S| channels each. Build with :func:`get_s2ft_model`."""

    adapter_kind = "s2ft-adapter"
    layer_class = S2FTLinear
    config_class = S2FTConfig

    @property
    def s2ft_config(self) -> S2FTConfig:
        return self.tuner_config

    def _setup(self, model: nn.Module) -> None:
        self.blocks = find_mlp_blocks(model, self.tuner_config.target_modules)
        quantized = [t.name for b in self.blocks for t in b.inputs + b.outputs if is_quantized(model.get_submodule(t.name))]
        if quantized:  # S2FT trains slices of W0 itself: there is no float W0 to train in a quantized layer
            raise ConfigError(f"S2FT trains rows and columns of W0, which {quantized[0]} stores quantized: use sparsegrad "
                              "(get_sparse_model) or peft's LoRA on a quantized base, or load the base in full precision.")
        targets = [t for b in self.blocks for t in b.inputs + b.outputs]
        self.fingerprint, self.base_samples = base_fingerprint(model, targets), base_samples(model, targets)
        self.calibrated = self.tuner_config.selection == "random"

    def _create_layers(self, model: nn.Module):
        config = self.tuner_config
        gen = torch.Generator().manual_seed(config.seed)
        for block in self.blocks:
            layers = block.inputs + block.outputs
            lora = config.match_lora_rank * sum(t.m + t.n for t in layers) if config.match_lora_rank else 0
            per_channel = sum(t.n for t in block.inputs) + sum(t.m for t in block.outputs)
            c = config.channels(block.intermediate, lora, per_channel)
            channels = torch.randperm(block.intermediate, generator=gen)[:c].sort().values
            for t, axis in [(t, "rows") for t in block.inputs] + [(t, "cols") for t in block.outputs]:
                yield t.name, S2FTLinear(model.get_submodule(t.name), channels, axis)

    def _before_forward(self) -> None:
        if not self.calibrated and self.training and torch.is_grad_enabled():
            raise NotCalibratedError("S2FT selection='gradient' chooses channels from gradients: call model.calibrate(batches) first.")

    def s2ft_layers(self) -> dict[str, S2FTLinear]:
        return self.adapted_layers()

    def channels(self) -> dict[str, list[int]]:
        """The trained channels of each block."""
        return {b.name: self.base_model.get_submodule(b.inputs[0].name).channels.tolist() for b in self.blocks}

    def calibrate(
        self,
        batches: Iterable[Mapping[str, Any]],
        steps: int = 20,
        loss_fn: Callable[[Any, Mapping[str, Any]], torch.Tensor] | None = None,
        show_progress: bool = False,
    ) -> dict[str, list[int]]:
        """Gradient selection: score channel j of a block by Σ‖∂L/∂(row j of in-layers)‖² +
        ‖∂L/∂(column j of the out-layer)‖² over ``steps`` batches, keep the top |S|. The gradients
        come from the pass SparseGrad's calibration uses (sparseft.gradients), in eval mode (no
        dropout noise in the scores); the model, its gradients and the RNG state are left as they were."""
        layers = self.s2ft_layers()
        cached = []
        for batch in batches:
            require_dict(batch)
            if len(cached) >= steps:
                break
            cached.append(batch)
        if not cached:
            raise ConfigError("calibrate() got no batches: pass an iterable of model-input dicts.")
        scores = {b.name: torch.zeros(b.intermediate, dtype=torch.float64) for b in self.blocks}
        # each adapted layer adds its channels' squared gradient norms to its block's score
        axis_of = {t.name: (b.name, 1) for b in self.blocks for t in b.inputs}  # in-layers: rows
        axis_of.update({t.name: (b.name, 0) for b in self.blocks for t in b.outputs})  # out-layer: columns

        def add(name: str, layer: nn.Module, G: torch.Tensor) -> None:
            block, dim = axis_of[name]
            scores[block] += G.double().pow(2).sum(dim).cpu()

        rng = RngState()
        was_training = self.base_model.training
        self.base_model.eval()
        try:
            gradient_pass(self.base_model, layers, cached, loss_fn, add, "s2ft: gradients", show_progress)
        finally:
            self.base_model.train(was_training)
            rng.restore()
        with torch.no_grad():
            for b in self.blocks:
                c = layers[b.inputs[0].name].channels.numel()
                chosen = torch.topk(scores[b.name], c).indices.sort().values
                for t in b.inputs + b.outputs:
                    layers[t.name].set_channels(chosen)
        self.calibrated = True
        return self.channels()

    def _adapter_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {f"layers.{name}.delta": layer.delta for name, layer in self.s2ft_layers().items()}
        for block, channels in self.channels().items():
            tensors[f"blocks.{block}.channels"] = torch.tensor(channels, dtype=torch.int64)
        return tensors, {"layers": {name: [layer.m, layer.n, layer.axis] for name, layer in self.s2ft_layers().items()},
                         "fingerprint": self.fingerprint, "base_samples": self.base_samples}

    @classmethod
    def _wrong_kind(cls, path: Path, kind: Any) -> str:
        return f"{path} is not an S2FT adapter (kind {kind!r})."

    @classmethod
    def _expected_tensors(cls, meta: dict[str, Any]) -> list[str]:
        return [f"layers.{name}.delta" for name in meta.get("layers", {})]

    @classmethod
    def _check_fit(cls, model: nn.Module, config: S2FTConfig, meta: dict[str, Any], **_: Any) -> None:
        ours = {}
        for b in find_mlp_blocks(model, config.target_modules):
            ours.update({t.name: [t.m, t.n, "rows"] for t in b.inputs})
            ours.update({t.name: [t.m, t.n, "cols"] for t in b.outputs})
        if ours != meta["layers"]:
            raise AdapterMismatchError("The adapter's layers do not fit this model: it was saved for another architecture or size.")
        blocks = find_mlp_blocks(model, config.target_modules)
        targets = [t for b in blocks for t in b.inputs + b.outputs]
        ours_fingerprint = base_fingerprint(model, targets)
        if (meta.get("fingerprint", ours_fingerprint) != ours_fingerprint  # (older files carry none)
                and not same_base_in_another_precision(meta.get("base_samples"), base_samples(model, targets))):
            raise AdapterMismatchError(
                f"The adapter was trained on other base weights (fingerprint {meta['fingerprint']} ≠ {ours_fingerprint}): "
                "load the base checkpoint it was trained on.")

    @torch.no_grad()
    def _load_adapter_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], **_: Any) -> None:
        for b in self.blocks:
            for t in b.inputs + b.outputs:
                layer = self.base_model.get_submodule(t.name)
                layer.set_channels(tensors[f"blocks.{b.name}.channels"])
                layer.delta.copy_(tensors[f"layers.{t.name}.delta"])
        self.calibrated = True


def get_s2ft_model(model: nn.Module, config: S2FTConfig | None = None) -> S2FTModel:
    """Adapt ``model``'s MLP blocks for S2FT in place and wrap it. The wrapper's ``forward``
    carries the base model's signature, so ``transformers.Trainer`` sees the real input names."""
    return S2FTModel.wrap(model, config or S2FTConfig())


__all__ = ["MLPBlock", "S2FTConfig", "S2FTLinear", "S2FTModel", "find_mlp_blocks", "get_s2ft_model"]
