"""``SparseModel``: the SparseGrad / MeProp tuner (config → :class:`SparseLinear` layers).

The life cycle (wrap, freeze, save/load, merge, disable) is :class:`sparseft.tuner.BaseTuner`'s;
this module adds what is SparseGrad's own: the shared bases (``BasisBank``), ``calibrate`` (bases
and fixed supports from a few gradient passes), dynamic selection with any optimizer
(``attach_optimizer``), fixed-support re-selection, and the bases files.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import __version__
from .update.bank import BasisBank
from .calibration import (DEFAULT_SCORE_BYTES, CalibrationReport, LossFn, calibrate_layers, choose_random_supports,
                          choose_seeded_supports, rotated_gradient_scores, score_chunks)
from .config import SparseConfig
from .errors import AdapterMismatchError, ConfigError, NotCalibratedError
from .fingerprint import base_fingerprint, base_samples, same_base_in_another_precision
from .quantized import compute_dtype, dequantized, keep_storage_layout, unpack_for_training
from .update.weight_bases import check_sample, weight_bases
from .update.support import index_digest
from .layer import SparseLinear
from .serialization import load_tensors, save_tensors
from .targets import Target, find_targets, group_targets, weight_of
from .tuner import ADAPTER_FILE, CONFIG_FILE, BaseTuner, BaseTunerLayer  # noqa: F401  (the file names, where users found them)

BASES_FILE = "bases.safetensors"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class SparseModel(BaseTuner):
    """A model whose target layers train a k-entry update each. Build with :func:`get_sparse_model`."""

    adapter_kind = "adapter"
    layer_class = SparseLinear
    config_class = SparseConfig

    def __init__(self, model: nn.Module, config: SparseConfig, bases: str | os.PathLike | None = None) -> None:
        if not isinstance(config, SparseConfig):
            raise ConfigError(f"config must be a SparseGradConfig or MePropConfig, got {type(config).__name__}.")
        super().__init__(model, config, bases=bases)

    @property
    def sparse_config(self) -> SparseConfig:
        return self.tuner_config

    def _setup(self, model: nn.Module, bases: str | os.PathLike | None = None) -> None:
        config = self.tuner_config
        self.targets: list[Target] = find_targets(model, config.target_modules, config.groups_share_bases)
        # the fingerprint samples a 4-bit layer's stored codes: in bitsandbytes' layout, not its CPU inference repacking
        # (an eval forward before this, e.g. scoring the untrained model, made the adapter unloadable onto its own base)
        unpack_for_training(model)
        # and no later eval forward repacks (undoing it is inexact: W0 moved 0.14%), so a loaded adapter answers as trained
        keep_storage_layout(model)
        self.fingerprint = base_fingerprint(model, self.targets)
        self.base_samples = base_samples(model, self.targets)  # (the same base in another precision is recognised)
        self._saved_bases = self._read_bases(bases) if bases is not None else None  # checked before any change
        self.bases = BasisBank()
        if self.targets:
            self.bases.to(weight_of(model.get_submodule(self.targets[0].name)).device)
        self.calibration_report: CalibrationReport | None = None

    def _create_layers(self, model: nn.Module):
        config = self.tuner_config
        for target in self.targets:
            base = model.get_submodule(target.name)
            dtype = compute_dtype(base)
            adapter_dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else (
                torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
            )
            yield target.name, SparseLinear(
                base,
                group=target.group,
                k=config.budget(target.m, target.n),
                selection=config.selection,
                identity=config.identity_bases,
                bank=self.bases,
                block=config.block(target.m, target.n),
                compute_path=config.compute_path,
                adapter_dtype=adapter_dtype,
                cache_update=config.selection == "dynamic" if config.cache_update is None else config.cache_update,
                rotation=config.rotation,
                basis_blocks=config.basis_blocks,
                support_group=config.run_rows(target.m, target.n),
                support=config.support,
            )

    def _after_inject(self, **_: Any) -> None:
        if self._saved_bases is not None:
            self._fill_bases(self._saved_bases)
        self._saved_bases = None
        config = self.sparse_config
        if config.basis_source == "weights" and not config.identity_bases:
            self._bases_from_weights()
        if config.identity_bases or config.basis_source == "weights":
            self._ready_without_calibration()
        if self.tuner_config.selection == "dynamic" and not _DENSE_STATE_HOOK:
            _DENSE_STATE_HOOK.append(register_optimizer_step_post_hook(_warn_on_dense_state))

    @torch.no_grad()
    def _bases_from_weights(self) -> None:
        """Each layer's bases from its own W0's SVD (``basis_source="weights"``)."""
        layers = self.sparse_layers()
        for layer in layers.values():
            W0 = dequantized(layer.base_layer) if layer.quantized else weight_of(layer.base_layer)
            U, V = weight_bases(W0)
            dtype = compute_dtype(layer.base_layer)
            parts = layer.basis.rotated_parts
            self.bases.set(layer.group, U.to(dtype) if "P" in parts else None, V.to(dtype) if "Q" in parts else None)

    def _ready_without_calibration(self) -> None:
        """Bases that need no gradients (identity, or W0's): dynamic selection, or a random fixed
        support, is then ready to train without a calibration pass."""
        layers = self.sparse_layers()
        config = self.sparse_config
        if config.selection == "dynamic":
            for layer in layers.values():
                layer.calibrated = True
        elif config.support_criterion == "random":
            choose_random_supports(layers)

    def sparse_layers(self) -> dict[str, SparseLinear]:
        return self.adapted_layers()

    def groups(self) -> dict[str, list[Target]]:
        return group_targets(self.targets)

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        """The bases too: identical on every rank (calibration all-reduces) and constant."""
        return [f"bases.{name}" for name, _ in self.bases.named_buffers()] + super()._ddp_params_and_buffers_to_ignore

    @property
    def is_calibrated(self) -> bool:
        return all(layer.calibrated for layer in self.sparse_layers().values())

    @torch.no_grad()
    def adapter_entries(self) -> dict[str, int]:
        """Entries each layer's saved update holds: k with fixed selection; with dynamic
        selection every entry any step has updated (a different top-k each step), which grows
        with training past k, up to the whole block (see docs/sparsegrad.md)."""
        return {name: int(layer.sparse_state()[2].numel()) for name, layer in self.sparse_layers().items()}

    # ------------------------------------------------------------------ calibration
    def calibrate(
        self,
        batches: Iterable[Mapping[str, Any]],
        steps: int = 20,
        loss_fn: LossFn | None = None,
        show_progress: bool = True,
        max_score_bytes: int | None = DEFAULT_SCORE_BYTES,
    ) -> CalibrationReport:
        """Find the bases (HOSVD of streamed gradient Grams) and, for fixed selection, the
        support, from up to ``steps`` ordinary forward/backward passes over ``batches``.

        A gradient ``support_criterion`` scores every rotated entry (a float32 m×n per layer;
        ≈ 17 GiB for LLaMA-7B's MLPs): the layers are scored in chunks whose scores fit
        ``max_score_bytes``, one more pass over the batches per chunk (None: all in one pass).
        The default random support needs no scoring pass at all.

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
            criterion=self.sparse_config.support_criterion,
            max_score_bytes=max_score_bytes,
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
        max_score_bytes: int | None = DEFAULT_SCORE_BYTES,
    ) -> int:
        """Fixed selection: swap the ``fraction`` of each support with the smallest |values|
        for the entries of largest rotated gradient on ``batches`` (SpIEL-style drop/grow).
        Dropped entries return to the base weight. With an Adam-style ``optimizer`` the grown
        entries start afresh: their moments are seeded from the rotated gradient on ``batches``
        so that their next update has a fresh Adam's size (lr), whatever the step count.
        The scores are two float32 m×n per layer: layers are scored in chunks that fit
        ``max_score_bytes`` (one pass over ``batches`` per chunk; None: one pass).
        Returns the number of entries swapped over all layers."""
        if self.sparse_config.selection != "fixed":
            raise ConfigError("reselect_support() is for selection='fixed'; dynamic selection re-chooses every step.")
        if not self.is_calibrated:
            raise NotCalibratedError("Call calibrate() before reselect_support().")
        fraction = self.sparse_config.reselect_fraction if fraction is None else fraction
        batches = list(batches)
        layers = self.sparse_layers()
        swaps = {name: max(1, round(fraction * layer.k)) for name, layer in layers.items()}
        # Score the layers in chunks (one pass each, same RNG state, the model unchanged between
        # passes) and keep per layer only its top k + n_swap candidates, enough for any support.
        candidates: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for chunk in score_chunks(layers, 2, max_score_bytes):
            with torch.enable_grad():
                scores, grads = rotated_gradient_scores(self.base_model, chunk, self.bases, batches, loss_fn)
            for name, layer in chunk.items():
                flat, grad = scores.pop(name).flatten(), grads.pop(name).flatten()
                top = torch.topk(flat, min(flat.numel(), layer.k + swaps[name])).indices
                candidates[name] = (top, flat[top], grad[top])
        swapped = 0
        for name, layer in layers.items():  # one layer's block-sized tensors at a time
            top, score, grad = candidates.pop(name)
            dense_scores = torch.full(layer.block, -float("inf"), device=score.device).flatten().index_copy_(0, top, score)
            dense_grads = torch.zeros(layer.block, device=grad.device, dtype=grad.dtype).flatten().index_copy_(0, top, grad)
            swapped += layer.support.regrow(layer.values, dense_scores.view(layer.block), swaps[name], optimizer,
                                            grads=dense_grads.view(layer.block))
        return swapped

    # ------------------------------------------------------------------ Trainer checkpoints
    # transformers.Trainer checkpoints a model that is not a PreTrainedModel as
    # safetensors.save_file(model.state_dict()), and resume_from_checkpoint and
    # load_best_model_at_end load it with model.load_state_dict(sd, strict=False). So the state
    # dict holds what trains, not the frozen base weights: the trainable values (a dynamic layer's
    # non-zero entries, see SparseLinear), the supports, the whole bases, the heads, and the base
    # model's fingerprint. It loads onto get_sparse_model(same base, same config), uncalibrated.
    def _frozen_names(self) -> set[str]:
        """State-dict names of the frozen base model: the parameters that do not train and the
        persistent buffers, outside the adapted layers' own parts and the heads."""
        names: set[str] = set()
        for name, module in self.base_model.named_modules(remove_duplicate=False):
            if isinstance(module, BaseTunerLayer) or any(name == h or name.startswith(h + ".") for h in self.heads):
                continue
            prefix = f"base_model.{name}." if name else "base_model."
            names.update(prefix + n for n, p in module._parameters.items() if p is not None and not p.requires_grad)
            names.update(prefix + n for n, b in module._buffers.items()
                         if b is not None and n not in module._non_persistent_buffers_set)
        return names

    def _left_out_of_state_dict(self) -> Iterable[str]:
        """Also the frozen base weights: a state dict (a Trainer checkpoint) holds what trains."""
        return [*super()._left_out_of_state_dict(), *self._frozen_names()]

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As torch's; the frozen base weights may be absent (a checkpoint of what trains) or
        present (a full state dict), and are not reported missing."""
        frozen = self._frozen_names()

        def frozen_may_be_missing(module: nn.Module, keys: Any) -> None:
            keys.missing_keys[:] = [k for k in keys.missing_keys if k not in frozen]

        handle = self.register_load_state_dict_post_hook(frozen_may_be_missing)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            handle.remove()

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(list(self.fingerprint.encode()), dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        saved = bytes(state.tolist()).decode()
        if saved != self.fingerprint:
            raise AdapterMismatchError(
                f"This checkpoint was trained on other base weights (fingerprint {saved} ≠ {self.fingerprint}) and "
                "holds only what trains: build the model from the base checkpoint (and dtype) it was trained on."
            )

    # ------------------------------------------------------------------ bases files
    def _group_shapes(self) -> dict[str, tuple[int, int]]:
        return {t.group: (t.m, t.n) for t in self.targets}

    def _group_parts(self) -> dict[str, tuple[str, ...]]:
        """The basis sides each group's layers rotate (both, or one with rotation="narrow")."""
        return {layer.group: layer.basis.rotated_parts for layer in self.sparse_layers().values()}

    def save_bases(self, path: str | os.PathLike) -> int:
        """Save the full bases (one pair per group) to reuse for another task on this base model."""
        if self.sparse_config.identity_bases:
            raise ConfigError("MeProp uses identity bases: there is nothing to save.")
        if not all(self.bases.has(g) for g in self._group_shapes()):
            raise NotCalibratedError("No bases yet: call calibrate() before save_bases().")
        meta = {"kind": "bases", "fingerprint": self.fingerprint, "base_samples": self.base_samples, "groups": self._group_shapes(),
                "version": __version__}
        return save_tensors(path, self.bases.export(), meta)

    def load_bases(self, path: str | os.PathLike) -> None:
        """Load bases saved by ``save_bases`` (checked against this base model)."""
        self._fill_bases(self._read_bases(path))

    def _read_bases(self, path: str | os.PathLike) -> dict[str, torch.Tensor]:
        tensors, meta = load_tensors(path, "bases")
        if meta.get("fingerprint") != self.fingerprint and not same_base_in_another_precision(meta.get("base_samples"), self.base_samples):
            raise AdapterMismatchError(
                f"The bases in {path} were calibrated on another base model (fingerprint "
                f"{meta.get('fingerprint')} ≠ {self.fingerprint}); calibrate() on this model instead."
            )
        return tensors

    def _own_bases(self) -> list[torch.Tensor]:
        return self.bases.held()

    def _check_weight_bases(self, tensors: dict[str, torch.Tensor]) -> None:
        """The bases recomputed from this base's W0 are the ones the adapter was trained in."""
        for name, layer in self.sparse_layers().items():
            for part in layer.basis.rotated_parts:
                saved = tensors.get(f"basis_check.{name}.{part}")
                if saved is not None and not torch.allclose(check_sample(self.bases.full(layer.group, part)), saved, atol=1e-3):
                    raise AdapterMismatchError(
                        f"The bases of {name} recomputed from its weights differ from those it was trained in (another "
                        "solver, or weights changed since): load the adapter onto the exact base it was trained on.")

    def _fill_bases(self, tensors: dict[str, torch.Tensor]) -> None:
        base = next(iter(self.sparse_layers().values())).base_layer
        self.bases.load(tensors, self._group_shapes(), base.weight.device, compute_dtype(base), self._group_parts())

    # ------------------------------------------------------------------ adapter files
    def _meta(self) -> dict[str, Any]:
        return {**super()._meta(), "fingerprint": self.fingerprint, "base_samples": self.base_samples,
                "targets": [[t.name, t.group, t.m, t.n] for t in self.targets], "heads": self.heads}

    def _check_ready_to_save(self) -> None:
        if not self.is_calibrated:
            raise NotCalibratedError("Nothing to save yet: call calibrate() (and train) before save_pretrained().")

    def save_pretrained(self, save_directory: str | os.PathLike, save_bases: bool = True, **kwargs: Any) -> dict[str, int]:
        """Write the adapter only: ``adapter_model.safetensors`` (O(k) values, their rotated
        positions, the basis columns they use, the dense heads) and ``adapter_config.json``.
        Each file is written atomically. Returns sizes in bytes and counts."""
        return super().save_pretrained(save_directory, save_bases=save_bases)

    def _adapter_tensors(self, save_bases: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Per layer its values and where they lie: a random support as its seed (with a digest
        of the positions it gives), any other as one flat index per value (int32 where it fits:
        row · block width + column), so the file is near the values' own size."""
        tensors: dict[str, torch.Tensor] = {}
        seeds: dict[str, list] = {}
        used: dict[str, list[set[int]]] = {}
        for name, layer in self.sparse_layers().items():
            rows, cols, vals = layer.sparse_state()
            seed = getattr(layer.support, "seed", None)
            if seed is not None:
                seeds[name] = [int(seed), index_digest(rows, cols)]
            else:
                width = layer.block[1]
                flat = rows.long() * width + cols.long()
                tensors[f"layers.{name}.index"] = flat.to(torch.int32 if layer.block[0] * width < 2**31 else torch.int64)
            tensors[f"layers.{name}.values"] = vals
            if layer.selection == "fixed":
                u = used.setdefault(layer.group, [set(), set()])
                u[0].update(layer.R.tolist())
                u[1].update(layer.C.tolist())
        from_weights = self.sparse_config.basis_source == "weights"
        bases_included = bool(save_bases and not self.sparse_config.identity_bases and not from_weights)
        if from_weights:  # not stored: the base model gives them again; a corner of each checks that it did
            for name, layer in self.sparse_layers().items():
                for part in layer.basis.rotated_parts:
                    tensors[f"basis_check.{name}.{part}"] = check_sample(self.bases.full(layer.group, part))
        if bases_included:
            cols = None
            if self.sparse_config.selection == "fixed":
                cols = {g: tuple(torch.tensor(sorted(s), dtype=torch.long) for s in pair) for g, pair in used.items()}
            tensors.update(self.bases.export(cols))
        return tensors, {"bases_included": bases_included, "seeded_supports": seeds}

    def _save_result(self, size: int, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
        values = sum(v.numel() for k, v in tensors.items() if k.startswith("layers.") and k.endswith(".values"))
        basis_numbers = sum(v.numel() for k, v in tensors.items() if k.startswith("bases.") and not k.endswith("_cols"))
        k = sum(layer.k for layer in self.sparse_layers().values())
        if values > 4 * k:
            warnings.warn(
                f"This dynamic-selection adapter stores {values:,d} entries, {values / k:.1f}× its per-step budget "
                f"k = {k:,d}: every entry any step updated is kept. Use selection='fixed' for O(k) adapters.",
                stacklevel=3,
            )
        return {"adapter_bytes": size, "values": values, "basis_numbers": basis_numbers, "k": k}

    @classmethod
    def _wrong_kind(cls, path: Path, kind: Any) -> str:
        return f"{path} holds sparseft {kind}, not an adapter; use load_bases() for bases."

    @classmethod
    def config_from_meta(cls, meta: dict[str, Any]) -> SparseConfig:
        return SparseConfig.from_dict(meta["config"])

    @classmethod
    def _expected_tensors(cls, meta: dict[str, Any]) -> list[str]:
        seeded = meta.get("seeded_supports") or {}
        return [f"layers.{t[0]}.values" for t in meta.get("targets", [])] + [
            f"layers.{t[0]}.index" for t in meta.get("targets", []) if t[0] not in seeded and "seeded_supports" in meta]

    @classmethod
    def _check_fit(cls, model: nn.Module, config: SparseConfig, meta: dict[str, Any],
                   bases: str | os.PathLike | None = None) -> None:
        targets = find_targets(model, config.target_modules, config.groups_share_bases)
        saved_targets = [tuple(t) for t in meta["targets"]]
        ours = [(t.name, t.group, t.m, t.n) for t in targets]
        if saved_targets != ours:
            raise AdapterMismatchError(
                "The adapter's layers do not fit this model (names/shapes differ, e.g. "
                f"{saved_targets[:1]} vs {ours[:1]}): it was saved for another architecture or size."
            )
        unpack_for_training(model)  # (as at training: the codes in bitsandbytes' own layout)
        ours = base_fingerprint(model, targets)
        if meta["fingerprint"] != ours and not same_base_in_another_precision(meta.get("base_samples"), base_samples(model, targets)):
            raise AdapterMismatchError(
                f"The adapter was trained on other base weights (fingerprint {meta['fingerprint']} ≠ {ours}): "
                "load the base checkpoint it was trained on."
            )
        if not meta.get("bases_included") and not config.identity_bases and bases is None and config.basis_source == "gradients":
            raise AdapterMismatchError("This adapter was saved without bases: pass bases='path/to/bases.safetensors'.")

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, save_directory: str | os.PathLike, bases: str | os.PathLike | None = None
    ) -> "SparseModel":
        """Rebuild the adapted model on a fresh ``model`` from ``save_pretrained`` output."""
        sparse = super().from_pretrained(model, save_directory, bases=bases)
        return sparse.to(next(iter(sparse.sparse_layers().values())).base_layer.weight.device)

    @torch.no_grad()
    def _load_adapter_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                              bases: str | os.PathLike | None = None) -> None:
        base = next(iter(self.sparse_layers().values())).base_layer
        if meta.get("bases_included"):
            self.bases.load(tensors, self._group_shapes(), base.weight.device, compute_dtype(base), self._group_parts())
        elif self.sparse_config.basis_source == "weights":
            self._check_weight_bases(tensors)
        elif not self.sparse_config.identity_bases:
            self.load_bases(bases)
        seeded = meta.get("seeded_supports") or {}
        layers = self.sparse_layers()
        choose_seeded_supports([(layers[name], seed) for name, (seed, _) in seeded.items() if name in layers])
        for name, layer in layers.items():
            values = tensors[f"layers.{name}.values"]
            if name in seeded:  # the support from its seed, checked against the positions it gave when saved
                digest = seeded[name][1]
                if index_digest(layer.rows, layer.cols) != digest:
                    raise AdapterMismatchError(
                        f"The support of {name} rebuilt from its seed differs from the saved one (this torch's random "
                        "generator draws differently): load the adapter with the torch version that saved it.")
                layer.param.copy_(values.to(layer.param.dtype))
                continue
            if f"layers.{name}.index" in tensors:
                flat = tensors[f"layers.{name}.index"].long()
                rows, cols = flat // layer.block[1], flat % layer.block[1]
            else:  # files before the compact index: rows and columns
                rows, cols = tensors[f"layers.{name}.rows"].long(), tensors[f"layers.{name}.cols"].long()
            layer.load_sparse_state(rows, cols, values)


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


def get_sparse_model(model: nn.Module, config: SparseConfig, bases: str | os.PathLike | None = None) -> SparseModel:
    """Adapt ``model``'s MLP layers (or ``config.target_modules``) in place and wrap it.

    Call ``calibrate(batches)`` on the result before training (except MeProp's dynamic mode).
    ``bases`` reuses bases saved by ``save_bases`` for this base model.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"get_sparse_model() adapts a torch nn.Module (e.g. a transformers model), got {type(model).__name__}.")
    return SparseModel.wrap(model, config, bases=bases)
