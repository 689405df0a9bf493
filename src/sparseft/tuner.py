"""The tuner life cycle shared by every method (in the spirit of peft's ``BaseTuner`` /
``BaseTunerLayer``): find targets → inject layers → freeze all but the heads → train →
``save_pretrained`` / ``from_pretrained`` (verified before the model is touched) →
``merge_adapter`` / ``unmerge_adapter`` / ``disable_adapter`` → ``merge_and_unload`` / ``unload``;
and, as in peft, more adapters on the same base for inference: ``load_adapter`` / ``set_adapter`` /
``delete_adapter`` and mixed batches (``model(**batch, adapter_names=[...])``, also in ``generate``).

A method is a config, a :class:`BaseTunerLayer` subclass (the frozen base layer plus an update
ΔW) and a :class:`BaseTuner` subclass that says which layers to create and which tensors its
adapter file holds. Everything else lives here once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.func import functional_call

from . import __version__
from .errors import AdapterMismatchError, ConfigError, InputError
from .half_heads import Float32Head
from .loaded import LowRankUpdate, SparseFactors, mixed_delta
from .progress import progress
from .serialization import atomic_write_text, load_tensors, save_tensors
from .quantized import compute_dtype, dequantized, is_quantized, requantize, unpack_for_training
from .targets import find_heads, layer_shape, weight_of

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
DEFAULT_ADAPTER = "default"  # the adapter the model was built or loaded with (peft's name)
BASE_ADAPTER = "__base__"  # in ``adapter_names``: that row runs the base layers (peft's name)

RowGroups = dict[str, torch.Tensor]  # adapter name → indices of the batch rows that use it


class BaseTunerLayer(nn.Module):
    """A frozen ``base_layer`` (nn.Linear or Conv1D) plus a trainable update ΔW (m×n).

    Subclasses give ``delta_weight()`` (ΔW, differentiable), ``update_forward(x)`` (the
    adapted forward), ``adapter_parameters()`` and ``trainable_count()``. Merging folds ΔW into
    the base weight in place (``merge``) and takes it out again (``unmerge``); a merged or
    disabled layer computes the base layer alone.

    The layer's own (trainable) update is the adapter ``"default"``; ``extra_updates`` holds the
    updates of adapters loaded for inference (``BaseTuner.load_adapter``), and ``active_adapter``
    says which one ``forward`` adds. During a mixed-batch forward the tuner sets ``batch_groups``
    (the batch size and the rows of each adapter) and row i gets W0 + ΔW_{adapter(i)}."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.m, self.n = layer_shape(base_layer)
        self.merged = False
        self.disabled = False
        self.active_adapter = DEFAULT_ADAPTER
        self.extra_updates = nn.ModuleDict()
        self.batch_groups: tuple[int, RowGroups] | None = None

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def release_base_layer(self) -> nn.Module:
        """The base layer to put back into the model on unload, stored as the model gave it
        (subclasses that re-lay the frozen weight out pack it back here)."""
        return self.base_layer

    def update_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.adapter_parameters())

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) with ΔW = B A exactly (B: m×r, A: r×n): the update as a LoRA of rank r.
        Default: the dense ΔW as B = ΔW, A = I (subclasses give their low-rank form)."""
        delta = self.delta_weight().detach()
        return delta, torch.eye(self.n, dtype=delta.dtype, device=delta.device)

    @torch.no_grad()
    def inference_update(self, dtype: torch.dtype) -> nn.Module:
        """This layer's update as a loaded adapter keeps it (``x ΔWᵀ``): by default its exact
        ``lora_factors()`` (:class:`~sparseft.loaded.LowRankUpdate`); methods with a compact form
        of their own return that."""
        return LowRankUpdate(*self.lora_factors(), dtype)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("base_layer.")]

    def has_update(self) -> bool:
        """False while the update is not defined yet (e.g. before calibration)."""
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        if self.batch_groups is not None:
            return self._mixed_batch_forward(x, *self.batch_groups)
        return self._adapter_forward(self.active_adapter, x)

    def _adapter_forward(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        """x (W0 + ΔW_adapter)ᵀ + b; ΔW = 0 for ``"__base__"``."""
        if adapter == DEFAULT_ADAPTER:
            return self.update_forward(x)
        y = self.base_layer(x)
        return y if adapter == BASE_ADAPTER else y + self.extra_updates[adapter](x).to(y.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, size: int, groups: RowGroups) -> torch.Tensor:
        """Row i of the batch through W0 + ΔW_{adapter(i)}: the base layer once for the whole batch,
        then each adapter's rows replaced (the layer's own update) or added to (a loaded ΔW x)."""
        if x.dim() == 0 or x.shape[0] != size:
            raise InputError(f"adapter_names gives {size} rows but this layer got an input of shape {tuple(x.shape)}: "
                             "pass one adapter name per row of the batch.")
        if len(groups) == 1:
            return self._adapter_forward(next(iter(groups)), x)
        y = self.base_layer(x)
        sparse = {a: f for a, rows in groups.items() if (f := self._sparse_form(a, rows.numel() * (x.numel() // size))) is not None}
        if sparse:  # the updates alone beside the base pass; adapters that share a basis rotate once
            y = y + mixed_delta(x, [(groups[a], f) for a, f in sparse.items()]).to(y.dtype)
        for adapter, rows in groups.items():
            if adapter in sparse:
                continue
            rows = rows.to(x.device)
            if adapter == DEFAULT_ADAPTER:
                y = y.index_copy(0, rows, self.update_forward(x.index_select(0, rows)).to(y.dtype))
            elif adapter != BASE_ADAPTER:
                y = y.index_add(0, rows, self.extra_updates[adapter](x.index_select(0, rows)).to(y.dtype))
        return y

    def _sparse_form(self, adapter: str, numel: int) -> SparseFactors | None:
        """``adapter``'s update as :class:`~sparseft.loaded.SparseFactors` where it is kept so
        (a loaded adapter) or infers so at ``numel`` input numbers (the own adapter); else None."""
        if adapter == DEFAULT_ADAPTER:
            return self.inference_factors(numel // self.n, beside_base=True)
        update = self.extra_updates[adapter] if adapter != BASE_ADAPTER else None
        return update if isinstance(update, SparseFactors) else None

    def inference_factors(self, tokens: int, beside_base: bool = False) -> SparseFactors | None:
        """The layer's own update as :class:`~sparseft.loaded.SparseFactors`, when it infers in
        that form at ``tokens`` rows (no gradients; ``beside_base``: next to a base pass already
        made, as in a mixed batch); None otherwise."""
        return None

    def _delta_of(self, adapter: str) -> torch.Tensor | None:
        """ΔW of ``adapter`` (m×n), None while the layer's own update is not defined yet."""
        if adapter == DEFAULT_ADAPTER:
            return self.delta_weight() if self.has_update() else None
        return self.extra_updates[adapter].delta_weight()

    @torch.no_grad()
    def _fold(self, sign: float, safe: bool = False) -> None:
        delta = self._delta_of(self.active_adapter)
        if delta is None:
            return
        quantized = is_quantized(self.base_layer)
        W = dequantized(self.base_layer) if quantized else weight_of(self.base_layer)  # (Conv1D: a view of its weight)
        folded = W.float() + sign * delta.float()
        stored = folded if quantized else folded.to(W.dtype)  # (requantize takes float32)
        if safe and not bool(torch.isfinite(stored).all()):
            raise InputError(f"NaNs or infs in the merged weights: the adapter '{self.active_adapter}' seems to be broken "
                             "(nothing of this layer was merged). Check its training, or merge without it.")
        if quantized:
            requantize(self.base_layer, stored)
        else:
            W.copy_(stored)

    def merge(self, safe_merge: bool = False) -> nn.Module:
        """Fold the active adapter's ΔW into the base weight (once); returns the base layer. With
        ``safe_merge`` (peft's name) a non-finite result is refused before the weight changes."""
        if not self.merged:
            self._fold(1.0, safe_merge)
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


