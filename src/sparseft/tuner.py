"""The tuner life cycle shared by every method (in the spirit of peft's ``BaseTuner`` /
``BaseTunerLayer``): find targets → inject layers → freeze all but the heads → train →
``save_pretrained`` / ``from_pretrained`` (verified before the model is touched) →
``merge_adapter`` / ``unmerge_adapter`` / ``disable_adapter`` → ``merge_and_unload`` / ``unload``.

A method is a config, a :class:`BaseTunerLayer` subclass (the frozen base layer plus an update
ΔW) and a :class:`BaseTuner` subclass that says which layers to create and which tensors its
adapter file holds. Everything else lives here once.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from . import __version__
from .errors import AdapterMismatchError, ConfigError
from .serialization import atomic_write_text, load_tensors, save_tensors
from .targets import find_heads, weight_of

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


class BaseTunerLayer(nn.Module):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) plus a trainable update ΔW (m×n).

    Subclasses give ``delta_weight()`` (ΔW, differentiable), ``update_forward(x)`` (the
    adapted forward), ``adapter_parameters()`` and ``trainable_count()``. Merging folds ΔW into
    the base weight in place (``merge``) and takes it out again (``unmerge``); a merged or
    disabled layer computes the base layer alone."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        W0 = weight_of(base_layer)
        self.m, self.n = (int(s) for s in W0.shape)
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def update_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with ΔW = B A exactly (B: m×r, A: r×n): the update as a LoRA of rank r.
        Default: the dense ΔW as B = ΔW, A = I (subclasses give their low-rank form)."""
        delta = self.delta_weight().detach()
        return delta, torch.eye(self.n, dtype=delta.dtype, device=delta.device)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def has_update(self) -> bool:
        """False while the update is not defined yet (e.g. before calibration)."""
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        return self.update_forward(x)

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        W = weight_of(self.base_layer)  # a view for Conv1D: writes go to its stored weight
        if self.has_update():
            W.copy_((W.float() + sign * self.delta_weight().float()).to(W.dtype))

    def merge(self) -> nn.Module:
        """Fold ΔW into the base weight (once); returns the base layer."""
        if not self.merged:
            self._fold(1.0)
            self.merged = True
        return self.base_layer

    def unmerge(self) -> None:
        """Take ΔW out of the base weight again (exact up to float rounding)."""
        if self.merged:
            self._fold(-1.0)
            self.merged = False


_WRAPPERS = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def unwrap_model(model: Any, cls: type | tuple[type, ...] | None = None) -> Any:
    """The ``cls`` instance under DDP / accelerate / FSDP wrappers (their ``.module``), or None;
    with ``cls=None``, the module under the DDP / DataParallel / FSDP wrappers, whatever it is."""
    if cls is None:
        while type(model).__name__ in _WRAPPERS and hasattr(model, "module"):
            model = model.module
        return model
    while model is not None and not isinstance(model, cls):
        model = getattr(model, "module", None)
    return model


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


