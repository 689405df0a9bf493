"""One fine-tuning run for text classification: set up a method, calibrate, train, evaluate.

A plain torch loop (AdamW or SparseAdamW, linear warm-up/decay), recording what the results
contract needs: accuracy, trainable parameters, exact state bytes, peak RSS, step times.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from ..gradients import move_batch
from .checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import TextDataset, batches, encode, trim_padding
from ..errors import AdapterMismatchError, ConfigError, CorruptFileError, DataError
from ..fingerprint import backbone_fingerprint, quantized_weights
from ..quantized import unpack_for_training
from .artifacts import seal, verify
from .placement import Placement, placement_of, resolve
from ..methods import DEFAULT_LR, DEFAULT_METHOD, Prepared, canonical, method_spec, prepare, training_options
from .metrics import peak_rss_bytes, state_bytes
from ..progress import progress


@dataclass
class RunSettings:
    model_dir: str
    method: str = DEFAULT_METHOD
    lr: float | None = None
    steps: int = 400
    seed: int = 0
    batch_size: int = 16
    max_length: int = 64
    rank: int = 8
    density: float | None = None
    support_narrow: int | str | None = None  # SparseGrad: leading directions of each layer's narrow side
    calibration_steps: int = 20
    reselect_every: int | None = None
    warmup_fraction: float = 0.06
    eval_split: str = "test"
    eval_batch_size: int = 128
    show_progress: bool = True
    loss_every: int = 10
    checkpoint_dir: str | None = None  # save a training checkpoint here every `checkpoint_every` steps
    checkpoint_every: int = 0
    resume_dir: str | None = None  # continue from the latest checkpoint there (if any)
    save_dir: str | None = None  # save what was trained here (adapter, or the model for full/head)
    save_merged_dir: str | None = None  # and a plain merged model here
    merged_dtype: str = "auto"  # its dtype: auto (the checkpoint's), fp32, bf16, fp16
    device: str = "auto"  # app.placement: auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto, fp32, bf16, fp16 (autocast)
    quantize: str | None = None  # the base's linear layers loaded quantized: "4bit" or "8bit" (bitsandbytes)
    data: dict[str, Any] | None = None  # where the splits came from (--data and its columns): kept with what is saved


@dataclass(kw_only=True)
class RunRecord:
    """What every run reports, whatever the task: the results-contract keys besides the metric,
    and the cost and curve fields :meth:`LoopResult.record` fills."""

    method: str
    seed: int
    lr: float
    steps: int
    trainable_params: int
    state_bytes: int
    peak_rss_bytes: int
    step_time_s: float
    calibration_s: float
    wall_s: float
    final_loss: float
    state_detail: dict[str, int] = field(default_factory=dict)
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    device: str = "cpu"
    device_name: str = "CPU"
    precision: str = "fp32"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(kw_only=True)
class RunResult(RunRecord):
    accuracy: float
    eval_split: str


def load_classifier(model_dir: str | Path, num_labels: int, seed: int, quantize: str | None = None,
                    placement: Placement | None = None):
    """A sequence classifier from a local checkpoint, its weights in float32 whatever the file's
    dtype (a half-precision checkpoint trains with float32 weights; ``--precision`` runs the math
    in half), or its linear layers quantized (``quantize`` "4bit"/"8bit", bitsandbytes, loaded
    onto ``placement``'s device); the new head is initialised from ``seed``."""
    torch.manual_seed(seed)
    return (placement or Placement("cpu", "fp32")).load_pretrained(AutoModelForSequenceClassification, model_dir, quantize,
                                                                   num_labels=num_labels)


def load_causal_lm(model_dir: str | Path, seed: int = 0, quantize: str | None = None, placement: Placement | None = None):
    """A causal LM from a local checkpoint: float32 weights, or its linear layers quantized
    (``quantize`` "4bit"/"8bit", bitsandbytes, loaded onto ``placement``'s device)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return (placement or Placement("cpu", "fp32")).load_pretrained(AutoModelForCausalLM, model_dir, quantize)


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 128,
             placement: Placement | None = None) -> float:
    """The share of rows whose argmax is the label, on the model's device (in ``placement``'s
    precision)."""
    model.eval()
    device = next(model.parameters()).device
    placement = placement or placement_of(model)
    correct = 0
    n = len(data["labels"])
    for start in range(0, n, batch_size):
        batch = trim_padding({k: v[start : start + batch_size] for k, v in data.items() if k != "labels"})
        batch = {k: v.to(device) for k, v in batch.items()}
        with placement.autocast():
            logits = model(**batch).logits
        check_finite(logits)
        correct += int((logits.argmax(-1).cpu() == data["labels"][start : start + batch_size]).sum())
    return correct / n


def check_finite(outputs: torch.Tensor) -> None:
    """A score or a label from non-finite outputs is no answer: FloatingPointError instead."""
    if not bool(torch.isfinite(outputs).all()):
        raise FloatingPointError("The model's outputs are not finite (NaN/inf): it diverged or its files are damaged; "
                                 "train it again with a lower --lr.")


@dataclass
class LoopResult:
    times: list[float]
    curve: list[tuple[int, float]]
    detail: dict[str, int]
    calibration_s: float
    placement: Placement

    def record(self, prepared: Prepared, t_start: float) -> dict[str, Any]:
        """The cost and curve fields of a run's results record (every task has them)."""
        return {
            "trainable_params": prepared.trainable_params,
            "state_bytes": self.detail.get("state_bytes", 0),
            "peak_rss_bytes": peak_rss_bytes(),
            # the first steps warm up allocators and caches: the median is the steady state
            "step_time_s": statistics.median(self.times) if self.times else 0.0,
            "calibration_s": self.calibration_s,
            "wall_s": time.perf_counter() - t_start,
            "final_loss": self.curve[-1][1] if self.curve else float("nan"),
            "state_detail": self.detail,
            "loss_curve": self.curve,
            **self.placement.record(),
        }


