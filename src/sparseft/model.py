"""``SparseModel``: a Hugging Face (or any torch) model with its MLP layers adapted.

Like ``peft.PeftModel`` it wraps the base model, forwards calls to it, and adds the adapter
life cycle: ``calibrate`` → train → ``save_pretrained`` / ``from_pretrained`` →
``merge_and_unload``. ``get_sparse_model`` returns a subclass whose ``forward`` carries the
base model's signature, so ``transformers.Trainer`` sees the model's real input names and labels.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import __version__
from .bases import BasisBank
from .calibration import CalibrationReport, LossFn, calibrate_layers, rotated_gradient_scores
from .config import SparseConfig
from .errors import AdapterMismatchError, ConfigError, NotCalibratedError
from .layer import SparseLinear
from .serialization import atomic_write_text, load_tensors, save_tensors
from .targets import Target, find_heads, find_targets, group_targets, weight_of

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
BASES_FILE = "bases.safetensors"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def base_fingerprint(model: nn.Module, targets: list[Target]) -> str:
    """A short hash of the base model's target layers (names, shapes, sampled weights): tells
    apart another architecture, other targets, and other pretrained weights of the same shape."""
    h = hashlib.sha256(type(model).__name__.encode())
    for t in targets:
        W = weight_of(model.get_submodule(t.name)).detach()
        flat = W.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(f"{t.name}:{t.m}x{t.n}".encode())
        h.update(sample.numpy().round(5).tobytes())
    return h.hexdigest()[:16]


class BaseModelWrapper(nn.Module):
    """Passes calls and unknown attributes on to ``self.base_model``, as ``peft.PeftModel`` does,
    so ``model.config``, ``generate`` and friends keep working on the wrapper."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def _freeze_all_but_heads(self, model: nn.Module) -> None:
        """Freeze ``model`` except its ``self.heads``; remember each parameter's ``requires_grad``
        for :meth:`_unwrap`."""
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for head in self.heads:
            for p in model.get_submodule(head).parameters():
                p.requires_grad_(True)

    def _unwrap(self) -> nn.Module:
        """The base model, its parameters' ``requires_grad`` as before wrapping (merge's last step)."""
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad.get(name, True))
        return self.base_model

    @staticmethod
    def _read_adapter(model: nn.Module, save_directory: str | os.PathLike, kind: str, wrong_kind: str) -> tuple[dict, dict]:
        """(tensors, meta) of an adapter saved by ``save_pretrained``, after checking that it is a
        ``kind`` adapter (else ``wrong_kind``, formatted with the path and the kind found) made
        for ``model``'s class."""
        path = Path(save_directory)
        tensors, meta = load_tensors(path / ADAPTER_FILE if path.is_dir() else path, "adapter")
        if meta.get("kind") != kind:
            raise AdapterMismatchError(wrong_kind.format(path=path, kind=meta.get("kind")))
        if meta["base_model_class"] != type(model).__name__:
            raise AdapterMismatchError(
                f"This adapter was trained on a {meta['base_model_class']}, not a {type(model).__name__}: "
                "load the same model class (e.g. AutoModelForSequenceClassification vs AutoModel)."
            )
        return tensors, meta


