"""``sparseft bench``: every method side by side on one model, data set, split, schedule and seeds.

Protocol (:func:`sweep_and_finals`, per method):

1. **Sweep** (skipped when ``--lr`` is given): each learning rate of the method's grid
   (the task's default rate for the method ÷3, ×1, ×3: ``sweep.SWEEP_FACTORS``) trains with the
   sweep seed and is scored on the *validation* split (a fixed sample of ``sweep_rows`` rows). The
   best rate there is chosen (``sweep.choose_rate``, the suite's rule); while it is the lowest or
   highest rate tried, the grid grows a ×3 step past it, up to ``max_extend`` times. The test
   split is never looked at.
2. **Final**: the chosen rate trains once per seed and is scored on the *test* split.

Budgets are matched: the sparse methods (MeProp, SparseGrad, S2FT) get the trainable count of
LoRA at ``rank`` on the same MLP layers, and every record carries its method's actual count.

The runs go through the shared :class:`~sparseft.app.runner.Runner` (the suite's too): ``--jobs``
worker processes, each run in a fresh one, so a run's peak RSS is its own. Every finished run is
appended to ``records.jsonl`` as it arrives; the output directory gets:

- ``results.json``: the final (test) runs, one record per run: the results contract
- ``sweep.json``: the sweep (validation) runs
- ``summary.json`` and ``benchmark.md``: one row per method (mean ± std over seeds)
- ``accuracy_vs_params.png`` (metric vs trainable parameters), ``loss_curves.png``

A run goes through :func:`run_one` with a task name; a :class:`Task` says how to run it, which
metric it reports and whether higher is better. Another task plugs in with :func:`register_task`.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..methods import DEFAULT_LR, bench_methods, canonical, default_lrs
from ..serialization import atomic_write_text
from .artifacts import read_sealed, sealed_record
from .runner import Runner
from .sweep import SWEEP_FACTORS, choose_rate, rate_at, rate_grid, step_past

RECORD_PREFIX = "@@sparseft-record "


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """How one run of a task is done: ``run(spec) -> record`` (a dict with ``metric`` in it), the
    methods it supports (the default set) and their default learning rates (the sweep's centre)."""

    metric: str
    higher_is_better: bool
    run: Callable[[dict[str, Any]], dict[str, Any]]
    label: str = ""
    methods: tuple[str, ...] = field(default_factory=bench_methods)
    default_lr: Mapping[str, float] = field(default_factory=lambda: DEFAULT_LR)


_CACHE: dict[tuple, Any] = {}


def _classification(spec: dict[str, Any]) -> dict[str, Any]:
    """One text-classification run (:func:`sparseft.app.train.run_classification`)."""
    from transformers import AutoTokenizer

    from .tasks import load_splits
    from .train import RunSettings, run_classification

    key = (spec["model_dir"], spec.get("data"), spec.get("text_column"), spec.get("label_column"), spec.get("group_column"))
    if key not in _CACHE:  # a worker runs several rates/seeds on the same data: load it once
        splits = load_splits(spec.get("data"), spec.get("text_column", "text"), spec.get("label_column", "label"), spec.get("group_column"))
        _CACHE[key] = (splits, AutoTokenizer.from_pretrained(spec["model_dir"]))
    splits, tokenizer = _CACHE[key]
    split, rows = spec["eval_split"], spec.get("eval_rows")
    if rows and rows < len(splits[split]):
        splits = dict(splits, **{split: splits[split].subset(sample_rows(len(splits[split]), rows))})
    names = RunSettings.__dataclass_fields__
    settings = RunSettings(**{k: v for k, v in spec.items() if k in names})
    return run_classification(settings, splits, tokenizer).to_dict()


def sample_rows(n: int, rows: int, seed: int = 0) -> list[int]:
    """A fixed random sample of ``rows`` of ``n`` indices, in order: files are often sorted by
    label, so the first rows would not represent the split."""
    return sorted(random.Random(seed).sample(range(n), rows))


def _causal_lm(spec: dict[str, Any]) -> dict[str, Any]:
    """One instruction-tuning run (:func:`sparseft.app.causal_lm.run_causal_lm`). The sweep is scored
    on a validation part carved from train (:func:`~sparseft.app.causal_lm.carve_validation`),
    never on the held-out test part."""
    from transformers import AutoTokenizer

    from .causal_lm import CausalLMSettings, carve_validation, load_chat_splits, run_causal_lm

    key = ("causal-lm", spec["model_dir"], spec.get("data"))
    if key not in _CACHE:
        parts = carve_validation(load_chat_splits(spec.get("data")))
        _CACHE[key] = (parts, AutoTokenizer.from_pretrained(spec["model_dir"]))
    parts, tokenizer = _CACHE[key]
    names = CausalLMSettings.__dataclass_fields__
    settings = CausalLMSettings(**{k: v for k, v in spec.items() if k in names})
    settings.eval_examples = spec.get("eval_rows")
    settings.generations = 0 if spec["eval_split"] == "validation" else settings.generations
    return run_causal_lm(settings, parts, tokenizer)


TASKS: dict[str, Task] = {
    "classification": Task("accuracy", True, _classification, "text classification"),
    # a causal LM has no classifier head: "head" does not apply
    "causal-lm": Task("eval_loss", False, _causal_lm, "instruction tuning, answer-token loss",
                      methods=bench_methods("causal-lm"), default_lr=default_lrs("causal-lm")),
}


def register_task(name: str, task: Task) -> None:
    """Make ``--task NAME`` run ``task`` (e.g. a causal-LM task reporting ``eval_loss``)."""
    TASKS[name] = task


def run_one(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one training job of ``task`` described by ``spec``; returns its record."""
    return TASKS[task].run(spec)


# --------------------------------------------------------------------------- settings
@dataclass
class BenchSettings:
    model_dir: str
    output_dir: str = "runs/bench"
    task: str = "classification"
    methods: list[str] | None = None  # None: every method the task supports
    data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    group_column: str | None = None
    steps: int = 120
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    lr: float | None = None  # one rate for every method: no sweep
    sweep: bool = True
    max_extend: int = 2  # times a method's lr grid may grow past an end where its best rate sits
    grid: tuple[float, ...] = SWEEP_FACTORS  # factors around each method's default rate
    sweep_seed: int = 0
    sweep_rows: int | None = 512  # validation rows scored in the sweep (None: all)
    test_rows: int | None = None  # test rows scored in the final runs (None: all)
    rank: int = 8
    density: float | None = None
    support_narrow: int | str | None = None
    batch_size: int = 16
    max_length: int = 64
    calibration_steps: int = 20
    threads: int | None = None
    jobs: int = 1  # runs at once, each in a fresh worker process
    show_progress: bool = True
    smoke: bool = False  # --quick: tables and plots say it is a smoke run, not a result
    device: str = "auto"  # app.placement: each run's device and precision
    precision: str = "auto"
    reuse: tuple[str, ...] = ()  # earlier (or cut-off) bench output directories whose finished runs are taken

    def __post_init__(self) -> None:
        if self.methods is None:
            self.methods = list(TASKS[self.task].methods)

    def rates(self, method: str) -> list[float]:
        if self.lr is not None:
            return [self.lr]
        lr = TASKS[self.task].default_lr[method]
        return rate_grid(lr, self.grid) if self.sweep else [lr]

    def base_spec(self, method: str) -> dict[str, Any]:
        keys = ("model_dir", "data", "text_column", "label_column", "group_column", "steps", "rank", "density", "support_narrow",
                "batch_size", "max_length", "calibration_steps", "device", "precision")
        # ~25 points per loss curve whatever the run length
        return {k: getattr(self, k) for k in keys} | {"method": method, "show_progress": False, "loss_every": max(1, self.steps // 25)}


# --------------------------------------------------------------------------- worker (one method)
def _emit(record: dict[str, Any]) -> None:
    print(RECORD_PREFIX + json.dumps(record), flush=True)


def _run_safely(task: str, spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_one(task, spec)
    except FloatingPointError as exc:  # a diverging rate is a sweep result, not a crash
        print(f"diverged: {exc}", file=sys.stderr, flush=True)
        return {"method": spec["method"], "seed": spec["seed"], "lr": spec["lr"], TASKS[task].metric: float("nan"), "error": str(exc)}


def _one(job: dict[str, Any], record: dict[str, Any] | None = None) -> dict[str, Any]:
    """One run of a bench job (or ``record``, the same run taken from an earlier output): its
    record, tagged with the phase (sweep/final), the task and, for a final, the grid it chose from."""
    spec = job["spec"]
    return (record or _run_safely(job["task"], spec)) | {"phase": job["phase"], "task": job["task"], "eval_rows": spec["eval_rows"],
                                              **({"swept_rates": job["rates"], "lr_at_grid_edge": job["lr_at_grid_edge"]} if job["phase"] == "final" else {})}


def sweep_and_finals(plans: dict[str, dict[str, Any]], run: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
                     ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The protocol for every method of ``plans`` ({method: task, base spec, rates, sweep_seed,
    sweep_rows, seeds, test_rows, max_extend}); ``run(jobs)`` trains jobs and returns their records.

    While a method's best validation rate is the lowest or highest tried, its grid grows one ×3
    step past that end (``sweep.step_past``), up to ``max_extend`` times (the suite's rule); a
    rate still at an end then is recorded ``lr_at_grid_edge``. Returns the sweep's records in
    method and rate order, then the finals' in method and seed order."""
    grids = {m: sorted(p["rates"]) for m, p in plans.items()}
    centres = {m: p["rates"][len(p["rates"]) // 2] for m, p in plans.items()}
    swept: dict[str, list[dict[str, Any]]] = {m: [] for m in plans}
    todo = {m: grids[m] for m in plans if len(grids[m]) > 1}
    for round_ in range(max((p.get("max_extend", 0) for p in plans.values()), default=0) + 1):
        jobs = [{"task": plans[m]["task"], "phase": "sweep", "round": round_,
                 "spec": plans[m]["base"] | {"method": m, "lr": rate, "seed": plans[m]["sweep_seed"], "eval_split": "validation",
                                             "eval_rows": plans[m]["sweep_rows"]}}
                for m, rates in todo.items() for rate in rates]
        for r in run(jobs):
            swept[r["method"]].append(r)
        todo = {}
        for m in plans:
            edge = _choice(swept[m], plans[m], centres[m])[1]
            if edge and round_ < plans[m].get("max_extend", 0):
                todo[m] = [rate_at(step_past(grids[m], edge), 1.0)]
                grids[m] = sorted([*grids[m], *todo[m]])
        if not todo:
            break
    sweep, chosen = [], {}
    for m, p in plans.items():
        sweep += sorted(swept[m], key=lambda r: r["lr"])
        best, edge = _choice(swept[m], p, centres[m])
        chosen[m] = (best or p["rates"][0], edge)
    final_jobs = [{"task": p["task"], "phase": "final", "rates": grids[m], "lr_at_grid_edge": chosen[m][1] is not None,
                   "spec": p["base"] | {"method": m, "lr": chosen[m][0], "seed": seed, "eval_split": "test", "eval_rows": p["test_rows"]}}
                  for m, p in plans.items() for seed in p["seeds"]]
    finals = run(final_jobs)
    order = {(m, seed): i for i, (m, seed) in enumerate((m, seed) for m, p in plans.items() for seed in p["seeds"])}
    return sweep, sorted(finals, key=lambda r: order.get((r["method"], r["seed"]), len(order)))


def _choice(records: list[dict[str, Any]], plan: dict[str, Any], centre: float) -> tuple[float | None, str | None]:
    """(the best rate of a method's sweep records, the end of its grid it sits at); (None, None)
    without a sweep."""
    if not records:
        return None, None
    task = TASKS[plan["task"]]
    return choose_rate({r["lr"]: r.get(task.metric, float("nan")) for r in records}, centre, task.higher_is_better)


def worker(spec: dict[str, Any]) -> None:
    """One method's sweep then final runs, in this process, each record printed as it finishes
    (``RECORD_PREFIX`` lines): ``python -m sparseft.app.bench --worker SPEC.json`` to look at one
    method alone."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])

    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for job in jobs:
            out.append(_one(job))
            _emit(out[-1])
        return out

    sweep_and_finals({spec["base"]["method"]: spec}, run)


# --------------------------------------------------------------------------- reuse
# Settings that change what a run computes: runs of two bench outputs with equal keys and equal
# (method, lr, seed, phase) are the same run (training is deterministic), so --reuse takes them.
RUN_KEY_FIELDS = ("task", "model_dir", "data", "text_column", "label_column", "group_column", "steps", "sweep_seed", "sweep_rows",
                  "test_rows", "rank", "density", "support_narrow", "batch_size", "max_length", "calibration_steps", "precision")
SETTINGS_FILE = "bench_settings.json"


def run_key(settings: BenchSettings) -> dict[str, Any]:
    return {k: getattr(settings, k) for k in RUN_KEY_FIELDS}


def _key(job_or_record: dict[str, Any]) -> tuple:
    r = job_or_record.get("spec", job_or_record)
    return r["method"], float(r["lr"]), int(r["seed"]), job_or_record["phase"]


def reusable_runs(settings: BenchSettings, directory: str | Path) -> dict[tuple, dict[str, Any]]:
    """The finished runs of ``directory`` (an earlier or cut-off bench output) that this bench may
    take as they are: made with the same run settings, no error. Other settings are an error that
    names them, never a silent mix."""
    d = Path(directory)
    if not (d / "records.jsonl").is_file() or not (d / SETTINGS_FILE).is_file():
        raise ConfigError(f"--reuse {d}: no records.jsonl and {SETTINGS_FILE} there; give the output directory of an "
                          "earlier `sparseft bench` run.")
    theirs = json.loads((d / SETTINGS_FILE).read_text(encoding="utf-8"))
    differ = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in run_key(settings).items() if theirs.get(k) != v]
    if differ:
        raise ConfigError(f"--reuse {d}: its runs were made with other settings ({'; '.join(differ)}); "
                          "run with the same settings or without --reuse.")
    records, damaged = read_sealed(d / "records.jsonl")
    if damaged:
        print(f"--reuse {d}: {damaged} record(s) fail their checksum (changed after the run); they are trained again.",
              file=sys.stderr)
    metric = TASKS[settings.task].metric
    return {_key(r): r for r in records if "error" not in r and metric in r and "phase" in r}


# --------------------------------------------------------------------------- parent
def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every method's protocol through the shared runner (``settings.jobs`` processes), write
    the outputs, return the summary."""
    methods = [canonical(m) for m in settings.methods]
    task = TASKS[settings.task]
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = {m: {"task": settings.task, "base": settings.base_spec(m), "rates": settings.rates(m), "sweep_seed": settings.sweep_seed,
                 "sweep_rows": settings.sweep_rows, "seeds": settings.seeds, "test_rows": settings.test_rows,
                 "max_extend": settings.max_extend} for m in methods}
    total = sum((len(p["rates"]) if len(p["rates"]) > 1 else 0) + len(p["seeds"]) for p in plans.values())

    def describe(rec: dict[str, Any]) -> str:
        where = "validation" if rec.get("phase") == "sweep" else "test"
        score = f"error: {rec['error']}" if task.metric not in rec else f"{where} {task.metric} {rec[task.metric]:.4f}"
        return f"{rec.get('method', '?'):<18} {rec.get('phase', '?'):<5} lr={rec.get('lr', float('nan')):.1e} seed={rec.get('seed')} {score}" + \
            (f" ({rec['wall_s']:.0f} s)" if "wall_s" in rec else "")

    reused: dict[tuple, dict[str, Any]] = {}
    for directory in settings.reuse:
        reused.update(reusable_runs(settings, directory))
    if settings.reuse:
        print(f"--reuse: {len(reused)} finished run(s) taken from {', '.join(map(str, settings.reuse))}", file=sys.stderr)
    atomic_write_text(out / SETTINGS_FILE, json.dumps(run_key(settings), indent=2))
    atomic_write_text(out / "records.jsonl", "".join(json.dumps(sealed_record(r)) + "\n" for r in reused.values()))
    runner = Runner(jobs=settings.jobs, threads=settings.threads or 1, log=out / "records.jsonl", describe=describe, label="bench",
                    total=total, show_progress=settings.show_progress, fresh_processes=True)
    t0 = time.perf_counter()
    try:
        def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            runner.total += sum(j.get("round", 0) > 0 for j in jobs)  # a grown grid's rates were not in the count
            kept = [_one(job, reused[_key(job)]) for job in jobs if _key(job) in reused]
            runner.done += len(kept)
            return kept + runner.run(_one, [job for job in jobs if _key(job) not in reused])

        sweep, finals = sweep_and_finals(plans, run)
    finally:
        runner.close()
    # a run that raised (no metric at all); a diverged rate is a sweep result (its metric is NaN)
    failed = {r["method"]: r["error"] for r in sweep + finals if "error" in r and task.metric not in r}
    summary = summarize(finals, settings.task, methods)
    summary_doc = {"settings": asdict(settings), "failed": failed, "wall_s": time.perf_counter() - t0, "methods": summary}
    atomic_write_text(out / "results.json", json.dumps(finals, indent=2))
    atomic_write_text(out / "sweep.json", json.dumps(sweep, indent=2))
    atomic_write_text(out / "summary.json", json.dumps(summary_doc, indent=2))
    atomic_write_text(out / "benchmark.md", markdown_table(summary, settings.task, settings.smoke) + "\n")
    plot(finals, summary, settings.task, out, title=plot_title(settings))
    return summary_doc


# --------------------------------------------------------------------------- reporting
def summarize(records: list[dict[str, Any]], task: str, methods: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per method: metric mean ± sample std over seeds, cost columns, ratio to full."""
    from .tables import state_with_bases_bytes

    metric = TASKS[task].metric
    order = methods or list(dict.fromkeys(r["method"] for r in records))
    rows = []
    for method in order:
        runs = [r for r in records if r["method"] == method and math.isfinite(r.get(metric, float("nan"))) and "error" not in r]
        if not runs:
            continue
        values = [r[metric] for r in runs]
        rows.append({
            "method": method,
            "runs": len(runs),
            "lr": runs[0]["lr"],
            "lr_at_grid_edge": any(r.get("lr_at_grid_edge", False) for r in runs),
            "trainable_params": runs[0]["trainable_params"],
            f"{metric}_mean": statistics.fmean(values),
            f"{metric}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "state_bytes": max(r["state_bytes"] for r in runs),
            # what the method holds to train: the state above plus SparseGrad's bases and support index
            "state_with_bases_bytes": max(state_with_bases_bytes(r) for r in runs),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
            "step_time_s": statistics.median(r["step_time_s"] for r in runs),
            "calibration_s": statistics.fmean(r.get("calibration_s", 0.0) for r in runs),
        })
        if all("perplexity" in r for r in runs):  # causal LM: perplexity before → after
            rows[-1]["perplexity_before"] = statistics.fmean(r["perplexity_before"] for r in runs)
            rows[-1]["perplexity"] = statistics.fmean(r["perplexity"] for r in runs)
    full = next((r["step_time_s"] for r in rows if r["method"] == "full"), None)
    for r in rows:
        r["step_time_vs_full"] = r["step_time_s"] / full if full else None
    return rows


SMOKE_NOTE = "smoke run"
EDGE_NOTE = ("lr (edge): the best validation rate was still the lowest or highest of the grid after it grew "
             "(--max-extend): the method may do better past it.")


def _runs(summary: list[dict[str, Any]]) -> int | None:
    """The number of runs per method when every method has the same (None when they differ)."""
    counts = {r["runs"] for r in summary}
    return counts.pop() if len(counts) == 1 else None


def _metric_cell(row: dict[str, Any], metric: str, smoke: bool = False, runs: int | None = None) -> str:
    """mean ± std over seeds. One run shows no spread (there is none); a ``--quick`` run is
    marked a smoke run, not a result; n is in the header when every method has the same."""
    mean, n = f"{row[metric + '_mean']:.4f}", row["runs"]
    value = mean if n < 2 or smoke else f"{mean} ± {row[metric + '_std']:.4f}"
    return value if runs is not None else f"{value} (n={n})"


def _cells(row: dict[str, Any], metric: str, smoke: bool = False, runs: int | None = None) -> list[str]:
    from .tables import mib, rate

    ratio = row["step_time_vs_full"]
    return [
        row["method"],
        f"{row['trainable_params']:,d}",
        _metric_cell(row, metric, smoke, runs),
        rate(row["lr"]) + (" (edge)" if row.get("lr_at_grid_edge") else ""),
        mib(row.get("state_with_bases_bytes", row["state_bytes"])),
        mib(row["peak_rss_bytes"], 0),
        f"{row['step_time_s']:.3f}",
        f"{ratio:.2f}×" if ratio is not None else "—",
        f"{row['calibration_s']:.1f}",
    ] + ([f"{row['perplexity_before']:.2f} → {row['perplexity']:.2f}"] if metric == "eval_loss" else [])


def _headers(metric: str, smoke: bool = False, runs: int | None = None) -> list[str]:
    if smoke:
        value = f"{metric} ({SMOKE_NOTE}" + (f", n={runs})" if runs is not None else ")")
    elif runs is None:
        value = f"{metric} mean ± std"
    else:
        value = f"{metric} mean ± std (n={runs})" if runs > 1 else f"{metric} (n=1)"
    return ["method", "trainable params", value, "lr", "state MiB", "peak RSS MiB", "step s (median)", "step vs full",
            "calib s"] + (["perplexity before → after"] if metric == "eval_loss" else [])


def _table_parts(summary: list[dict[str, Any]], task: str, smoke: bool) -> tuple[list[str], list[list[str]]]:
    metric, runs = TASKS[task].metric, _runs(summary)
    return _headers(metric, smoke, runs), [_cells(r, metric, smoke, runs) for r in summary]


def markdown_table(summary: list[dict[str, Any]], task: str, smoke: bool = False) -> str:
    """The table of ``benchmark.md``, with the note on what state MiB counts (and a smoke run's warning)."""
    from .tables import STATE_NOTE

    head, rows = _table_parts(summary, task, smoke)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    notes = [STATE_NOTE + "."]
    if any(r.get("lr_at_grid_edge") for r in summary):
        notes.append(EDGE_NOTE)
    if smoke:
        notes.insert(0, "**Smoke run** (`--quick`: a few steps, one seed, no sweep, a sample of the test rows): it checks "
                     "that every method runs; its numbers are not results.")
    return "\n".join(lines + [""] + notes)


def table_title(title: str, smoke: bool) -> str:
    return f"SMOKE RUN (--quick), not a result: {title}" if smoke else title


def print_table(summary: list[dict[str, Any]], task: str, title: str, smoke: bool = False) -> None:
    """The table ``sparseft bench`` prints (readable at 80 columns)."""
    from .tables import STATE_NOTE, show_table

    head, rows = _table_parts(summary, task, smoke)
    show_table(table_title(title, smoke), head, rows, caption=STATE_NOTE)


def render_table(summary: list[dict[str, Any]], task: str, title: str, smoke: bool = False, width: int = 80) -> str:
    """:func:`print_table`'s table as text at ``width`` columns."""
    from .tables import STATE_NOTE, render_table as render

    head, rows = _table_parts(summary, task, smoke)
    return render(table_title(title, smoke), head, rows, caption=STATE_NOTE, width=width)


def plot_title(settings: BenchSettings) -> str:
    """What a plot shows, in its title: task, data, model, schedule, seeds (and a smoke run's warning)."""
    from .resources import model_label

    task = TASKS[settings.task]
    data = Path(settings.data).name if settings.data else {"classification": "Rotten Tomatoes",
                                                          "causal-lm": "chatterbot-corpus"}.get(settings.task, "default data")
    seeds = ", ".join(str(s) for s in settings.seeds)
    head = f"sparseft bench: {task.label or settings.task} on {data}" + (" (SMOKE RUN, not a result)" if settings.smoke else "")
    return f"{head}\n{model_label(settings.model_dir)}, {settings.steps} steps, seed{'s' if len(settings.seeds) > 1 else ''} {seeds}, rank-{settings.rank} budgets"


# marker per method (colours from the default cycle): points at equal x stay distinguishable
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def _dodge(xs: list[float], width: float = 0.06) -> list[float]:
    """Points whose parameter counts lie close on the log axis (the budget-matched methods) are
    drawn side by side, ``width`` decades apart and centred on their counts, so their markers and
    error bars do not overlap. Clusters whose spreads would touch merge. Order within a cluster:
    by count, then as given."""
    logs = [math.log10(max(x, 1.0)) for x in xs]
    clusters = [[i] for i in sorted(range(len(xs)), key=lambda i: (logs[i], i))]

    def span(members: list[int]) -> tuple[float, float]:
        centre, half = statistics.fmean(logs[i] for i in members), width * len(members) / 2
        return centre - half, centre + half

    merged = True
    while merged:
        merged = False
        for c in range(len(clusters) - 1):
            if span(clusters[c])[1] > span(clusters[c + 1])[0]:
                clusters[c : c + 2] = [clusters[c] + clusters[c + 1]]
                merged = True
                break
    out = list(xs)
    for members in clusters:
        centre = statistics.fmean(logs[i] for i in members)
        for j, i in enumerate(members):
            out[i] = 10 ** (centre + width * (j - (len(members) - 1) / 2))
    return out


def plot(records: list[dict[str, Any]], summary: list[dict[str, Any]], task: str, out: Path, title: str = "") -> list[Path]:
    """Write :func:`figures` as PNGs into ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    paths = []
    for name, fig in figures(records, summary, task, title).items():
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def figures(records: list[dict[str, Any]], summary: list[dict[str, Any]], task: str, title: str = "") -> dict[str, Any]:
    """``{metric}_vs_params.png`` (metric vs trainable parameters) and ``loss_curves.png`` as
    matplotlib figures, each titled with ``title``. Methods are named in a legend beside the axes
    (never as labels on the points, which collide where methods share a budget); step ticks are
    whole numbers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric = TASKS[task].metric
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {m: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)])
             for i, m in enumerate(dict.fromkeys([r["method"] for r in summary] + [r["method"] for r in records]))}
    figs: dict[str, Any] = {}
    if summary:
        fig, ax = plt.subplots(figsize=(9, 4.8))
        xs = _dodge([float(r["trainable_params"]) for r in summary])
        for r, x in zip(summary, xs):
            colour, marker = style[r["method"]]
            ax.errorbar(x, r[metric + "_mean"], yerr=r[metric + "_std"] if r["runs"] > 1 else None, fmt=marker,
                        color=colour, capsize=3, markersize=7, label=f"{r['method']} ({r['trainable_params']:,d})")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale; methods with about the same count drawn side by side)")
        ax.set_ylabel(f"test {metric}" + (" (mean ± std over seeds)" if any(r["runs"] > 1 for r in summary) else ""))
        ax.grid(alpha=0.3)
        ax.legend(title="method (trainable)", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0.0)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        figs[f"{metric}_vs_params.png"] = fig
    curves = [r for r in records if r.get("loss_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(9, 4.8))
        for method in dict.fromkeys(r["method"] for r in curves):
            runs = [r["loss_curve"] for r in curves if r["method"] == method]
            steps = [s for s, _ in runs[0]]
            mean = [statistics.fmean(c[i][1] for c in runs if len(c) > i) for i in range(len(steps))]
            colour, marker = style[method]
            ax.plot(steps, mean, marker=marker, markersize=3, color=colour, label=method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        several = any(sum(r["method"] == m for r in curves) > 1 for m in dict.fromkeys(r["method"] for r in curves))
        ax.set_ylabel("training loss" + (" (mean over seeds)" if several else ""))
        ax.legend(title="method", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        figs["loss_curves.png"] = fig
    return figs


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m sparseft.app.bench --worker SPEC.json (internal; use `sparseft bench`)", file=sys.stderr)
        return 2
    worker(json.loads(Path(argv[1]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
