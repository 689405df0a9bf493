"""The benchmark suite (``sparseft bench --suite``): several real tasks, paired seeds, a per-method
learning-rate sweep on validation data, and each method's paired difference to LoRA-MLP with a
95% bootstrap interval, per task and pooled.

Protocol, per (task, method):

1. **Sweep** on seed 0: the method's centre rate × ``grid`` (default ⅓, 1, 3), scored on the
   task's validation rows. While the best rate is at an end of the grid, the grid grows one more
   step that way (up to ``max_extend`` times); a rate still at the edge is flagged
   ``lr_at_grid_edge``. Test predictions are recorded for every run but read only for the chosen
   rate: nothing is tuned on test.
2. **Seeds** 1 … S-1 at the chosen rate. Seed s means the same data order, the same calibration
   batches and the same head initialisation for every method, so runs pair across methods.
3. **Comparison**: per seed and test row, correct(method) - correct(lora-mlp); mean and 95%
   interval by bootstrap over test rows and seeds (:mod:`sparseft.app.stats`), per task and pooled
   over tasks. Also: the step (and seconds, calibration included) at which the method's
   validation accuracy first reaches LoRA-MLP's final one, from a few evaluations during training.

Runs go to worker processes (``jobs``, one torch thread each) and stream into
``records.jsonl``; ``suite.json`` (the output contract), ``suite.md`` and ``suite_ci.png`` are
written at the end.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor  # (the runner takes it from here: tests run jobs inline)
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..serialization import atomic_write_text
from .artifacts import read_sealed, sealed_record
from .stats import paired_difference
from .placement import Placement
from .runner import Runner
from .sweep import SWEEP_FACTORS, choose_rate, rate_at, rate_grid, step_past
from .tasks import SUITE_TASKS

REFERENCE = "lora-mlp"
# The default set: full fine-tuning, the reference, the product's default (sparse-random: a fixed
# random support, no rotation), SparseGrad (the same support, narrow side rotated) and its dynamic
# mode, and peft's own sparse adapters. sparsegrad-random (both sides rotated), sparsegrad-fixed
# (the calibrated support), meprop and s2ft run with --methods (they would push the run past 100 minutes).
SUITE_METHODS = ("full", "lora-mlp", "sparse-random", "sparsegrad-onesided", "sparsegrad-dynamic", "shira", "supertuning")
# The default tasks: all four (sentiment, sarcasm, question type, news topic; docs/benchmark.md).
DEFAULT_TASKS = SUITE_TASKS


@dataclass
class SuiteSettings:
    output_dir: str = "runs/suite"
    regime: str = "peft"
    model: str = "minilm"  # "minilm", "mpnet" or a local from_pretrained folder
    tasks: tuple[str, ...] = DEFAULT_TASKS
    methods: tuple[str, ...] = SUITE_METHODS
    steps: int = 80
    batch_size: int = 16
    max_length: int = 64
    rank: int = 8
    seeds: int = 3
    calibration_steps: int = 10
    warmup_fraction: float = 0.06
    grid: tuple[float, ...] = SWEEP_FACTORS
    max_extend: int = 2
    val_rows: int = 400
    test_rows: int = 1000
    curve_points: int = 3  # validation evaluations during training (time to reach LoRA's accuracy)
    curve_rows: int = 150
    jobs: int = 2
    threads: int = 1
    lr_overrides: dict[str, float] = field(default_factory=dict)  # method -> sweep centre
    # earlier runs' output directories (one or several): their finished runs are not trained again
    reuse: str | tuple[str, ...] | None = None
    compare_to: str | None = None  # a second reference: every method's paired difference to it as well
    cache_dir: str | None = None
    show_progress: bool = True
    device: str = "cpu"  # app.placement, resolved by the CLI (the suite's records say where they ran)
    precision: str = "fp32"

    @classmethod
    def quick(cls, **kwargs: Any) -> "SuiteSettings":
        """A smoke run of the whole suite: every task and method, a few steps, two rates, two seeds."""
        base = dict(steps=6, seeds=2, calibration_steps=2, grid=(1.0, 3.0), max_extend=0, val_rows=48, test_rows=64,
                    curve_points=2, curve_rows=32, max_length=48)
        return cls(**{**base, **kwargs})

    def centre(self, method: str) -> float:
        """The centre of ``method``'s sweep: the registry's rate for this regime (a variant
        starts at its method's, or at its own ``lr`` option), unless overridden."""
        from ..methods import variant_lr

        if method in self.lr_overrides:
            return self.lr_overrides[method]
        return variant_lr(method, f"suite-{self.regime}")


# ----------------------------------------------------------------------------- one run (worker side)
_WORKER_CACHE: dict[tuple, Any] = {}


def _model_dir(model: str, cache_dir: str | None) -> str:
    if model == "minilm":
        from .resources import default_model_dir

        return str(default_model_dir())
    if model == "mpnet":
        from .tasks import mpnet_dir

        return str(mpnet_dir(cache_dir))
    if not Path(model).is_dir():
        raise ConfigError(f"--model {model!r} is neither 'minilm', 'mpnet' nor a model folder.")
    return model


def _encoded(task: str, model_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Tokenized splits of ``task`` (train whole; validation/test subsampled, fixed), cached per process."""
    key = (task, model_dir, settings["max_length"], settings["val_rows"], settings["test_rows"], settings["curve_rows"])
    if key not in _WORKER_CACHE:
        import torch
        from transformers import AutoTokenizer

        from .tasks import load_task, subsample

        data = load_task(task, cache_dir=settings["cache_dir"])
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def encode(rows):
            pairs = [r.text_pair for r in rows] if data.is_pair else None
            enc = tokenizer([r.text for r in rows], pairs, truncation=True, max_length=settings["max_length"],
                            padding="max_length", return_tensors="pt")
            out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            out["labels"] = torch.tensor([r.label for r in rows])
            return out

        validation = subsample(data.validation, settings["val_rows"], seed=1)
        _WORKER_CACHE[key] = {
            "num_labels": data.num_labels,
            "train": encode(data.train),
            "validation": encode(validation),
            "curve": encode(validation[: settings["curve_rows"]]),
            "test": encode(subsample(data.test, settings["test_rows"], seed=2)),
        }
    return _WORKER_CACHE[key]


def _predictions(model, data: dict[str, Any], batch_size: int = 128, placement: Any = None) -> list[int]:
    """1 where the model's argmax is the label, per row (on the model's device, in ``placement``'s precision)."""
    import torch

    from .data import trim_padding
    from .placement import placement_of

    placement = placement or placement_of(model)
    device = next(model.parameters()).device

    was_training = model.training
    model.eval()
    out: list[int] = []
    with torch.no_grad():
        for start in range(0, len(data["labels"]), batch_size):
            batch = {k: v.to(device) for k, v in trim_padding({k: v[start:start + batch_size] for k, v in data.items()}).items()}
            labels = batch.pop("labels")
            with placement.autocast():
                out += (model(**batch).logits.argmax(-1) == labels).int().tolist()
    model.train(was_training)
    return out


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training run: ``job`` has task, method, lr, seed, need_test and the settings dict."""
    import torch

    from ..methods import prepare
    from .metrics import peak_rss_bytes, reset_peak_rss
    from .train import fit, load_classifier

    s = job["settings"]
    torch.set_num_threads(s["threads"])
    own_peak = reset_peak_rss()  # (a suite worker lives on across jobs; without a reset its peak is its lifetime's)
    t0 = time.perf_counter()
    model_dir = _model_dir(s["model"], s["cache_dir"])
    data = _encoded(job["task"], model_dir, s)
    model = load_classifier(model_dir, data["num_labels"], job["seed"])
    prepared = prepare(job["method"], model, rank=s["rank"], regime=s["regime"])
    placement = Placement(s["device"], s["precision"])
    steps = s["steps"]
    marks = sorted({max(1, round(steps * (i + 1) / s["curve_points"])) for i in range(s["curve_points"])})
    curve: list[tuple[int, float]] = []

    def on_step(step: int, model_: Any) -> None:
        if step in marks:
            hits = _predictions(model_, data["curve"], placement=placement)
            curve.append((step, sum(hits) / len(hits)))

    loop = fit(prepared, data["train"], lr=job["lr"], method=job["method"], steps=steps, seed=job["seed"],
               batch_size=s["batch_size"], calibration_steps=s["calibration_steps"], warmup_fraction=s["warmup_fraction"],
               loss_every=max(1, steps // 10), show_progress=False, on_step=on_step, placement=placement)
    val = _predictions(prepared.model, data["validation"], placement=placement)
    record = {
        "task": job["task"], "method": job["method"], "lr": job["lr"], "seed": job["seed"], "regime": s["regime"],
        "val_accuracy": sum(val) / len(val), "curve": curve,
        "trainable_params": prepared.trainable_params,
        "step_time_s": statistics.median(loop.times) if loop.times else 0.0,
        "calibration_s": loop.calibration_s, "final_loss": loop.curve[-1][1] if loop.curve else float("nan"),
        "peak_rss_bytes": peak_rss_bytes() if own_peak else None, **placement.record(),
    }
    if job["need_test"]:
        test = _predictions(prepared.model, data["test"], placement=placement)
        record["test_correct"] = test
        record["test_accuracy"] = sum(test) / len(test)
    record["wall_s"] = time.perf_counter() - t0
    return record


def _job(job: dict[str, Any]) -> dict[str, Any]:
    return run_job(job)  # (looked up at call time: tests put a fake run_job here)


# ----------------------------------------------------------------------------- scheduling (parent side)
# Settings that change what a run computes; two runs with equal keys (and task, method, rate, seed)
# give the same record, so a finished one can be reused (--reuse) instead of trained again.
RUN_KEY_FIELDS = ("regime", "model", "steps", "batch_size", "max_length", "rank", "calibration_steps",
                  "warmup_fraction", "val_rows", "test_rows", "curve_points", "curve_rows", "precision")
_KEY_BEFORE = {"precision": "fp32"}  # what a run directory written before a field existed ran with


def run_key(settings: SuiteSettings) -> dict[str, Any]:
    return {k: getattr(settings, k) for k in RUN_KEY_FIELDS}


def _job_key(job: dict[str, Any]) -> tuple:
    """A run's identity. A variant's ``lr`` option only moves its sweep's centre, so ``m[lr=x]`` at
    rate r is the same run as ``m`` at rate r and may be reused under either name."""
    from ..methods import without_lr

    return job["task"], without_lr(job["method"]), float(job["lr"]), int(job["seed"])


def reusable_records(settings: SuiteSettings, directory: str | os.PathLike) -> dict[tuple, dict[str, Any]]:
    """Finished runs in ``directory`` (an earlier or interrupted suite run) that this run may take as
    they are: same run settings, no error. A directory run with other settings is an error that
    names the fields, not a silent mix; one that differs in the regime only gives the runs of the
    methods prepared the same in either (``methods.REGIME_FREE``: full fine-tuning)."""
    from ..methods import REGIME_FREE, parse_method
    d = Path(directory)
    log = d / "records.jsonl"
    if not log.is_file():
        raise ConfigError(f"--reuse {d}: no records.jsonl there; give the output directory of an earlier suite run.")
    if (d / "suite_settings.json").is_file():
        theirs = json.loads((d / "suite_settings.json").read_text(encoding="utf-8"))
    elif (d / "suite_run.json").is_file():
        theirs = json.loads((d / "suite_run.json").read_text(encoding="utf-8"))["settings"]
    else:
        raise ConfigError(f"--reuse {d}: no suite_settings.json or suite_run.json saying how its runs were made.")
    ours = run_key(settings)
    theirs = {**_KEY_BEFORE, **theirs}
    other_regime = theirs.get("regime") != settings.regime
    differ = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in ours.items() if theirs.get(k) != v and k != "regime"]
    if differ:
        raise ConfigError(f"--reuse {d}: its runs were made with other settings ({'; '.join(differ)}); "
                          "run with the same settings or without --reuse.")
    out: dict[tuple, dict[str, Any]] = {}
    records, damaged = read_sealed(log)
    for rec in records:
        if other_regime and parse_method(rec["method"])[0] not in REGIME_FREE:
            continue
        if "error" not in rec and "test_correct" in rec:
            out[_job_key(rec)] = rec
    if other_regime:
        print(f"--reuse {d}: made in the {theirs.get('regime')} regime; {len(out)} run(s) of {', '.join(sorted(REGIME_FREE))} "
              "taken (the same in either regime), the others trained here.", file=sys.stderr)
    if damaged:
        print(f"--reuse {d}: {damaged} record(s) fail their checksum (changed after the run); they are trained again.",
              file=sys.stderr)
    return out


def _run(runner: Runner, jobs: list[dict[str, Any]], reused: dict[tuple, dict[str, Any]], base: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of ``jobs``: reused ones as they are, the others trained by ``runner``."""
    keyed = [(job, _job_key(job)) for job in jobs]
    kept = [{**reused[key], "method": job["method"]} for job, key in keyed if key in reused]
    runner.records += kept
    runner.done += len(kept)
    return kept + runner.run(_job, [{**job, "settings": base} for job, key in keyed if key not in reused])


def _describe(rec: dict[str, Any]) -> str:
    what = f"{rec['task']} {rec['method']} lr={rec['lr']:g} seed={rec['seed']}"
    return what + (f": error: {rec['error']}" if "error" in rec else f": val {rec['val_accuracy']:.4f} ({rec['wall_s']:.0f} s)")


def run_suite(settings: SuiteSettings) -> dict[str, Any]:
    """Run the whole protocol; write records.jsonl, suite.json, suite.md and suite_ci.png."""
    from ..methods import REGIMES, canonical

    if settings.regime not in REGIMES:
        raise ConfigError(f"--regime {settings.regime!r} is not known; use {' or '.join(REGIMES)}.")
    methods = tuple(canonical(m) for m in settings.methods)
    if REFERENCE not in methods:
        methods = (REFERENCE, *methods)
    compare_to = canonical(settings.compare_to) if settings.compare_to else None
    if compare_to and compare_to not in methods:
        methods = (*methods, compare_to)
    settings = replace(settings, methods=methods, compare_to=compare_to)
    for task in settings.tasks:
        if task not in SUITE_TASKS:
            raise ConfigError(f"Unknown suite task {task!r}; choose from {', '.join(SUITE_TASKS)}.")
    from .tasks import load_task, missing_tasks

    missing = missing_tasks(settings.tasks, settings.cache_dir)
    if missing:  # stop before any training, naming each source and its fix
        lines = [f"  {task}: source {st.source.name} ({st.source.spec}) is {st.state}: {st.problem}" for task, st in missing]
        present = [t for t in settings.tasks if t not in {task for task, _ in missing}]
        raise DataError("The suite cannot start; its data is not all here:\n" + "\n".join(lines) +
                        "\nRun `sparseft bench --prepare` to fetch it" +
                        (f", or run the present tasks only: --tasks {','.join(present)}." if present else "."))
    _model_dir(settings.model, settings.cache_dir)  # fail fast on a missing model

    for task in settings.tasks:  # fail fast (and build the split caches once, in this process)
        load_task(task, cache_dir=settings.cache_dir)
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    reused: dict[tuple, dict[str, Any]] = {}
    for directory in (settings.reuse,) if isinstance(settings.reuse, str) else settings.reuse or ():
        reused.update(reusable_records(settings, directory))  # (equal keys: the same run)
    # The new records.jsonl starts with every reusable run (so resuming into the same directory
    # loses nothing if this run is cut off too), then streams this run's new ones.
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(sealed_record(r)) + "\n" for r in reused.values()))
    atomic_write_text(out / "suite_settings.json", json.dumps(run_key(settings), indent=1))
    pairs = [(t, m) for t in settings.tasks for m in methods]
    runner = Runner(jobs=settings.jobs, threads=settings.threads, log=out / "records.jsonl", describe=_describe, label="suite",
                    total=len(pairs) * (len(settings.grid) + settings.seeds - 1), show_progress=settings.show_progress,
                    executor=ProcessPoolExecutor)
    base = {**run_key(settings), "threads": settings.threads, "cache_dir": settings.cache_dir, "device": settings.device}
    t0 = time.perf_counter()
    try:
        # 1. sweep on seed 0, growing the grid while the best rate is at its edge
        tried: dict[tuple[str, str], dict[float, dict[str, Any]]] = {p: {} for p in pairs}
        factors = {p: list(settings.grid) for p in pairs}
        todo = [(p, f) for p in pairs for f in settings.grid]
        for round_ in range(settings.max_extend + 1):
            jobs = [{"task": t, "method": m, "lr": rate_at(settings.centre(m), f), "seed": 0, "need_test": True}
                    for (t, m), f in todo]
            for rec in _run(runner, jobs, reused, base):
                tried[(rec["task"], rec["method"])][rec["lr"]] = rec
            todo = []
            if round_ == settings.max_extend:
                break
            for p in pairs:
                best, edge = _choose(tried[p], factors[p], settings.centre(p[1]))
                if edge is not None:
                    f = step_past(factors[p], edge)
                    factors[p] = sorted([*factors[p], f])
                    todo.append((p, f))
                    runner.total += 1
            if not todo:
                break
        chosen = {}
        for p in pairs:
            best, edge = _choose(tried[p], factors[p], settings.centre(p[1]))
            chosen[p] = (best, edge is not None)
        # 2. the other seeds at the chosen rate
        jobs = [{"task": t, "method": m, "lr": chosen[(t, m)][0], "seed": s, "need_test": True}
                for (t, m) in pairs if chosen[(t, m)][0] is not None for s in range(1, settings.seeds)]
        _run(runner, jobs, reused, base)
    finally:
        runner.close()
    doc = summarize(runner.records, settings, chosen)
    doc["wall_s"] = time.perf_counter() - t0
    from .provenance import run_metadata

    doc["settings"] = asdict(settings)
    doc["run"] = run_metadata()
    atomic_write_text(out / "suite.json", json.dumps(doc["records"], indent=1))
    atomic_write_text(out / "suite_run.json", json.dumps({k: v for k, v in doc.items() if k != "records"}, indent=1, default=str))
    atomic_write_text(out / "suite.md", markdown(doc["records"], settings))
    doc["plots"] = [str(p) for p in plot_ci(doc["records"], settings, out / "suite_ci.png")]
    return doc