class SparseModel(BaseModelWrapper):
    """A model whose target layers train a k-entry update each. Build with :func:`get_sparse_model`."""

    def __init__(self, model: nn.Module, config: SparseConfig, bases: str | os.PathLike | None = None) -> None:
        super().__init__()
        if not isinstance(config, SparseConfig):
            raise ConfigError(f"config must be a SparseGradConfig or MePropConfig, got {type(config).__name__}.")
        config.validate()
        if any(isinstance(m, SparseLinear) for m in model.modules()):
            raise ConfigError("This model is already adapted by sparseft; merge_and_unload() it or use a fresh model.")
        self.base_model = model
        self.sparse_config = config
        self.targets: list[Target] = find_targets(model, config.target_modules)
        self.heads: list[str] = find_heads(model, config.modules_to_save)
        self.fingerprint = base_fingerprint(model, self.targets)
        saved_bases = self._read_bases(bases) if bases is not None else None  # checked before any change
        self._freeze_all_but_heads(model)
        self.bases = BasisBank()
        if self.targets:
            self.bases.to(weight_of(model.get_submodule(self.targets[0].name)).device)
        self.calibration_report: CalibrationReport | None = None
        for target in self.targets:
            base = model.get_submodule(target.name)
            adapter_dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else (
                torch.float32 if base.weight.dtype in (torch.float16, torch.bfloat16) else base.weight.dtype
            )
            layer = SparseLinear(
                base,
                group=target.group,
                k=config.budget(target.m, target.n),
                selection=config.selection,
                identity=config.identity_bases,
                bank=self.bases,
                block=config.block(target.m, target.n),
                compute_path=config.compute_path,
                adapter_dtype=adapter_dtype,
            )
            parent_name, _, attr = target.name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer)
        if saved_bases is not None:
            self._fill_bases(saved_bases)
        if config.selection == "dynamic" and not _DENSE_STATE_HOOK:
            _DENSE_STATE_HOOK.append(register_optimizer_step_post_hook(_warn_on_dense_state))

    # ------------------------------------------------------------------ plumbing
    # ------------------------------------------------------------------ state dict
    # transformers.Trainer checkpoints a model that is not a PreTrainedModel with
    # safetensors.save_file(model.state_dict()) and resumes with model.load_state_dict(sd, False).
    # safetensors refuses tensors stored twice, so tied weights (input embeddings = LM head) are
    # kept under their first name only and filled back in on load. The state dict also carries
    # the bases and the fixed supports (extra state), so it loads onto a fresh, uncalibrated model.
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

    def sparse_layers(self) -> dict[str, SparseLinear]:
        return {t.name: self.base_model.get_submodule(t.name) for t in self.targets}

    def groups(self) -> dict[str, list[Target]]:
        return group_targets(self.targets)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """Read by DistributedDataParallel: buffers it must not re-broadcast before every forward.
        The bases and supports are identical on every rank (calibration all-reduces) and constant
        while training; broadcasting them would cost more than the gradient all-reduce itself."""
        names = [f"bases.{name}" for name, _ in self.bases.named_buffers()]
        for layer_name, layer in self.sparse_layers().items():
            names += [f"base_model.{layer_name}.{b}" for b, _ in layer.named_buffers(recurse=False)]
        return names

    @property
    def is_calibrated(self) -> bool:
        return all(layer.calibrated for layer in self.sparse_layers().values())

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self,
        batches: Iterable[Mapping[str, Any]],
        steps: int = 20,
        loss_fn: LossFn | None = None,
        show_progress: bool = True,
    ) -> CalibrationReport:
        """Find the bases (HOSVD of streamed gradient Grams) and, for fixed selection, the
        support, from up to ``steps`` ordinary forward/backward passes over ``batches``.

        ``batches`` yields dicts of model inputs; the loss is ``model(**batch).loss`` or
        ``loss_fn(outputs, batch)``. Bases already loaded (``load_bases``) are reused. The
        model's weights, gradients, mode and torch RNG state are left as they were.
        """
        if steps < 1:
            raise ConfigError("calibrate(steps=...) must be at least 1.")
        layers = self.sparse_layers()
        need_bases = not self.sparse_config.identity_bases and not all(
            self.bases.has(t.group) and not self.bases.is_partial(t.group) for t in self.targets
        )
        self.calibration_report = calibrate_layers(
            self.base_model,
            layers,
            self.bases,
            batches,
            steps=steps,
            loss_fn=loss_fn,
            need_bases=need_bases,
            float64_max=self.sparse_config.eigh_float64_max,
            show_progress=show_progress,
        )
        return self.calibration_report

    # ------------------------------------------------------------------ dynamic selection
    def select_topk_(self) -> None:
        """Dynamic selection: cut every adapted gradient to its top-k entries (in place)."""
        for layer in self.sparse_layers().values():
            if layer.selection == "dynamic":
                layer.mask_grad_to_topk_()

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Let ``optimizer`` (any torch optimizer) drive dynamic selection: the top-k is taken
        from the whole accumulated (and, under DDP, all-reduced) gradient just before each
        ``optimizer.step()``, instead of after every backward. Returns the hook handle."""
        for layer in self.sparse_layers().values():
            if layer.selection == "dynamic":
                layer.select_on_backward = False
        return optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.select_topk_())

    # ------------------------------------------------------------------ fixed selection
    @torch.no_grad()
    def reselect_support(
        self,
        batches: Iterable[Mapping[str, Any]],
        optimizer: torch.optim.Optimizer | None = None,
        fraction: float | None = None,
        loss_fn: LossFn | None = None,
    ) -> int:
        """Fixed selection: swap the ``fraction`` of each support with the smallest |values|
        for the entries of largest rotated gradient on ``batches`` (SpIEL-style drop/grow).
        Dropped entries return to the base weight; their optimizer state is zeroed. Returns
        the number of entries swapped over all layers."""
        if self.sparse_config.selection != "fixed":
            raise ConfigError("reselect_support() is for selection='fixed'; dynamic selection re-chooses every step.")
        if not self.is_calibrated:
            raise NotCalibratedError("Call calibrate() before reselect_support().")
        fraction = self.sparse_config.reselect_fraction if fraction is None else fraction
        layers = self.sparse_layers()
        with torch.enable_grad():
            scores = rotated_gradient_scores(self.base_model, layers, self.bases, list(batches), loss_fn)
        swapped = 0
        for name, layer in layers.items():
            n_swap = max(1, round(fraction * layer.k))
            cols = layer.block[1]
            current = layer.rows * cols + layer.cols
            flat = scores[name].flatten()
            flat[current] = -float("inf")
            n_swap = min(n_swap, int(torch.isfinite(flat).sum()))
            if n_swap == 0:
                continue
            drop = torch.topk(layer.values.abs().float(), n_swap, largest=False).indices
            grow = torch.topk(flat, n_swap).indices
            rows, cols_ = layer.rows.clone(), layer.cols.clone()
            rows[drop], cols_[drop] = grow // cols, grow % cols
            layer.values[drop] = 0
            layer.set_support(rows, cols_)
            if optimizer is not None:
                for value in optimizer.state.get(layer.values, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == layer.values.shape:
                        value[drop] = 0
            swapped += n_swap
        return swapped

    # ------------------------------------------------------------------ budget report
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all): trainable counts k per adapted layer (the entries updated, also in
        dynamic mode where the dense ``delta`` buffer holds them) plus the dense heads."""
        trainable = sum(layer.k for layer in self.sparse_layers().values())
        trainable += sum(p.numel() for h in self.heads for p in self.base_model.get_submodule(h).parameters())
        total = sum(p.numel() for n, p in self.base_model.named_parameters() if not _is_adapter_param(n))
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------ bases files
    def _group_shapes(self) -> dict[str, tuple[int, int]]:
        return {t.group: (t.m, t.n) for t in self.targets}

    def save_bases(self, path: str | os.PathLike) -> int:
        """Save the full bases (one pair per group) to reuse for another task on this base model."""
        if self.sparse_config.identity_bases:
            raise ConfigError("MeProp uses identity bases: there is nothing to save.")
        if not all(self.bases.has(g) for g in self._group_shapes()):
            raise NotCalibratedError("No bases yet: call calibrate() before save_bases().")
        meta = {"kind": "bases", "fingerprint": self.fingerprint, "groups": self._group_shapes(), "version": __version__}
        return save_tensors(path, self.bases.export(), meta)

    def load_bases(self, path: str | os.PathLike) -> None:
        """Load bases saved by ``save_bases`` (checked against this base model)."""
        self._fill_bases(self._read_bases(path))

    def _read_bases(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        tensors, meta = load_tensors(path, "bases")
        if meta.get("fingerprint") != self.fingerprint:
            raise AdapterMismatchError(
                f"The bases in {path} were calibrated on another base model (fingerprint "
                f"{meta.get('fingerprint')} ≠ {self.fingerprint}); calibrate() on this model instead."
            )
        return tensors

    def _fill_bases(self, tensors: dict[str, torch.Tensor]) -> None:
        weight = next(iter(self.sparse_layers().values())).base_layer.weight
        self.bases.load(tensors, self._group_shapes(), weight.device, weight.dtype)

    # ------------------------------------------------------------------ adapter files
    def _adapter_meta(self) -> dict[str, Any]:
        return {
            "kind": "adapter",
            "version": __version__,
            "config": self.sparse_config.to_dict(),
            "base_model_class": type(self.base_model).__name__,
            "fingerprint": self.fingerprint,
            "targets": [[t.name, t.group, t.m, t.n] for t in self.targets],
            "heads": self.heads,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, save_bases: bool = True, **_: Any) -> dict[str, int]:
        """Write the adapter only: ``adapter_model.safetensors`` (O(k) values, their rotated
        positions, the basis columns they use, the dense heads) and ``adapter_config.json``.
        Each file is written atomically. Returns sizes in bytes and counts."""
        if not self.is_calibrated:
            raise NotCalibratedError("Nothing to save yet: call calibrate() (and train) before save_pretrained().")
        out = Path(save_directory)
        tensors: dict[str, torch.Tensor] = {}
        used: dict[str, list[set[int]]] = {}
        values = 0
        for name, layer in self.sparse_layers().items():
            rows, cols, vals = layer.sparse_state()
            index_dtype = torch.int32 if max(layer.m, layer.n) < 2**31 else torch.int64
            tensors[f"layers.{name}.rows"] = rows.to(index_dtype)
            tensors[f"layers.{name}.cols"] = cols.to(index_dtype)
            tensors[f"layers.{name}.values"] = vals
            values += vals.numel()
            if layer.selection == "fixed":
                u = used.setdefault(layer.group, [set(), set()])
                u[0].update(layer.R.tolist())
                u[1].update(layer.C.tolist())
        for head in self.heads:
            for key, value in self.base_model.get_submodule(head).state_dict().items():
                tensors[f"heads.{head}.{key}"] = value
        meta = self._adapter_meta()
        meta["bases_included"] = bool(save_bases and not self.sparse_config.identity_bases)
        if meta["bases_included"]:
            cols = None
            if self.sparse_config.selection == "fixed":
                cols = {g: tuple(torch.tensor(sorted(s), dtype=torch.long) for s in pair) for g, pair in used.items()}
            tensors.update(self.bases.export(cols))
        adapter_bytes = save_tensors(out / ADAPTER_FILE, tensors, meta)
        atomic_write_text(out / CONFIG_FILE, json.dumps(dict(meta, adapter_bytes=adapter_bytes), indent=2))
        basis_numbers = sum(v.numel() for k, v in tensors.items() if k.startswith("bases.") and not k.endswith("_cols"))
        return {"adapter_bytes": adapter_bytes, "values": values, "basis_numbers": basis_numbers}

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, save_directory: str | os.PathLike, bases: str | os.PathLike | None = None
    ) -> "SparseModel":
        """Rebuild the adapted model on a fresh ``model`` from ``save_pretrained`` output."""
        tensors, meta = cls._read_adapter(model, save_directory, "adapter",
                                          "{path} holds sparseft {kind}, not an adapter; use load_bases() for bases.")
        config = SparseConfig.from_dict(meta["config"])
        # check the fit before touching the model: a failed load leaves it as it was
        targets = find_targets(model, config.target_modules)
        saved_targets = [tuple(t) for t in meta["targets"]]
        ours = [(t.name, t.group, t.m, t.n) for t in targets]
        if saved_targets != ours:
            raise AdapterMismatchError(
                "The adapter's layers do not fit this model (names/shapes differ, e.g. "
                f"{saved_targets[:1]} vs {ours[:1]}): it was saved for another architecture or size."
            )
        if meta["fingerprint"] != base_fingerprint(model, targets):
            raise AdapterMismatchError(
                "The adapter was trained on other base weights (fingerprint "
                f"{meta['fingerprint']} ≠ {base_fingerprint(model, targets)}): load the base checkpoint it was trained on."
            )
        sparse = get_sparse_model(model, config)
        weight = next(iter(sparse.sparse_layers().values())).base_layer.weight
        if meta.get("bases_included"):
            sparse.bases.load(tensors, sparse._group_shapes(), weight.device, weight.dtype)
        elif not config.identity_bases:
            if bases is None:
                raise AdapterMismatchError("This adapter was saved without bases: pass bases='path/to/bases.safetensors'.")
            sparse.load_bases(bases)
        for name, layer in sparse.sparse_layers().items():
            layer.load_sparse_state(
                tensors[f"layers.{name}.rows"].long(), tensors[f"layers.{name}.cols"].long(), tensors[f"layers.{name}.values"]
            )
        for head in sparse.heads:
            module = sparse.base_model.get_submodule(head)
            state = {k[len(f"heads.{head}.") :]: v for k, v in tensors.items() if k.startswith(f"heads.{head}.")}
            module.load_state_dict(state)
        return sparse.to(weight.device)

    # ------------------------------------------------------------------ merge
    def merge_and_unload(self) -> nn.Module:
        """Fold every update into its base weight and return the base model (its own class,
        plain nn.Linear / Conv1D layers, no sparseft module left)."""
        for target in self.targets:
            layer = self.base_model.get_submodule(target.name)
            parent_name, _, attr = target.name.rpartition(".")
            setattr(self.base_model.get_submodule(parent_name) if parent_name else self.base_model, attr, layer.merge())
        return self._unwrap()