def _adapter_file(path: Path) -> Path:
    return path / ADAPTER_FILE if path.is_dir() else path


_TUNERS: dict[str, type["BaseTuner"]] = {}  # adapter_kind → the tuner class that reads it


class BaseTuner(nn.Module):
    """Wraps ``base_model``, passes calls and unknown attributes on to it (as ``peft.PeftModel``
    does, so ``model.config`` and ``generate`` keep working), and runs the adapter life cycle.

    Subclasses set ``adapter_kind`` (the ``kind`` in the adapter file), ``layer_class``, and
    implement ``_create_layers`` (and optionally ``_setup``, ``_adapter_tensors``,
    ``_load_adapter_tensors``, ``_check_fit``, ``config_from_meta``).

    Several adapters, as in peft: the model's own adapter is ``"default"`` (the one it was built
    or loaded with, the only trainable one); ``load_adapter`` adds saved adapters of any method
    next to it, for inference. Each keeps its own heads (``modules_to_save``): the heads'
    modules hold the active adapter's, the others are kept as tensors."""

    adapter_kind: ClassVar[str]
    layer_class: ClassVar[type[BaseTunerLayer]] = BaseTunerLayer
    config_class: ClassVar[type] = object

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "adapter_kind" in cls.__dict__:  # a method's tuner (not a signature subclass of one)
            _TUNERS[cls.adapter_kind] = cls

    def __reduce_ex__(self, protocol: Any) -> Any:
        """Pickling (``torch.save(model)``, ``copy.deepcopy``): a signature subclass is made at run
        time and cannot be found by its name, so it is rebuilt from its tuner and model classes."""
        made = next((key for key, cls in _CLASSES.items() if cls is type(self)), None)
        if made is None:
            return super().__reduce_ex__(protocol)
        return _new_signature_instance, made, self.__dict__

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
        self._float32_heads = [Float32Head(model.get_submodule(head)) for head in self.heads]
        self._layer_names: list[str] = []
        for name, layer in self._create_layers(model):
            _replace(model, name, layer)
            self._layer_names.append(name)
        self._after_inject(**kwargs)
        self._adapters: list[str] = [DEFAULT_ADAPTER]
        self._active = DEFAULT_ADAPTER
        # heads of every adapter but the active one (whose heads are in the modules): adapter → head → state
        self._head_states: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self._in_head_hook = False

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

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's forward with the active adapter; with ``adapter_names`` (one name per
        row, ``"__base__"`` for none) each row uses its own adapter, as peft's mixed batches."""
        self._before_forward()
        if self._active != DEFAULT_ADAPTER and self.training and torch.is_grad_enabled():
            raise ConfigError(f"Adapter {self._active!r} was loaded for inference only: call model.eval() (or "
                              "torch.no_grad()), or set_adapter('default') to train the model's own adapter.")
        with self._mixed_batch(adapter_names, args, kwargs):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``; ``adapter_names`` as in ``forward`` (one per prompt)."""
        if adapter_names is not None:
            repeat = int(kwargs.get("num_beams") or 1) * int(kwargs.get("num_return_sequences") or 1)
            self._batch_groups(adapter_names, args, kwargs)  # checked per prompt, before expansion
            adapter_names = [name for name in adapter_names for _ in range(repeat)]
        with self._mixed_batch(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    @classmethod
    def wrap(cls, model: nn.Module, config: Any, **kwargs: Any) -> "BaseTuner":
        """Adapt ``model`` in place and wrap it in a subclass whose ``forward`` carries the model's
        signature, so ``transformers.Trainer`` finds the input and label names it inspects for."""
        if not isinstance(model, nn.Module):
            raise ConfigError(f"sparseft adapts a torch nn.Module (e.g. a transformers model), got {type(model).__name__}.")
        return _signature_class(cls, type(model))(model, config, **kwargs)

    def train(self, mode: bool = True) -> "BaseTuner":
        super().train(mode)
        if mode:
            unpack_for_training(self.base_model)  # (bitsandbytes' CPU inference packing drops input gradients)
        return self

    def _freeze_all_but_heads(self, model: nn.Module) -> None:
        """Freeze ``model`` except its heads."""
        for head in self.heads:
            if any(not p.is_floating_point() for p in model.get_submodule(head).parameters()):
                raise ConfigError(f"The head {head!r} is stored quantized, so it cannot train: load the base with "
                                  f"BitsAndBytesConfig(llm_int8_skip_modules=[{head.split('.')[-1]!r}]) to keep it in float.")
        for p in model.parameters():
            p.requires_grad_(False)
        for head in self.heads:
            for p in model.get_submodule(head).parameters():
                p.requires_grad_(True)

    def adapted_layers(self) -> dict[str, BaseTunerLayer]:
        return {name: self.base_model.get_submodule(name) for name in self._layer_names}

    # ------------------------------------------------------------------ several adapters
    @property
    def active_adapter(self) -> str:
        return self._active

    @property
    def active_adapters(self) -> list[str]:
        return [self._active]

    @property
    def adapter_names(self) -> list[str]:
        """The adapters on this model: ``"default"`` first, then those loaded, in load order."""
        return list(self._adapters)

    def _check_unmerged(self, what: str, layers: Iterable[BaseTunerLayer] | None = None) -> None:
        if any(layer.merged for layer in (self.adapted_layers().values() if layers is None else layers)):
            raise ConfigError(f"{what} needs the adapters unmerged: call unmerge_adapter() first.")

    def _heads_of(self, adapter: str) -> dict[str, dict[str, torch.Tensor]]:
        """{head: state dict} of ``adapter``'s heads."""
        if adapter == self._active:
            return {h: self.base_model.get_submodule(h).state_dict() for h in self.heads}
        return self._head_states[adapter]

    @torch.no_grad()
    def load_adapter(self, save_directory: str | os.PathLike, adapter_name: str, **kwargs: Any) -> None:
        """Load an adapter saved by ``save_pretrained`` (any method, made for this base model)
        next to the others, for inference (peft's ``is_trainable=False``); ``set_adapter`` or
        ``adapter_names=`` use it. Each layer keeps it as its ``lora_factors()`` (ΔW = B A exactly,
        r(m+n) numbers, or the dense ΔW where that is smaller: see :class:`LowRankUpdate`), taken
        from a temporary layer of the adapter's own method built on the same base layer; the
        heads as tensors. Every check runs before anything is kept: a failed load leaves the
        model and its adapters as they were. ``kwargs`` go to the method's loader (``bases=``)."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ConfigError(f"adapter_name={adapter_name!r} must be a non-empty string without '.'.")
        if adapter_name in self._adapters or adapter_name == BASE_ADAPTER:
            raise ConfigError(f"An adapter named {adapter_name!r} is already loaded (or reserved): pick another "
                              "name, or delete_adapter() it first.")
        self._check_unmerged("load_adapter()")
        path = Path(save_directory)
        tensors, meta = load_tensors(_adapter_file(path), "adapter")
        cls = _TUNERS.get(meta.get("kind"), type(self))  # an unknown kind: this method's check names it
        cls._check_meta(self.base_model, path, meta)
        config = cls.config_from_meta(meta)
        updates, heads = self._build_detached(cls, config, tensors, meta, **kwargs)
        self._share_bases(updates)
        for name, layer in self.adapted_layers().items():
            if name in updates:
                layer.extra_updates[adapter_name] = updates[name]
            else:  # not adapted by that adapter: ΔW = 0 (rank 0)
                W0, dtype = layer.base_layer.weight, compute_dtype(layer.base_layer)
                zero = LowRankUpdate(W0.new_zeros(layer.m, 0, dtype=dtype), W0.new_zeros(0, layer.n, dtype=dtype), dtype)
                layer.extra_updates[adapter_name] = zero
        self._head_states[adapter_name] = heads
        self._adapters.append(adapter_name)

    def _share_bases(self, updates: dict[str, nn.Module]) -> None:
        """Bases equal to ones already held (another loaded adapter's, the model's own) are held
        once: adapters with bases from the weights, or from one bases file, share them."""
        known = {id(t): t for t in self._own_bases()}
        for layer in self.adapted_layers().values():
            for update in layer.extra_updates.values():
                known.update({id(t): t for t in update.basis_tensors()})
        seen = {t.untyped_storage().data_ptr() for t in known.values()}
        for update in updates.values():
            if hasattr(update, "share_bases"):
                update.share_bases(list(known.values()), seen)
                known.update({id(t): t for t in update.basis_tensors()})

    def _own_bases(self) -> list[torch.Tensor]:
        """The basis tensors of this model's own adapter (none for methods without bases)."""
        return []

    def _build_detached(
        self, cls: type["BaseTuner"], config: Any, tensors: dict[str, torch.Tensor], meta: dict[str, Any], **kwargs: Any
    ) -> tuple[dict[str, LowRankUpdate], dict[str, dict[str, torch.Tensor]]]:
        """({layer: LowRankUpdate}, {head: state}) of a saved adapter of method ``cls``: the base
        layers are put back in place of this model's adapted layers, ``cls`` adapts the model and
        loads the file (its own checks included), the factors are read, and this model's layers
        and ``requires_grad`` flags are restored whatever happened."""
        model, layers = self.base_model, self.adapted_layers()
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for name, layer in layers.items():
            _replace(model, name, layer.base_layer)
        try:
            cls._check_fit(model, config, meta, **kwargs)
            heads = find_heads(model, config.modules_to_save)
            if heads != self.heads:
                raise AdapterMismatchError(f"The adapter's heads {heads} are not this model's {self.heads}: every "
                                           "adapter on one model must train the same modules_to_save.")
            cls._check_heads(model, heads, tensors)
            temporary = cls.wrap(model, config)
            temporary._load_adapter_tensors(tensors, meta, **kwargs)
            built = temporary.adapted_layers()
            extra = sorted(set(built) - set(layers))
            if extra:
                raise AdapterMismatchError(f"The adapter adapts layers this model's adapter does not ({extra[:3]}): load "
                                           "it on its own (from_pretrained), or adapt those layers in the default adapter too.")
            updates = {}
            for name, layer in built.items():
                W0 = layer.base_layer.weight
                updates[name] = layer.inference_update(compute_dtype(layer.base_layer)).to(W0.device)
        finally:
            for name, module in list(model.named_modules()):
                if isinstance(module, BaseTunerLayer):  # the temporary tuner's layers
                    _replace(model, name, module.release_base_layer())
            for name, layer in layers.items():
                _replace(model, name, layer)
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad[name])
        head_states = {}
        for head in heads:
            own = model.get_submodule(head).state_dict()
            prefix = f"heads.{head}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state.keys() != own.keys():
                raise AdapterMismatchError(f"The adapter's head {head!r} holds {sorted(state)}, this model's {sorted(own)}.")
            head_states[head] = {k: v.to(own[k].device, own[k].dtype) for k, v in state.items()}
        return updates, head_states

    def _check_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self._adapters:
            raise ConfigError(f"No adapter named {adapter_name!r}; loaded: {self._adapters}.")

    @torch.no_grad()
    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the one every forward uses (its layers' ΔW and its heads)."""
        self._check_adapter(adapter_name)
        layers = list(self.adapted_layers().values())  # looked up once: this is most of a switch's time
        self._check_unmerged("set_adapter()", layers)
        if adapter_name == self._active:
            return
        if self.heads:
            self._head_states[self._active] = {h: {k: v.clone() for k, v in state.items()}
                                               for h, state in self._heads_of(self._active).items()}
            for head, state in self._head_states.pop(adapter_name).items():
                self.base_model.get_submodule(head).load_state_dict(state)
        for layer in layers:
            layer.active_adapter = adapter_name
        self._active = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop a loaded adapter (not the active one, nor ``"default"``, the trainable one)."""
        self._check_adapter(adapter_name)
        if adapter_name == DEFAULT_ADAPTER:
            raise ConfigError("'default' is the model's own adapter (its trainable parameters and optimizer state): "
                              "it cannot be deleted; unload() or merge_and_unload() the model instead.")
        if adapter_name == self._active:
            raise ConfigError(f"{adapter_name!r} is the active adapter: set_adapter() another one first.")
        for layer in self.adapted_layers().values():
            del layer.extra_updates[adapter_name]
        self._head_states.pop(adapter_name, None)
        self._adapters.remove(adapter_name)

    def _batch_groups(self, adapter_names: Sequence[str], args: tuple = (),
                      kwargs: Mapping[str, Any] | None = None) -> RowGroups:
        """{adapter: row indices} of a mixed batch, after checking the names and their count."""
        if isinstance(adapter_names, str) or not all(isinstance(a, str) for a in adapter_names):
            raise InputError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}.")
        unknown = sorted(set(adapter_names) - {*self._adapters, BASE_ADAPTER})
        if unknown:
            raise InputError(f"adapter_names names unknown adapter(s) {unknown}; loaded: {self._adapters} (and '__base__').")
        if self.training:
            raise ConfigError("adapter_names is for inference: call model.eval() first (as in peft).")
        self._check_unmerged("adapter_names")
        if any(layer.disabled for layer in self.adapted_layers().values()):
            raise ConfigError("adapter_names cannot be used inside disable_adapter(): every row would be the base model.")
        kwargs = kwargs or {}
        inputs = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args)
        first = next((t for t in inputs if isinstance(t, torch.Tensor)), None)
        if first is not None and first.dim() > 0 and first.shape[0] != len(adapter_names):
            raise InputError(f"adapter_names has {len(adapter_names)} names for a batch of {first.shape[0]} rows: "
                             "give one per row.")
        device = next(iter(self.adapted_layers().values())).base_layer.weight.device
        rows: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            rows.setdefault(name, []).append(i)
        return {name: torch.tensor(r, dtype=torch.long, device=device) for name, r in rows.items()}

    @contextlib.contextmanager
    def _mixed_batch(self, adapter_names: Sequence[str] | None, args: tuple = (),
                     kwargs: Mapping[str, Any] | None = None) -> Iterator[None]:
        """Within the block every adapted layer and head routes batch rows by ``adapter_names``
        (set on the layers, a forward hook on the heads; both removed after)."""
        if adapter_names is None:
            yield
            return
        groups = self._batch_groups(adapter_names, args, kwargs)
        layers = list(self.adapted_layers().values())
        hooks = []
        if set(groups) - {self._active, BASE_ADAPTER}:  # some rows need another adapter's heads
            for head in self.heads:
                hook = functools.partial(self._head_hook, head, groups)
                hooks.append(self.base_model.get_submodule(head).register_forward_hook(hook, with_kwargs=True))
        for layer in layers:
            layer.batch_groups = (len(adapter_names), groups)
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_groups = None
            for hook in hooks:
                hook.remove()

    def _head_hook(self, head: str, groups: RowGroups, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Replace the rows of adapters other than the active one (whose head the module is; also
        ``"__base__"`` rows, as in ``disable_adapter``) by their own head's output."""
        if self._in_head_hook:  # the functional_call below runs the module (and this hook) again
            return output
        size = sum(len(rows) for rows in groups.values())

        def rows_of(value: Any, rows: torch.Tensor) -> Any:
            batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size
            return value.index_select(0, rows) if batched else value

        for adapter, rows in groups.items():
            if adapter in (self._active, BASE_ADAPTER):
                continue
            rows = rows.to(output.device)
            state = {k: v.to(output.device) for k, v in self._head_states[adapter][head].items()}
            self._in_head_hook = True
            try:
                sub = functional_call(module, state, tuple(rows_of(a, rows) for a in args),
                                      {k: rows_of(v, rows) for k, v in kwargs.items()})
            finally:
                self._in_head_hook = False
            output = output.index_copy(0, rows, sub.to(output.dtype))
        return output

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

    def _left_out_of_state_dict(self) -> Iterable[str]:
        """Names ``state_dict`` leaves out: a tied tensor's second name (subclasses add more)."""
        return self._tied_aliases()

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name in self._left_out_of_state_dict():
            state.pop(prefix + name, None)
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
    def merge_adapter(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold the active adapter's update into each base weight, W0 ← W0 + ΔW, keeping the
        adapter layers (``unmerge_adapter`` takes ΔW out again): inference at the base model's speed.
        peft's arguments: ``adapter_names`` may name the active adapter only (one adapter is
        merged at a time here); with ``safe_merge`` a layer whose merged weight would not be
        finite raises InputError, and the layers this call merged are unmerged again."""
        self._merge_layers(adapter_names, safe_merge, progressbar=False)

    def _merge_layers(self, adapter_names: Sequence[str] | None, safe_merge: bool, progressbar: bool) -> None:
        if adapter_names is not None:
            names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
            unknown = [name for name in names if name not in self.adapter_names]
            if unknown:
                raise ConfigError(f"adapter_names={names}: no adapter {unknown[0]!r} here (adapters: {self.adapter_names}).")
            if names != [self.active_adapter]:
                raise ConfigError(f"adapter_names={names}: sparseft merges the active adapter ({self.active_adapter!r}) "
                                  "alone; set_adapter(name) first, or merge_and_unload() and adapt the result again.")
        merged_now = []
        layers = self.adapted_layers()
        for name, layer in progress(layers.items(), "Unloading and merging model", len(layers), disable=not progressbar):
            if layer.merged:
                continue
            try:
                layer.merge(safe_merge)
            except InputError as exc:
                for done in merged_now:
                    done.unmerge()
                raise InputError(f"{name}: {exc}") from None
            merged_now.append(layer)

    def unmerge_adapter(self) -> None:
        for layer in self.adapted_layers().values():
            layer.unmerge()

    def get_base_model(self) -> nn.Module:
        """The model the adapter layers sit in (as peft's: the user's model, its targets
        replaced by adapter layers), e.g. for code that reads its config or submodules."""
        return self.base_model

    def disable_adapter_layers(self) -> None:
        """peft's lasting form of ``disable_adapter()``: the adapted layers compute the base layers
        alone until ``enable_adapter_layers()``."""
        for layer in self.adapted_layers().values():
            layer.disabled = True

    def enable_adapter_layers(self) -> None:
        for layer in self.adapted_layers().values():
            layer.disabled = False

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the adapted layers compute the base layers alone (heads stay the
        active adapter's): e.g. the frozen reference model of DPO, without a second copy. The
        active adapter is unchanged after the block."""
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
            _replace(self.base_model, name, layer.release_base_layer())
        self._layer_names = []
        for head in self._float32_heads:
            head.restore()
        return self.base_model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Fold every update into its base weight and return the base model (its own class,
        plain nn.Linear / Conv1D layers, no sparseft module left). As in peft, what was frozen
        stays frozen (only the heads train): training on densely would take a full fine-tune's
        memory unasked. To train on sparsely, adapt the returned model again. peft's arguments
        as in ``merge_adapter``; ``progressbar`` shows the layers as they merge."""
        self._merge_layers(adapter_names, safe_merge, progressbar)
        return self._restore_base(merge=True)

    def unload(self) -> nn.Module:
        """The base model without the updates (heads keep their trained weights)."""
        return self._restore_base(merge=False)

    # ------------------------------------------------------------------ export to peft
    @torch.no_grad()
    def export_lora(self, save_directory: str | os.PathLike, rank: int | None = None, overwrite: bool = False) -> dict[str, float]:
        """Write the updates as a standard ``peft`` LoRA adapter that ``PeftModel.from_pretrained``
        (and every tool built on peft's format) loads: ``adapter_config.json`` (``peft_type``
        LORA, per-layer ``rank_pattern``/``alpha_pattern`` with scaling 1, ``modules_to_save``
        for the heads, ``fan_in_fan_out`` for Conv1D) and ``adapter_model.safetensors`` with peft's
        key names. Every update here is low rank (ΔW = P_R D Q_Cᵀ, or a row/column slice), so with
        ``rank=None`` the export is exact. With ``rank=r`` each layer is truncated to its best
        rank-r approximation (SVD); returns each layer's relative error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F
        (0 where exact). A folder holding a sparseft adapter is not replaced unless ``overwrite``."""
        from .targets import is_transposed

        out = self._check_output(save_directory, "export_lora")
        if not overwrite and _holds_sparseft_adapter(out):
            raise ConfigError(f"export_lora: {out} holds a sparseft adapter, which the export would replace: export into "
                              "another folder, or pass overwrite=True.")

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
        for head, state in self._heads_of(DEFAULT_ADAPTER).items():
            for key, value in state.items():
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
        meta = {"format": "pt", "exported_by": f"sparseft {__version__}", "kind": self.adapter_kind}
        save_tensors(out / ADAPTER_FILE, {k: v.cpu() for k, v in tensors.items()}, meta)
        atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2))
        return errors

    # ------------------------------------------------------------------ adapter files
    def _adapter_tensors(self, **kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, extra metadata) of the layers' updates for ``save_pretrained``."""
        raise NotImplementedError

    def _head_tensors(self) -> dict[str, torch.Tensor]:
        return {f"heads.{head}.{key}": value for head, state in self._heads_of(DEFAULT_ADAPTER).items()
                for key, value in state.items()}

    def _check_ready_to_save(self) -> None:
        """Raise if there is nothing to save yet."""

    def _check_output(self, save_directory: str | os.PathLike, what: str) -> Path:
        """The folder to write ``what`` into, once there is an update to write and a folder to hold it."""
        if not self._layer_names:
            raise ConfigError(f"{what}: this model's updates were merged or unloaded (merge_and_unload / unload), so "
                              "there is no adapter left; save the model those calls returned with its own save_pretrained().")
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{what}: {out} is a file; pass a folder path.")
        return out

    def _meta(self) -> dict[str, Any]:
        return {"kind": self.adapter_kind, "version": __version__, "config": self.tuner_config.to_dict(),
                "base_model_class": type(self.base_model).__name__}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Any:
        """Write the adapter only: ``adapter_model.safetensors`` (the updates and the dense heads)
        and ``adapter_config.json``, each atomically."""
        out = self._check_output(save_directory, "save_pretrained")
        self._check_ready_to_save()
        tensors, extra = self._adapter_tensors(**kwargs)
        tensors.update(self._head_tensors())
        meta = {**self._meta(), **extra}
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
        tensors, meta = load_tensors(_adapter_file(path), "adapter")
        cls._check_meta(model, path, meta)
        return tensors, meta

    @classmethod
    def _check_meta(cls, model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
        if "exported_by" in meta:
            raise AdapterMismatchError(f"{path} is a peft LoRA export (export_lora), not a sparseft adapter: load it "
                                       "with peft's PeftModel.from_pretrained / load_adapter.")
        if meta.get("kind") != cls.adapter_kind:
            raise AdapterMismatchError(cls._wrong_kind(path, meta.get("kind")))
        if meta.get("base_model_class") != type(model).__name__:
            raise AdapterMismatchError(
                f"This adapter was trained on a {meta.get('base_model_class')}, not a {type(model).__name__}: "
                "load the same model class (e.g. AutoModelForSequenceClassification vs AutoModel)."
            )

    @classmethod
    def _wrong_kind(cls, path: Path, kind: Any) -> str:
        return f"{path} holds a sparseft {kind!r} file, not a {cls.adapter_kind!r} adapter."

    @classmethod
    def config_from_meta(cls, meta: dict[str, Any]) -> Any:
        return cls.config_class(**meta["config"])

    @classmethod
    def _expected_tensors(cls, meta: dict[str, Any]) -> list[str]:
        """The tensor names an adapter file with ``meta`` must hold."""
        return []

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
        check runs first: a failed load leaves ``model`` as it was. Called on ``BaseTuner``
        itself, the method is the one the folder's adapter kind is registered to (as peft's
        ``PeftModel.from_pretrained`` reads ``peft_type``)."""
        if cls is BaseTuner:
            cls = tuner_for(save_directory)
        tensors, meta = cls.read_adapter(model, save_directory)
        config = cls.config_from_meta(meta)
        missing = [key for key in cls._expected_tensors(meta) if key not in tensors]
        if missing:
            raise AdapterMismatchError(f"{save_directory} lacks the update tensors {missing[:3]} ({len(missing)} in all): "
                                       "the adapter is incomplete; save it again.")
        cls._check_fit(model, config, meta, **kwargs)
        cls._check_heads(model, find_heads(model, config.modules_to_save), tensors)
        tuner = cls.wrap(model, config)
        tuner._load_adapter_tensors(tensors, meta, **kwargs)
        for head in tuner.heads:
            prefix = f"heads.{head}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            tuner.base_model.get_submodule(head).load_state_dict(state)
        return tuner


def _holds_sparseft_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a sparseft adapter (its config names a ``kind``; a peft export's does not)."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "kind" in config


def tuner_for(save_directory: str | os.PathLike) -> type[BaseTuner]:
    """The registered tuner class of the adapter saved in ``save_directory`` (its file's kind)."""
    path = Path(save_directory)
    try:
        kind = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError) as exc:
        raise AdapterMismatchError(f"{path} holds no readable {CONFIG_FILE} ({exc}): pass a folder save_pretrained() wrote.") from exc
    cls = _TUNERS.get(kind)  # (the load itself checks the adapter file's kind again)
    if cls is None:
        raise AdapterMismatchError(f"{path} holds a sparseft {kind!r} adapter, a kind no imported method "
                                   f"registers (known: {sorted(_TUNERS)}); import the module that defines it first.")
    return cls


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


def _new_signature_instance(tuner_class: type[BaseTuner], model_class: type) -> BaseTuner:
    """An empty instance of ``_signature_class(tuner_class, model_class)`` (unpickling fills it)."""
    cls = _signature_class(tuner_class, model_class)
    return cls.__new__(cls)


def _signature_class(tuner_class: type[BaseTuner], model_class: type) -> type:
    """A ``tuner_class`` subclass whose ``forward`` has ``model_class.forward``'s signature."""
    while tuner_class in _CLASSES.values():  # called on such a subclass (type(model).from_pretrained): its tuner's
        tuner_class = tuner_class.__bases__[0]
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


__all__ = ["tuner_for", "ADAPTER_FILE", "BASE_ADAPTER", "CONFIG_FILE", "DEFAULT_ADAPTER", "BaseTuner", "BaseTunerLayer", "LowRankUpdate",
           "unwrap_model"]