def fit(
    prepared: Prepared,
    train: Any,
    *,
    lr: float,
    method: str,
    steps: int,
    seed: int,
    batch_size: int,
    calibration_steps: int,
    warmup_fraction: float,
    loss_every: int,
    show_progress: bool,
    reselect_every: int | None = None,
    resume_dir: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    placement: Placement | None = None,
    identity: dict[str, Any] | None = None,
) -> LoopResult:
    """The training loop shared by every task: calibrate if the method needs it, AdamW-style
    optimizer with linear warm-up/decay, ``steps`` shuffled batches of ``train`` (a dict of
    tensors), optional support re-selection and resumable checkpoints. ``on_step(step, model)``
    runs after each step, outside the timed part (e.g. evaluations during training).

    A variant's training options (``method[calibration_steps=40;warmup_fraction=0.2]``) override
    the arguments; ``reselect_every`` falls back to the method config's own. ``placement``: the
    model moves to its device before calibration, and each step runs in its precision (default:
    where the model is, fp32). ``identity``: what makes a run this run (settings, data and base
    fingerprints); checkpoints keep it, and resuming with another is refused."""
    model = prepared.model
    placement = placement or placement_of(model)
    placement.move(model)
    overrides = training_options(method)
    calibration_steps = overrides.get("calibration_steps", calibration_steps)
    warmup_fraction = overrides.get("warmup_fraction", warmup_fraction)
    config = getattr(prepared.sparse, "sparse_config", None)
    if reselect_every is None and config is not None and config.selection == "fixed":
        reselect_every = config.reselect_every
    reselect_batches = batches(train, batch_size, seed=20_000 + seed) if reselect_every else None
    resume = latest_checkpoint(resume_dir) if resume_dir else None
    # a checkpoint holds the bases and supports; 0 steps evaluates the untrained model as it is
    calibrate = prepared.needs_calibration and resume is None and steps > 0
    calibration_s = _calibrate(prepared, train, batch_size, seed, calibration_steps, show_progress) if calibrate else 0.0
    optimizer = prepared.make_optimizer(lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(warmup_fraction * steps), steps)
    scaler = placement.grad_scaler()
    torch.manual_seed(seed)
    model.train()
    unpack_for_training(model)  # any method on a quantized base (peft's LoRA too): see sparseft.quantized
    device = torch.device(placement.device)
    identity = json.loads(json.dumps(identity or {}))  # as a checkpoint gives it back (tuples → lists)
    run = _resume(resume_dir, model, optimizer, scheduler, lr, identity, steps) if resume is not None else Resumed()
    start, running, seen, curve, times, detail, first_loss = (run.step, run.running, run.seen, run.curve, run.times,
                                                              run.detail, run.first_loss)
    bar = progress(
        itertools.islice(batches(train, batch_size, seed=seed, steps=steps), start, None),
        desc=f"{method} lr={lr:g} seed={seed}",
        total=steps - start,
        disable=not show_progress,
    )
    for step, batch in enumerate(bar, start + 1):
        t0 = time.perf_counter()
        with placement.autocast():
            loss = model(**move_batch(batch, device)).loss
        scaler.scale(loss).backward()
        try:
            scaler.step(optimizer)
        except RuntimeError as exc:  # e.g. lr/(1-β₁) past float32's range: torch names no fix
            if "overflow" not in str(exc):
                raise
            raise FloatingPointError(f"The update overflowed at step {step} ({method}, lr={lr:g}): lower --lr.") from exc
        scaler.update()
        scheduler.step()
        if step == steps:
            detail = state_bytes(model, optimizer)  # gradients still allocated: the true peak state
        optimizer.zero_grad(set_to_none=True)
        if reselect_every and step % reselect_every == 0 and step < steps:
            prepared.sparse.reselect_support([next(reselect_batches)], optimizer=optimizer)
        loss_value = loss.item()  # (waits for the device: the step's time is its work, not its launch)
        times.append(time.perf_counter() - t0)
        running += loss_value
        seen += 1
        first_loss = loss_value if first_loss is None else first_loss
        if step % loss_every == 0 or step == steps:
            curve.append((step, running / seen))
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{running / seen:.4f}")
            running, seen = 0.0, 0
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"Training loss became {loss_value} at step {step} ({method}, lr={lr:g}): lower --lr.")
        if checkpoint_dir and checkpoint_every and step % checkpoint_every == 0:
            extra = {"lr": lr, "running": running, "seen": seen, "curve": curve, "times": times[-_KEPT_TIMES:],
                     "detail": detail, "first_loss": first_loss, "identity": identity}
            save_checkpoint(checkpoint_dir, model, optimizer, scheduler, step, extra=extra)
        if on_step is not None:
            on_step(step, model)

    if steps > start:  # the loss is checked before each update; the last update is checked here, before anything is saved or scored
        _check_last_update(model, move_batch(batch, device), placement, f"after step {steps} ({method}, lr={lr:g})", first_loss)
    return LoopResult(times, curve, detail, calibration_s, placement)