def _is_adapter_param(name: str) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("values", "delta") and ".base_layer." not in name


_DENSE_STATE_HOOK: list[Any] = []


def _warn_on_dense_state(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global step hook (installed once a dynamic-selection model exists): a dynamic ``delta``
    whose optimizer keeps full-size state is a dense state the user did not ask for."""
    if getattr(optimizer, "_sparseft_checked", False):
        return
    optimizer._sparseft_checked = True  # type: ignore[attr-defined]
    from .optim import SparseAdamW

    if isinstance(optimizer, SparseAdamW):
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if hasattr(p, "_sparseft_k") and any(isinstance(v, torch.Tensor) and v.numel() == p.numel() for v in state.values()):
                warnings.warn(
                    f"{type(optimizer).__name__} keeps dense state ({p.numel():,d} entries per tensor) for a "
                    "dynamic-selection SparseGrad layer, and its momentum keeps moving entries outside the top-k. "
                    "Use sparseft.SparseAdamW for O(k) state and exactly-k updates (or plain SGD).",
                    stacklevel=2,
                )
                return


_CLASSES: dict[type, type] = {}


def _sparse_class_for(model_class: type) -> type:
    """A SparseModel subclass whose ``forward`` has ``model_class.forward``'s signature, so that
    Trainer finds the input names and label names it inspects for."""
    if model_class not in _CLASSES:

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.base_model(*args, **kwargs)

        try:
            params = list(inspect.signature(model_class.forward).parameters.values())
            forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            pass
        _CLASSES[model_class] = type(f"Sparse{model_class.__name__}", (SparseModel,), {"forward": forward, "__module__": __name__})
    return _CLASSES[model_class]


def get_sparse_model(model: nn.Module, config: SparseConfig, bases: str | os.PathLike | None = None) -> SparseModel:
    """Adapt ``model``'s MLP layers (or ``config.target_modules``) in place and wrap it.

    Call ``calibrate(batches)`` on the result before training (except MeProp's dynamic mode).
    ``bases`` reuses bases saved by ``save_bases`` for this base model.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"get_sparse_model() adapts a torch nn.Module (e.g. a transformers model), got {type(model).__name__}.")
    return _sparse_class_for(type(model))(model, config, bases=bases)
