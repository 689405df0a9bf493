"""Training checkpoints that survive a crash and resume bit-for-bit.

One checkpoint is ONE safetensors file, ``DIR/checkpoint-<step>.safetensors``, holding

- the trainable parameters by name (adapter values / delta, LoRA matrices, task heads, or every
  weight for full fine-tuning), the fixed supports and the calibration bases of a SparseModel;
- the optimizer state (``state_dict()`` flattened: tensors keyed ``optim.<param>.<name>``,
  numbers and ``param_groups`` in the JSON metadata) and the LR scheduler's ``state_dict()``;
- the RNG states: torch CPU (and every CUDA device), Python ``random``, NumPy;
- the step and any JSON ``extra`` the caller adds,

with a SHA-256 checksum of all tensors. The file is written to a temporary name, fsynced and
renamed (``os.replace``); only then is ``DIR/latest.json`` (atomically) pointed at it, and older
checkpoints beyond ``keep`` are removed. A process killed at any moment therefore leaves the
previous checkpoint whole and ``latest.json`` pointing at a complete, verified file. Loading
reads safetensors and JSON only: nothing in a checkpoint can execute code.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import AdapterMismatchError, ConfigError
from ..tuner import unwrap_model
from ..serialization import META_KEY, atomic_write, atomic_write_text, file_checksum, load_tensors

LATEST = "latest.json"
FORMAT = 1
# Test hook: seconds to sleep after the checkpoint's bytes are written and before the rename,
# so a test can SIGKILL the process mid-save.
_PAUSE_ENV = "SPARSEFT_CHECKPOINT_PAUSE_BEFORE_RENAME"
_NAME = re.compile(r"checkpoint-(\d+)\.safetensors")


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# FSDP2 (fully_shard) turns parameters and their optimizer state into DTensor shards. A checkpoint
# holds whole tensors, so saving gathers each shard (every rank takes part; rank 0 writes) and
# loading shards the whole tensors again: a checkpoint saved under FSDP loads in 1 process too.
def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor shard (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if _is_dtensor(t) else t


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) sharded the way ``param`` is, when ``param`` is a DTensor."""
    if _is_dtensor(param) and tuple(value.shape) == tuple(param.shape):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value


def _is_writer() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


# ---------------------------------------------------------------------------------- state → file
def _model_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from ..model import SparseModel

    tensors = {f"param.{name}": _whole(p.detach()) for name, p in _trainable(model).items()}
    meta: dict[str, Any] = {"params": {name: list(p.shape) for name, p in _trainable(model).items()}}
    if isinstance(model, SparseModel):
        meta["fingerprint"] = model.fingerprint
        meta["calibrated"] = model.is_calibrated
        if model.is_calibrated and not model.sparse_config.identity_bases:
            tensors.update(model.bases.export())
        for name, layer in model.sparse_layers().items():
            if layer.selection == "fixed" and layer.calibrated:
                tensors[f"support.{name}.rows"] = layer.rows
                tensors[f"support.{name}.cols"] = layer.cols
    return tensors, meta


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, dict[str, Any]] = {}
    for index in sorted(sd["state"]):  # the same order on every rank: gathers are collectives
        for key, value in sd["state"][index].items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{key}"] = _whole(value)
            else:
                numbers.setdefault(str(index), {})[key] = value
    meta = {"class": type(optimizer).__name__, "numbers": numbers, "param_groups": sd["param_groups"]}
    _check_json(meta, "optimizer state")
    return tensors, meta


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"python": [version, list(internal), gauss_next], "numpy": [kind, int(pos), int(has_gauss), float(gauss)]}
    return tensors, meta


def _check_json(value: Any, what: str) -> None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"The {what} holds a value JSON cannot store ({exc}); checkpoints keep tensors and JSON "
            "only (no pickle). Keep such values out of the state_dict, or save them yourself."
        ) from exc


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    step: int = 0,
    extra: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``DIR/checkpoint-<step>.safetensors`` atomically, point ``DIR/latest.json`` at it,
    keep the newest ``keep`` checkpoints. Returns the file's path."""
    if keep < 1:
        raise ConfigError("keep must be at least 1: the newest checkpoint is never deleted.")
    model = unwrap_model(model)
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tensors, model_meta = _model_state(model)
    meta: dict[str, Any] = {"kind": "checkpoint", "format": FORMAT, "step": int(step), "model": model_meta,
                            "extra": extra or {}}
    _check_json(meta["extra"], "checkpoint extra")
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_state(optimizer)
        tensors.update(opt_tensors)
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
        _check_json(meta["scheduler"], "scheduler state")
    rng_tensors, meta["rng"] = _rng_state()
    tensors.update(rng_tensors)

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta["sha256"] = file_checksum(tensors, meta)
    path = root / f"checkpoint-{int(step):08d}.safetensors"

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        pause = float(os.environ.get(_PAUSE_ENV, "0") or 0)
        if pause:
            time.sleep(pause)

    if _is_writer():  # under torch.distributed every rank gathered, rank 0 writes
        atomic_write(path, write)
        atomic_write_text(root / LATEST, json.dumps({"checkpoint": path.name, "step": int(step)}))
        for old in sorted(checkpoints(root))[:-keep]:
            if old.name != path.name:
                old.unlink(missing_ok=True)
    _barrier()  # no rank reads the directory before the file is there
    return path


def checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Complete checkpoint files in ``directory``, oldest first (temporary files are skipped)."""
    root = Path(directory)
    found = [p for p in root.glob("checkpoint-*.safetensors") if _NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_NAME.fullmatch(p.name).group(1)))


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The file ``DIR/latest.json`` points at (None when there is no checkpoint yet)."""
    root = Path(directory)
    pointer = root / LATEST
    if not pointer.is_file():
        found = checkpoints(root)
        return found[-1] if found else None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AdapterMismatchError(f"{pointer} is not a valid checkpoint pointer ({exc}); pass the checkpoint file itself.") from exc
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AdapterMismatchError(f"{pointer} names {name!r}, not a checkpoint file of this directory.")
    return root / name


# ---------------------------------------------------------------------------------- file → state
def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore a checkpoint (a file, or a directory: its ``latest.json``) into ``model`` (built the
    same way as when saving, e.g. ``get_sparse_model`` without calibrating), ``optimizer``
    (created over the same parameters) and ``scheduler``. Returns ``{"step", "extra"}``.
    Every mismatch (another model, other trainable parameters, another optimizer) is an error."""
    from ..model import SparseModel

    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise AdapterMismatchError(f"No checkpoint in {path}: nothing to resume (save one with save_checkpoint).")
        path = found
    tensors, meta = load_tensors(path, "checkpoint")
    if meta.get("kind") != "checkpoint" or meta.get("format") != FORMAT:
        raise AdapterMismatchError(f"{path} is a sparseft {meta.get('kind')} file, not a checkpoint of format {FORMAT}.")
    model = unwrap_model(model)
    saved = meta["model"]
    if isinstance(model, SparseModel) and saved.get("fingerprint") not in (None, model.fingerprint):
        raise AdapterMismatchError(
            f"Checkpoint {path} was saved on another base model (fingerprint {saved.get('fingerprint')} ≠ "
            f"{model.fingerprint}): load the base checkpoint it was trained from."
        )
    params = _trainable(model)
    ours = {name: list(p.shape) for name, p in params.items()}
    if ours != saved["params"]:
        missing = sorted(set(saved["params"]) ^ set(ours))[:3] or [
            n for n in ours if ours[n] != saved["params"].get(n)][:3]
        raise AdapterMismatchError(
            f"Checkpoint {path} does not fit this model's trainable parameters (e.g. {missing}): build the "
            "model with the same method, config and targets as the run that saved it."
        )
    with torch.no_grad():
        if isinstance(model, SparseModel):
            weight = next(iter(model.sparse_layers().values())).base_layer.weight
            if any(k.startswith("bases.") for k in tensors):
                model.bases.load(tensors, model._group_shapes(), weight.device, weight.dtype, model._group_parts())
            for name, layer in model.sparse_layers().items():
                if f"support.{name}.rows" in tensors:
                    layer.set_support(tensors[f"support.{name}.rows"], tensors[f"support.{name}.cols"])
                elif saved.get("calibrated"):
                    layer.calibrated = True
        for name, p in params.items():
            value = tensors[f"param.{name}"].to(device=p.device if not _is_dtensor(p) else "cpu", dtype=p.dtype)
            p.copy_(_like(value, p))
    if optimizer is not None:
        if "optimizer" not in meta:
            raise AdapterMismatchError(f"Checkpoint {path} holds no optimizer state; load it without an optimizer.")
        _load_optimizer(optimizer, tensors, meta["optimizer"], path)
    if scheduler is not None:
        if "scheduler" not in meta:
            raise AdapterMismatchError(f"Checkpoint {path} holds no scheduler state; load it without a scheduler.")
        scheduler.load_state_dict(meta["scheduler"])
    if restore_rng:
        _restore_rng(tensors, meta["rng"])
    return {"step": int(meta["step"]), "extra": meta.get("extra", {}), "path": str(path)}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict[str, Any], path: Path) -> None:
    if saved["class"] != type(optimizer).__name__:
        raise AdapterMismatchError(f"Checkpoint {path} holds {saved['class']} state, not {type(optimizer).__name__} state.")
    template = optimizer.state_dict()
    groups = saved["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in template["param_groups"]]:
        raise AdapterMismatchError(f"Checkpoint {path}: the optimizer's parameter groups differ from the saved ones.")
    for group, now in zip(groups, template["param_groups"]):
        for key, value in now.items():  # JSON turned tuples (betas) into lists
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, numbers in saved["numbers"].items():
        state.setdefault(int(index), {}).update(numbers)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, values in state.items():  # FSDP2: shard the whole tensors like their parameter
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and index < len(params):
                values[name] = _like(value, params[index])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _restore_rng(tensors: dict[str, torch.Tensor], saved: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss_next = saved["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, pos, has_gauss, gauss = saved["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))


__all__ = ["checkpoints", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