# A fine-tuning run whose loss ends this many times above its first step's (+1, for losses near 0)
# diverged: lr=1e4 ended at losses of 5,709-66,165, finite, and was saved and scored.
DIVERGED = 10.0
_KEPT_TIMES = 10_000  # step times a checkpoint keeps (the median of a resumed run spans both parts)


@torch.no_grad()
def _check_last_update(model: torch.nn.Module, batch: dict[str, Any], placement: Placement, when: str,
                       first_loss: float | None = None) -> None:
    """The trained parameters and the loss on the last batch are finite, and that loss is not
    ``DIVERGED`` times the first step's, else FloatingPointError."""
    trained = [p for p in model.parameters() if p.requires_grad]
    finite = bool(torch.stack([torch.isfinite(p).all() for p in trained]).all()) if trained else True
    if finite:
        was_training = model.training
        model.eval()
        with placement.autocast():
            loss = float(model(**batch).loss)
        model.train(was_training)
        finite = math.isfinite(loss)
    if not finite:
        raise FloatingPointError(f"The model is not finite {when}: the last update diverged; lower --lr.")
    if first_loss is not None and loss > DIVERGED * first_loss + 1:
        raise FloatingPointError(f"The loss rose from {first_loss:.4g} at the first step to {loss:.4g} {when}: "
                                 "training diverged; lower --lr.")


def _calibrate(prepared: Prepared, train: Any, batch_size: int, seed: int, steps: int, show_progress: bool) -> float:
    """Calibrate on ``steps`` shuffled batches of its own seed; returns the seconds it took."""
    t0 = time.perf_counter()
    prepared.sparse.calibrate(batches(train, batch_size, seed=10_000 + seed, steps=steps), steps=steps, show_progress=show_progress)
    return time.perf_counter() - t0