def _choose(runs: dict[float, dict[str, Any]], factors: list[float], centre: float) -> tuple[float | None, str | None]:
    """(best rate by validation accuracy, 'low'/'high' if it is at that end of the grid); a run
    that failed or ended on a non-finite loss does not count."""
    scores = {r: runs[r]["val_accuracy"] if r in runs and "error" not in runs[r]
              and math.isfinite(runs[r].get("final_loss", float("nan"))) else float("nan")
              for r in rate_grid(centre, factors)}
    return choose_rate(scores, centre)


# ----------------------------------------------------------------------------- summary
def _reach(curve: list, target: float) -> int | None:
    for step, acc in curve:
        if acc >= target:
            return int(step)
    return None


def summarize(records: list[dict[str, Any]], settings: SuiteSettings,
              chosen: dict[tuple[str, str], tuple[float | None, bool]]) -> dict[str, Any]:
    """The contract's records: one per (task, method) and one per method with task 'pooled'."""
    final: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for rec in records:
        key = (rec["task"], rec["method"])
        if "error" in rec or key not in chosen or rec["lr"] != chosen[key][0]:
            continue
        final.setdefault(key, {})[rec["seed"]] = rec
    out: list[dict[str, Any]] = []
    failures = [r for r in records if "error" in r]
    per_method_correct: dict[str, dict[str, list]] = {}
    ref_correct: dict[str, list] = {}
    other = settings.compare_to  # the second reference (--compare-to), if any
    vs_other: dict[str, tuple[dict[str, list], dict[str, list]]] = {}
    for task in settings.tasks:
        ref = final.get((task, REFERENCE), {})
        for method in settings.methods:
            runs = final.get((task, method), {})
            seeds = sorted(set(runs) & set(ref))
            row: dict[str, Any] = {"task": task, "regime": settings.regime, "method": method, "model": settings.model,
                                   "lr": chosen.get((task, method), (None, False))[0],
                                   "lr_at_grid_edge": bool(chosen.get((task, method), (None, False))[1]),
                                   "seeds": sorted(runs), "accuracy": None, "accuracy_std": None, "diff_vs_lora_mlp": None}
            if runs:
                accs = [runs[s]["test_accuracy"] for s in sorted(runs)]
                row["accuracy"] = statistics.fmean(accs)
                row["accuracy_std"] = statistics.stdev(accs) if len(accs) > 1 else None
                row["val_accuracy"] = statistics.fmean(runs[s]["val_accuracy"] for s in runs)
                row["trainable_params"] = runs[min(runs)]["trainable_params"]
                row["step_time_s"] = statistics.median(runs[s]["step_time_s"] for s in runs)
                row["calibration_s"] = statistics.median(runs[s]["calibration_s"] for s in runs)
                row["test_rows"] = len(runs[min(runs)]["test_correct"])
            if runs and seeds:
                a = [runs[s]["test_correct"] for s in seeds]
                b = [ref[s]["test_correct"] for s in seeds]
                row["diff_vs_lora_mlp"] = paired_difference(a, b, seed=hash_task(task))
                per_method_correct.setdefault(method, {})[task] = a
                ref_correct.setdefault(method, {})[task] = b  # type: ignore[assignment]
                reach = [_reach(runs[s]["curve"], ref[s]["curve"][-1][1]) for s in seeds if ref[s]["curve"]]
                hit = [r for r in reach if r is not None]
                row["steps_to_lora_final"] = statistics.median(hit) if len(hit) * 2 > len(reach) else None
                row["seconds_to_lora_final"] = (row["steps_to_lora_final"] * row["step_time_s"] + row["calibration_s"]
                                                if row["steps_to_lora_final"] is not None else None)
            if other:
                row["compare_to"], row["diff_vs_compare"] = other, None
                base = final.get((task, other), {})
                shared = sorted(set(runs) & set(base))
                if shared:
                    a = [runs[s]["test_correct"] for s in shared]
                    b = [base[s]["test_correct"] for s in shared]
                    row["diff_vs_compare"] = paired_difference(a, b, seed=hash_task(task))
                    vs_other.setdefault(method, ({}, {}))[0][task] = a
                    vs_other[method][1][task] = b
            out.append(row)
    full_acc = {t: next((r["accuracy"] for r in out if r["task"] == t and r["method"] == "full"), None) for t in settings.tasks}
    lora_acc = {t: next((r["accuracy"] for r in out if r["task"] == t and r["method"] == REFERENCE), None) for t in settings.tasks}
    for method in settings.methods:
        rows = [r for r in out if r["method"] == method and r["accuracy"] is not None]
        pooled: dict[str, Any] = {"task": "pooled", "regime": settings.regime, "method": method, "model": settings.model,
                                  "lr": None, "lr_at_grid_edge": any(r["lr_at_grid_edge"] for r in rows),
                                  "tasks": [r["task"] for r in rows],
                                  "accuracy": statistics.fmean(r["accuracy"] for r in rows) if rows else None,
                                  "diff_vs_lora_mlp": None}
        correct = per_method_correct.get(method, {})
        if correct and set(correct) == set(settings.tasks):
            pooled["diff_vs_lora_mlp"] = paired_difference(correct, ref_correct[method], seed=7)
        if other:
            pooled["compare_to"], pooled["diff_vs_compare"] = other, None
            mine, theirs = vs_other.get(method, ({}, {}))
            if mine and set(mine) == set(settings.tasks):
                pooled["diff_vs_compare"] = paired_difference(mine, theirs, seed=7)
        gaps = [(r["accuracy"] - lora_acc[r["task"]]) / (full_acc[r["task"]] - lora_acc[r["task"]])
                for r in rows if full_acc.get(r["task"]) is not None and lora_acc.get(r["task"]) is not None
                and full_acc[r["task"]] - lora_acc[r["task"]] > 1e-9]
        pooled["share_of_lora_to_full_gap"] = statistics.fmean(gaps) if gaps and len(gaps) == len(rows) else None
        out.append(pooled)
    halfwidths = [(r["diff_vs_lora_mlp"]["ci_high"] - r["diff_vs_lora_mlp"]["ci_low"]) / 2 for r in out
                  if r["task"] == "pooled" and r["method"] != REFERENCE and r["diff_vs_lora_mlp"]]
    return {"records": out, "failures": failures,
            "detectable_difference": statistics.median(halfwidths) if halfwidths else None}