class BaseTuner(nn.Module):
    """Wraps ``base_model``, passes calls and unknown attributes on to it (as ``peft.PeftModel``
    does, so ``model.config`` and ``generate`` keep working), and runs the adapter life cycle.

    Subclasses set ``adapter_kind`` (the ``kind`` in the adapter file), ``layer_class``, and
    implement ``_create_layers`` (and optionally ``_setup``, ``_adapter_tensors``,
    ``_load_adapter_tensors``, ``_check_fit``, ``config_from_meta``)."""

    adapter_kind: ClassVar[str]
    layer_class: ClassVar[type[BaseTunerLayer]] = BaseTunerLayer
    config_class: ClassVar[type] = object

    def __init__(self, model: nn.Module, config: Any, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ConfigError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}.")
        if hasattr(config, "validate"):
            config.validate()
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ConfigError("This model is already adapted by sparseft; merge_and_unload() it or use a fresh model.")
        self.base_model = model
        self.tuner_config = config
        self.heads: list[str] = find_heads(model, config.modules_to_save)
        self._setup(model, **kwargs)  # everything that can fail on bad input, before any change
        self._freeze_all_but_heads(model)
        self._layer_names: list[str] = []
        for name, layer in self._create_layers(model):
            _replace(model, name, layer)
            self._layer_names.append(name)
        self._after_inject(**kwargs)

    # ------------------------------------------------------------------ subclass hooks
    def _setup(self, model: nn.Module, **kwargs: Any) -> None:
        """Find targets and read anything the injection needs (no change to ``model`` yet)."""

    def _create_layers(self, model: nn.Module) -> Iterable[tuple[str, BaseTunerLayer]]:
        raise NotImplementedError

    def _after_inject(self, **kwargs: Any) -> None:
        """Fill state read in ``_setup`` into the new layers."""

    def _before_forward(self) -> None:
        """Checks before each forward (e.g. calibration done)."""

    # ------------------------------------------------------------------ wrapper plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._before_forward()
        return self.base_model(*args, **kwargs)

    @classmethod
    def wrap(cls, model: nn.Module, config: Any, **kwargs: Any) -> "BaseTuner":
        """Adapt ``model`` in place and wrap it in a subclass whose ``forward`` carries the model's
        signature, so ``transformers.Trainer`` finds the input and label names it inspects for."""
        if not isinstance(model, nn.Module):
            raise ConfigError(f"sparseft adapts a torch nn.Module (e.g. a transformers model), got {type(model).__name__}.")
        return _signature_class(cls, type(model))(model, config, **kwargs)

    def _freeze_all_but_heads(self, model: nn.Module) -> None:
        """Freeze ``model`` except its heads; remember each parameter's ``requires_grad`` for unload."""
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for head in self.heads:
            for p in model.get_submodule(head).parameters():
                p.requires_grad_(True)

    def adapted_layers(self) -> dict[str, BaseTunerLayer]:
        return {name: self.base_model.get_submodule(name) for name in self._layer_names}

    # transformers.Trainer checkpoints a model that is not a PreTrainedModel with
    # safetensors.save_file(model.state_dict()) and resumes with model.load_state_dict(sd, False).
    # safetensors refuses tensors stored twice, so tied weights (input embeddings = LM head) are
    # kept under their first name only and filled back in on load.
    def _tied_aliases(self) -> dict[str, str]:
        """{second name: first name} for each tensor registered under two names."""
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, tensor in [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]:
            if id(tensor) in first:
                aliases[name] = first[id(tensor)]
            else:
                first[id(tensor)] = name
        return aliases

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for alias in self._tied_aliases():
            state.pop(prefix + alias, None)
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        state = dict(state_dict)
        for alias, name in self._tied_aliases().items():
            if alias not in state and name in state:
                state[alias] = state[name]
        return super().load_state_dict(state, strict=strict, assign=assign)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by DistributedDataParallel: buffers it must not re-broadcast before every forward.
        The adapters' buffers (supports, channels) are identical on every rank and constant
        while training; broadcasting them would cost more than the gradient all-reduce itself."""
        names = []
        for layer_name, layer in self.adapted_layers().items():
            names += [f"base_model.{layer_name}.{b}" for b, _ in layer.named_buffers() if not b.startswith("base_layer.")]
        return names

    # ------------------------------------------------------------------ budget report
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all): the adapters' trained entries plus the dense heads; all = the base
        model's own parameters."""
        layers = self.adapted_layers()
        trainable = sum(layer.trainable_count() for layer in layers.values())
        trainable += sum(p.numel() for h in self.heads for p in self.base_model.get_submodule(h).parameters())
        adapter = {id(p) for layer in layers.values() for p in layer.adapter_parameters()}
        total = sum(p.numel() for p in self.base_model.parameters() if id(p) not in adapter)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ merge, disable
    def merge_adapter(self) -> None:
        """Fold every update into its base weight, keeping the adapter layers (``unmerge_adapter``
        takes them out again): inference at the base model's speed."""
        for layer in self.adapted_layers().values():
            layer.merge()

    def unmerge_adapter(self) -> None:
        for layer in self.adapted_layers().values():
            layer.unmerge()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the adapted layers compute the base layers alone (heads stay as
        trained): e.g. the frozen reference model of DPO, without a second copy."""
        layers = list(self.adapted_layers().values())
        before = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, was in zip(layers, before):
                layer.disabled = was

    def _restore_base(self, merge: bool) -> nn.Module:
        for name, layer in self.adapted_layers().items():
            if merge:
                layer.merge()
            elif layer.merged:
                layer.unmerge()
            _replace(self.base_model, name, layer.base_layer)
        self._layer_names = []
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))
        return self.base_model

    def merge_and_unload(self) -> nn.Module:
        """Fold every update into its base weight and return the base model (its own class,
        plain nn.Linear / Conv1D layers, no sparseft module left)."""
        return self._restore_base(merge=True)

    def unload(self) -> nn.Module:
        """The base model without the updates (heads keep their trained weights)."""
        return self._restore_base(merge=False)

    # ------------------------------------------------------------------ export to peft
    @torch.no_grad()
    def export_lora(self, save_directory: str | os.PathLike, rank: int | None = None) -> dict[str, float]:
        """Write the updates as a standard ``peft`` LoRA adapter that ``PeftModel.from_pretrained``
        (and every tool built on peft's format) loads: ``adapter_config.json`` (``peft_type``
        LORA, per-layer ``rank_pattern``/``alpha_pattern`` with scaling 1, ``modules_to_save``
        for the heads, ``fan_in_fan_out`` for Conv1D) and ``adapter_model.safetensors`` with peft's
        key names. Every update here is low rank (ΔW = P_R D Q_Cᵀ, or a row/column slice), so with
        ``rank=None`` the export is exact. With ``rank=r`` each layer is truncated to its best
        rank-r approximation (SVD); returns each layer's relative error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F
        (0 where exact)."""
        from .targets import is_transposed

        tensors: dict[str, torch.Tensor] = {}
        ranks: dict[str, int] = {}
        errors: dict[str, float] = {}
        conv = set()
        for name, layer in self.adapted_layers().items():
            B, A = layer.lora_factors()
            B, A = B.float(), A.float()
            errors[name] = 0.0
            if rank is not None and B.shape[1] > rank:
                B, A, errors[name] = _truncate(B, A, rank)
            if B.shape[1] == 0:  # no update yet: a rank-1 LoRA that adds zero
                B, A = B.new_zeros(layer.m, 1), A.new_zeros(1, layer.n)
            ranks[name] = int(B.shape[1])
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
            if is_transposed(layer.base_layer):
                conv.add(name)
        if conv and len(conv) != len(ranks):
            raise ConfigError("export_lora: peft's fan_in_fan_out is one setting per adapter; this model mixes "
                              "Conv1D and nn.Linear targets: export them as two adapters.")
        for head in self.heads:
            for key, value in self.base_model.get_submodule(head).state_dict().items():
                tensors[f"base_model.model.{head}.{key}"] = value.detach()
        r_max = max(ranks.values(), default=1)
        config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
            "inference_mode": True, "r": r_max, "lora_alpha": r_max, "lora_dropout": 0.0, "bias": "none",
            "target_modules": sorted(ranks), "modules_to_save": self.heads or None,
            "rank_pattern": ranks, "alpha_pattern": dict(ranks), "fan_in_fan_out": bool(conv),
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "layers_to_transform": None,
            "layers_pattern": None,
        }
        out = Path(save_directory)
        meta = {"format": "pt", "exported_by": f"sparseft {__version__}", "kind": self.adapter_kind}
        save_tensors(out / ADAPTER_FILE, {k: v.cpu() for k, v in tensors.items()}, meta)
        atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2))
        return errors

    # ------------------------------------------------------------------ adapter files
    def _adapter_tensors(self, **kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, extra metadata) of the layers' updates for ``save_pretrained``."""
        raise NotImplementedError

    def _head_tensors(self) -> dict[str, torch.Tensor]:
        return {f"heads.{head}.{key}": value for head in self.heads
                for key, value in self.base_model.get_submodule(head).state_dict().items()}

    def _check_ready_to_save(self) -> None:
        """Raise if there is nothing to save yet."""

    def _meta(self) -> dict[str, Any]:
        return {"kind": self.adapter_kind, "version": __version__, "config": self.tuner_config.to_dict(),
                "base_model_class": type(self.base_model).__name__}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Any:
        """Write the adapter only: ``adapter_model.safetensors`` (the updates and the dense heads)
        and ``adapter_config.json``, each atomically."""
        self._check_ready_to_save()
        tensors, extra = self._adapter_tensors(**kwargs)
        tensors.update(self._head_tensors())
        meta = {**self._meta(), **extra}
        out = Path(save_directory)
        size = save_tensors(out / ADAPTER_FILE, tensors, meta)
        atomic_write_text(out / CONFIG_FILE, json.dumps(dict(meta, adapter_bytes=size), indent=2))
        return self._save_result(size, tensors)

    def _save_result(self, size: int, tensors: dict[str, torch.Tensor]) -> Any:
        return size

    @classmethod
    def read_adapter(cls, model: nn.Module, save_directory: str | os.PathLike) -> tuple[dict, dict]:
        """(tensors, meta) of an adapter saved by ``save_pretrained``, checked to be this method's
        and made for ``model``'s class."""
        path = Path(save_directory)
        tensors, meta = load_tensors(path / ADAPTER_FILE if path.is_dir() else path, "adapter")
        if meta.get("kind") != cls.adapter_kind:
            raise AdapterMismatchError(cls._wrong_kind(path, meta.get("kind")))
        if meta["base_model_class"] != type(model).__name__:
            raise AdapterMismatchError(
                f"This adapter was trained on a {meta['base_model_class']}, not a {type(model).__name__}: "
                "load the same model class (e.g. AutoModelForSequenceClassification vs AutoModel)."
            )
        return tensors, meta

    @classmethod
    def _wrong_kind(cls, path: Path, kind: Any) -> str:
        return f"{path} holds a sparseft {kind!r} file, not a {cls.adapter_kind!r} adapter."

    @classmethod
    def config_from_meta(cls, meta: dict[str, Any]) -> Any:
        return cls.config_class(**meta["config"])

    @classmethod
    def _check_fit(cls, model: nn.Module, config: Any, meta: dict[str, Any], **kwargs: Any) -> None:
        """Raise AdapterMismatchError if the adapter cannot load onto ``model`` (called before
        the model is touched)."""

    @staticmethod
    def _check_heads(model: nn.Module, heads: list[str], tensors: dict[str, torch.Tensor]) -> None:
        for head in heads:
            prefix = f"heads.{head}."
            try:
                own = model.get_submodule(head).state_dict()
            except AttributeError:
                own = {}
            for key, value in tensors.items():
                if key.startswith(prefix):
                    mine = own.get(key[len(prefix):])
                    if mine is None or tuple(mine.shape) != tuple(value.shape):
                        raise AdapterMismatchError(
                            f"The adapter's head {head!r} has {key[len(prefix):]} of shape {tuple(value.shape)}, "
                            f"this model's is {None if mine is None else tuple(mine.shape)}: load the base model "
                            "with the same head (e.g. the same num_labels) as the adapter was trained with."
                        )

    def _load_adapter_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], **kwargs: Any) -> None:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, model: nn.Module, save_directory: str | os.PathLike, **kwargs: Any) -> "BaseTuner":
        """Rebuild the adapted model on a fresh ``model`` from ``save_pretrained`` output. Every
        check runs first: a failed load leaves ``model`` as it was."""
        tensors, meta = cls.read_adapter(model, save_directory)
        config = cls.config_from_meta(meta)
        cls._check_fit(model, config, meta, **kwargs)
        cls._check_heads(model, find_heads(model, config.modules_to_save), tensors)
        tuner = cls.wrap(model, config)
        tuner._load_adapter_tensors(tensors, meta, **kwargs)
        for head in tuner.heads:
            prefix = f"heads.{head}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            tuner.base_model.get_submodule(head).load_state_dict(state)
        return tuner


def _truncate(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` (B', A') of B A (Eckart-Young, through QR of the thin factors), with
    the relative Frobenius error of the cut."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
    total = float(S.pow(2).sum())
    error = (float(S[rank:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    B_r = (Qb @ U[:, :rank]) * S[:rank]
    A_r = Vh[:rank] @ Qa.T
    return B_r, A_r, error


_CLASSES: dict[tuple[type, type], type] = {}


def _signature_class(tuner_class: type[BaseTuner], model_class: type) -> type:
    """A ``tuner_class`` subclass whose ``forward`` has ``model_class.forward``'s signature."""
    key = (tuner_class, model_class)
    if key not in _CLASSES:

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return tuner_class.forward(self, *args, **kwargs)

        try:
            forward.__signature__ = inspect.Signature(list(inspect.signature(model_class.forward).parameters.values()))  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            pass
        prefix = tuner_class.__name__.removesuffix("Model")
        _CLASSES[key] = type(f"{prefix}{model_class.__name__}", (tuner_class,), {"forward": forward, "__module__": tuner_class.__module__})
    return _CLASSES[key]


__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "BaseTuner", "BaseTunerLayer", "unwrap_model"]