@dataclass
class Resumed:
    """Where a resumed run goes on from (a fresh run: step 0)."""

    step: int = 0
    running: float = 0.0
    seen: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    detail: dict[str, int] = field(default_factory=dict)
    first_loss: float | None = None


def _resume(directory: str, model, optimizer, scheduler, lr: float, identity: dict[str, Any], steps: int) -> Resumed:
    """Weights, optimizer, scheduler and RNG from the newest readable checkpoint in ``directory``
    (a corrupt newest one is reported, and the older kept one used). The run skips the batches
    already seen. A checkpoint of another run (other settings, data or base) is refused."""
    found = checkpoints(directory)
    newest = latest_checkpoint(directory)
    candidates = [newest, *[p for p in reversed(found) if p != newest]]
    for path in candidates:
        if not path.is_file():
            print(f"sparseft: {path} is missing. Trying the older checkpoint kept beside it.", file=sys.stderr)
            continue
        try:
            state = load_checkpoint(path, model, optimizer, scheduler)  # verifies the file before changing anything
            break
        except CorruptFileError as exc:
            print(f"sparseft: {exc} Trying the older checkpoint kept beside it.", file=sys.stderr)
    else:
        raise CorruptFileError(f"Every checkpoint in {directory} is damaged: start again without --resume.")
    extra = state["extra"]
    if extra.get("lr") != lr:
        raise ConfigError(f"{path} was trained with lr={extra.get('lr')}, not {lr:g}: resume with the same --lr.")
    saved = extra.get("identity") or {}
    differ = [f"{_flag(key)} {saved[key]!r} there, {value!r} now" for key, value in identity.items()
              if key in saved and saved[key] != value]
    if differ:
        raise ConfigError(f"{path} belongs to another run ({'; '.join(differ)}): resume with the same settings, data and "
                          "model, or train into a new --output-dir without --resume.")
    if state["step"] > steps:
        raise ConfigError(f"{path} is at step {state['step']}, past --steps {steps}: resume with --steps {state['step']} or more.")
    return Resumed(state["step"], extra["running"], extra["seen"], [tuple(point) for point in extra["curve"]],
                   list(extra.get("times", [])), dict(extra.get("detail", {})), extra.get("first_loss"))


def _flag(key: str) -> str:
    return {"data": "the training data (fingerprint)", "base": "the base model (fingerprint)"}.get(key, f"--{key.replace('_', '-')}")


def run_classification(settings: RunSettings, splits: dict[str, TextDataset], tokenizer=None) -> RunResult:
    """Fine-tune ``settings.model_dir`` on ``splits['train']``, report accuracy on the eval split."""
    t_start = time.perf_counter()
    placement = resolve(settings.device, settings.precision)
    method = canonical(settings.method)
    lr = settings.lr if settings.lr is not None else DEFAULT_LR[method]
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(settings.model_dir)
    train = encode(tokenizer, splits["train"], settings.max_length)
    evaluation = encode(tokenizer, splits[settings.eval_split], settings.max_length)
    model = load_classifier(settings.model_dir, len(splits["train"].label_names), settings.seed, settings.quantize, placement)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and settings.max_length > positions:
        raise ConfigError(
            f"--max-length {settings.max_length} is longer than this model's {positions} positions: use "
            f"--max-length {positions} or less (longer texts are truncated to --max-length tokens)."
        )
    base, skipped = backbone_fingerprint(model), quantized_weights(model)
    identity = run_identity(settings, method, train, base)
    prepared = prepare(method, model, rank=settings.rank, density=settings.density, support_narrow=settings.support_narrow)
    reselect = settings.reselect_every if method_spec(method).reselects else None
    loop = fit(prepared, train, lr=lr, method=method, steps=settings.steps, seed=settings.seed,
               batch_size=settings.batch_size, calibration_steps=settings.calibration_steps,
               warmup_fraction=settings.warmup_fraction, loss_every=settings.loss_every,
               show_progress=settings.show_progress, reselect_every=reselect, resume_dir=settings.resume_dir,
               checkpoint_dir=settings.checkpoint_dir, checkpoint_every=settings.checkpoint_every, placement=placement,
               identity=identity)
    acc = accuracy(prepared.model, evaluation, settings.eval_batch_size, placement)
    record = loop.record(prepared, t_start)
    save_run(prepared.model, tokenizer, settings, base, settings.model_dir, skipped, method=method,
             label_names=splits["train"].label_names, accuracy=acc)
    return RunResult(method=method, seed=settings.seed, lr=lr, accuracy=acc, eval_split=settings.eval_split,
                     steps=settings.steps, **record)