def hash_task(task: str) -> int:
    import hashlib

    return int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)


def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _ci(d: dict[str, float] | None) -> str:
    return "—" if not d else f"{_pct(d['mean'], True)} [{_pct(d['ci_low'], True)}, {_pct(d['ci_high'], True)}]"


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    other = next((r["compare_to"] for r in records if r.get("compare_to")), None)
    headers = ["task", "method", "accuracy %", "Δ vs lora-mlp (95% CI), points", "lr", "steps to LoRA's final", "trainable"]
    if other:
        headers.insert(4, f"Δ vs {other} (95% CI)")
    rows = []
    for r in records:
        diff = _ci(r.get("diff_vs_lora_mlp"))
        lr = "—" if r.get("lr") is None else f"{r['lr']:.2g}{' (edge)' if r.get('lr_at_grid_edge') else ''}"
        if r["task"] == "pooled" and r.get("lr_at_grid_edge"):
            lr = "(an edge)"
        acc = _pct(r.get("accuracy"))
        if r.get("accuracy_std") is not None:
            acc += f" ± {100 * r['accuracy_std']:.2f}"
        reach = r.get("steps_to_lora_final")
        gap = r.get("share_of_lora_to_full_gap")
        reach_cell = ("—" if reach is None else f"{reach:g}") if r["task"] != "pooled" else (
            "" if gap is None else f"gap closed {100 * gap:.0f}%")
        row = [r["task"], r["method"], acc, diff, lr, reach_cell, f"{r.get('trainable_params', 0) or 0:,}" if r["task"] != "pooled" else ""]
        if other:
            row.insert(4, _ci(r.get("diff_vs_compare")))
        rows.append(row)
    return headers, rows