RUN_FILE = "sparseft_run.json"
# what `sparseft predict` needs from a run file, by task (a run file without "task" is a classifier's)
RUN_KEYS = {"classification": ("kind", "label_names", "max_length", "method", "model_dir", "seed"),
            "causal-lm": ("kind", "max_length", "method", "model_dir", "seed")}


def run_identity(settings: Any, method: str, train: dict[str, torch.Tensor], base: str) -> dict[str, Any]:
    """What makes a run this run, for any task's settings (RunSettings, CausalLMSettings): the
    options that change what it trains, and fingerprints of its encoded data and its base.
    Checkpoints keep it; resuming with another is refused."""
    keys = ("quantize", "steps", "seed", "batch_size", "max_length", "rank", "density", "support_narrow",
            "calibration_steps", "warmup_fraction", "reselect_every")
    return {"method": method, **{key: getattr(settings, key) for key in keys}, "data": data_fingerprint(train), "base": base}


def save_run(model: torch.nn.Module, tokenizer, settings: Any, base_fingerprint: str, model_dir: str | Path,
             quantized: list[str], **fields: Any) -> None:
    """``save_trained`` into the settings' save folders (if any), with the run file every task
    writes (base, length, seed, split, data, quantization) and the task's own ``fields``.
    ``quantized``: the base's tensors its fingerprint left out, stored quantized
    (``fingerprint.quantized_weights``), so that ``predict --full-precision`` checks the rest.
    With ``save_merged_dir`` it uses ``model`` up (``save_trained``): call it last."""
    if not (settings.save_dir or settings.save_merged_dir):
        return
    run = {"model_dir": str(model_dir), "max_length": settings.max_length, "seed": settings.seed,
           "eval_split": settings.eval_split, "data": settings.data, "quantize": settings.quantize,
           **({"quantized_weights": quantized} if settings.quantize else {}), **fields}
    if not (settings.quantize and settings.save_merged_dir):
        save_trained(model, tokenizer, run, settings.save_dir, settings.save_merged_dir, base_fingerprint,
                     settings.merged_dtype)
        return
    # Merging beside the quantized base would quantize W0 + ΔW again: the adapter goes onto the
    # float32 checkpoint on the CPU (the GPU that needed --quantize may not hold it), as
    # `predict --full-precision --save-merged` does, through a folder of its own if none is kept.
    merged = Path(settings.save_merged_dir)
    merged.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{merged.name}.adapter.", dir=merged.parent) as scratch:
        adapter = settings.save_dir or scratch
        save_trained(model, tokenizer, run, adapter, None, base_fingerprint)
        saved = read_trained(adapter)
        unquantized, tokenizer, _ = load_trained(adapter, saved=saved, full_precision=True)
        save_merged(unquantized, tokenizer, saved, merged, dtype=settings.merged_dtype)


def data_fingerprint(data: dict[str, torch.Tensor]) -> str:
    """A short SHA-256 of encoded rows (their token ids and labels)."""
    h = hashlib.sha256()
    for key in sorted(data):
        h.update(key.encode())
        h.update(data[key].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_trained(model: torch.nn.Module, tokenizer, run: dict[str, Any], adapter_dir: str | None,
                 merged_dir: str | None, base_fingerprint: str | None = None, merged_dtype: str = "auto") -> None:
    """Save what a run trained: the adapter (sparseft's or peft's format; the whole model for
    full/head) with ``sparseft_run.json`` (base model, method, labels) so ``sparseft predict``
    can load it back; and optionally a plain merged model (``from_pretrained`` as usual), stored
    in ``merged_dtype`` ("auto": the dtype of the checkpoint it came from, ``stored_dtype``, as
    that checkpoint is served; or "fp32", "bf16", "fp16").
    Each folder is sealed (``artifacts.seal``: every file's checksum, the base's fingerprint).

    With ``merged_dir`` the model is merged and cast in place, so it is used up: a copy would
    need a large model's memory twice, on its device, at the end of a run."""
    from ..serialization import atomic_write_text
    from ..tuner import BaseTuner

    whole = not isinstance(model, BaseTuner) and not hasattr(model, "peft_config")
    if adapter_dir:
        out = Path(adapter_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        if whole:
            tokenizer.save_pretrained(out)
        atomic_write_text(out / RUN_FILE, json.dumps(dict(run, kind="model" if whole else "adapter"), indent=2))
        seal(out, base_fingerprint)
    if merged_dir:
        out = Path(merged_dir)
        plain = model if whole else model.merge_and_unload()
        wanted = stored_dtype(run["model_dir"]) if merged_dtype == "auto" else MERGED_DTYPES[merged_dtype]
        plain.to(fitting_dtype(plain, wanted))  # (merged in float32, W0 + ΔW rounded once)
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        atomic_write_text(out / RUN_FILE, json.dumps(dict(run, kind="model"), indent=2))
        seal(out, base_fingerprint)


def stored_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the checkpoint in ``model_dir`` stores its weights in (its config.json: "dtype",
    or "torch_dtype" before transformers 5), which the float32 weights loaded from it no longer
    show; float32 where it says none or another. A merged model saved in float32 from a bf16
    checkpoint doubles its files, and a server's "auto" dtype may then pick fp16 for it."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


MERGED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # (and "auto")


def fitting_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.dtype:
    """``dtype`` if every weight of ``model`` fits its range, else float32 (with a note): an
    fp16 checkpoint's W0 + ΔW may pass fp16's 65504, and a cast would save infs with exit 0."""
    if dtype == torch.float32:
        return dtype
    limit = torch.finfo(dtype).max
    over = [name for name, t in model.state_dict().items() if t.is_floating_point() and t.numel() and float(t.abs().max()) > limit]
    if over:
        print(f"sparseft: the merged weights ({over[0]}{' and more' if len(over) > 1 else ''}) pass {dtype}'s range "
              f"(±{limit:g}): the merged model is saved in float32.", file=sys.stderr)
        return torch.float32
    return dtype


def check_merge_target(folder: Path, quantized: str | None) -> None:
    """Refuse a merge into ``folder`` that is not a new or empty folder, or into a base loaded
    ``quantized`` ("4bit"/"8bit"), which would quantize W0 + ΔW again."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(f"--save-merged {folder}: it exists and is not an empty folder; name a new one (nothing is overwritten).")
    if quantized:
        raise ConfigError(f"--save-merged on the {quantized} base would quantize W0 + ΔW again (rounding the update away in "
                          "part): add --full-precision to merge into the float32 base.")


def save_merged(model: torch.nn.Module, tokenizer, saved: tuple[dict[str, Any], dict[str, Any]],
                folder: str | Path, model_dir: str | Path | None = None, dtype: str = "auto") -> None:
    """A loaded adapter merged into its base, saved as a plain model in the new ``folder`` (as
    ``save_trained`` saves one: run file, sealed, and like it using ``model`` up), written beside
    it and renamed into place, so an interrupted save leaves no half folder. ``saved``:
    ``read_trained``'s (run, manifest); ``model_dir``: where the base is now, if it moved;
    ``dtype``: the merged model's, as ``save_trained``'s ``merged_dtype``."""
    from ..quantized import is_quantized

    out = Path(folder)
    check_merge_target(out, saved[0].get("quantize") if any(is_quantized(m) for m in model.modules()) else None)
    run = {key: value for key, value in saved[0].items() if key != "quantized_weights"}
    run["model_dir"] = str(model_dir or run["model_dir"])
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    trained_on = {"trained_quantize": run["quantize"]} if run.get("quantize") else {}
    save_trained(model, tokenizer, dict(run, quantize=None, **trained_on), None, partial, saved[1].get("base_fingerprint"),
                 dtype)
    if out.exists():
        out.rmdir()
    partial.rename(out)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing: {what}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}): {what}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{path} is not a JSON object: {what}")
    return value


AGAIN = "pass a folder written by `sparseft train` (OUTPUT_DIR/adapters/seed-S or the --save-merged folder)."


def read_trained(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run, manifest) of a folder ``save_trained`` wrote, its files verified: what a caller can
    check its own arguments against before any model loads."""
    folder = Path(path)
    if not (folder / RUN_FILE).is_file():
        raise DataError(f"{folder} holds no {RUN_FILE}: {AGAIN}")
    manifest = verify(folder)
    run = _read_json(folder / RUN_FILE, AGAIN)
    task = run.get("task", "classification")
    if task not in RUN_KEYS:
        raise DataError(f"{folder / RUN_FILE} is a {task!r} run, which this sparseft cannot load ({', '.join(RUN_KEYS)}): "
                        "upgrade sparseft.")
    missing = [key for key in RUN_KEYS[task] if key not in run]
    if missing:
        raise DataError(f"{folder / RUN_FILE} lacks {missing}: {AGAIN}")
    return run, manifest


def load_trained(path: str | Path, model_dir: str | Path | None = None, placement: Placement | None = None,
                 saved: tuple[dict[str, Any], dict[str, Any]] | None = None, full_precision: bool = False):
    """(model, tokenizer, run) from a folder ``save_trained`` wrote, its files verified first
    (``saved``: what ``read_trained`` already returned for it). An adapter loads onto the base
    recorded at training, or ``model_dir`` (that base moved); either must have the fingerprint
    the run recorded. A run that trained on a quantized base loads it quantized the same way, or
    (``full_precision``) in float32, as an adapter is served: its fingerprint then leaves out the
    tensors that were quantized, and the adapter checks those itself (within their rounding)."""
    folder = Path(path)
    run, manifest = saved or read_trained(folder)
    if run.get("task", "classification") == "causal-lm":
        from transformers import AutoModelForCausalLM

        auto, head, load_base = AutoModelForCausalLM, {}, load_causal_lm
    else:
        auto, head, load_base = AutoModelForSequenceClassification, {"num_labels": len(run["label_names"])}, load_classifier
    if run["kind"] == "model":
        if full_precision and run.get("quantize"):
            raise ConfigError(f"--full-precision: {folder} holds a whole model ({run.get('method')}), saved as it trained, on "
                              f"a {run['quantize']} base; only an adapter moves onto the float32 base. Drop --full-precision.")
        model = auto.from_pretrained(str(folder), dtype=torch.float32, **head)
        return model.eval(), AutoTokenizer.from_pretrained(str(folder)), run
    base_dir = Path(model_dir or run["model_dir"])
    if not (base_dir / "config.json").is_file():
        raise DataError(f"The base model {base_dir} {'given' if model_dir else 'recorded at training'} is not there (no "
                        "config.json): pass --model DIR with the base this adapter was trained on (it is checked).")
    unquantized = full_precision and run.get("quantize") is not None
    if unquantized and "quantized_weights" not in run:
        raise ConfigError(f"{folder} was trained on a {run['quantize']} base before runs recorded which of its weights were "
                          "quantized: load it without --full-precision, or train it again.")
    base = load_base(base_dir, **head, seed=run["seed"], quantize=None if unquantized else run.get("quantize"),
                     placement=placement)
    expected = manifest.get("base_fingerprint")
    found = backbone_fingerprint(base, run["quantized_weights"] if unquantized else ()) if expected else None
    if found != expected:
        raise AdapterMismatchError(f"{base_dir} is not the base model this adapter was trained on (fingerprint "
                                   f"{found} ≠ {expected}): pass --model with that base.")
    config = _read_json(folder / "adapter_config.json", AGAIN)
    if "peft_type" in config:  # peft's format (LoRA, SHiRA, ...): peft reads its own kinds
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(folder))
    else:  # sparseft's format: the method its kind is registered to
        from .. import BaseTuner

        model = BaseTuner.from_pretrained(base, folder)
    return model.eval(), AutoTokenizer.from_pretrained(str(base_dir)), run