def markdown(records: list[dict[str, Any]], settings: SuiteSettings) -> str:
    headers, rows = table_rows(records)
    lines = [f"Suite ({settings.regime} regime, {settings.model}, {settings.steps} steps, {settings.seeds} seeds, "
             f"{settings.test_rows} test rows per task)", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def print_table(records: list[dict[str, Any]], settings: SuiteSettings) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    headers, rows = table_rows(records)
    table = Table(title=f"sparseft suite: {settings.regime} regime, {settings.model}, {settings.steps} steps, "
                        f"{settings.seeds} seeds (Δ = paired difference to lora-mlp, accuracy points)")
    for h in headers:
        table.add_column(Text(h), justify="left" if h in ("task", "method") else "right", overflow="fold")  # a variant in a header is no markup either
    for r in rows:
        table.add_row(*(Text(c) for c in r))  # plain text: a variant's "[...]" is not rich markup
    Console(width=max(170, Console().width)).print(table)


def plot_ci(records: list[dict[str, Any]], settings: SuiteSettings, path: Path) -> list[Path]:
    """Paired difference to LoRA-MLP per method, one panel per task plus the pooled one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [*settings.tasks, "pooled"]
    methods = [m for m in settings.methods if m != REFERENCE]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 0.45 * len(methods) + 1.8), sharey=True)
    axes = [axes] if len(tasks) == 1 else list(axes)
    for ax, task in zip(axes, tasks):
        for i, m in enumerate(methods):
            r = next((r for r in records if r["task"] == task and r["method"] == m), None)
            d = r and r.get("diff_vs_lora_mlp")
            if not d:
                continue
            lo, hi, mean = 100 * d["ci_low"], 100 * d["ci_high"], 100 * d["mean"]
            color = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray"
            ax.errorbar(mean, i, xerr=[[mean - lo], [hi - mean]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(task, fontsize=10)
        ax.set_yticks(range(len(methods)), methods)
    fig.supxlabel("Δ accuracy vs lora-mlp (points)", fontsize=10)  # once: per panel the labels overlap
    fig.suptitle(f"Paired difference to LoRA-MLP, 95% CI — {settings.regime} regime, {settings.model}, "
                 f"{settings.steps} steps, {settings.seeds} seeds", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


__all__ = ["REFERENCE", "SUITE_METHODS", "SuiteSettings", "paired_difference", "run_suite", "summarize"]
