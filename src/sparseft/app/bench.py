"""``sparseft bench``: every method side by side on one model, data set, split, schedule and seeds.

Protocol, per method:

1. **Sweep** (skipped when ``--lr`` is given): each learning rate of the method's grid
   (the task's default rate for the method ÷3, ×1, ×3) trains with the sweep seed and
   is scored on the *validation* split (its first ``sweep_rows`` rows). The best rate there is
   chosen; the test split is never looked at.
2. **Final**: the chosen rate trains once per seed and is scored on the *test* split.

Budgets are matched: the sparse methods (MeProp, SparseGrad, S2FT) get the trainable count of
LoRA at ``rank`` on the same MLP layers, and every record carries its method's actual count.

Each method runs in its own subprocess (``python -m sparseft.app.bench --worker SPEC``), so the peak
RSS of a method is its own; workers stream one JSON record per finished run to the parent,
which shows progress and writes into the output directory:

- ``results.json``: the final (test) runs, one record per run: the results contract
- ``sweep.json``: the sweep (validation) runs
- ``summary.json`` and ``benchmark.md``: one row per method (mean ± std over seeds)
- ``accuracy_vs_params.png`` (metric vs trainable parameters), ``loss_curves.png``
- ``logs/METHOD.log``: each worker's stderr

A run goes through :func:`run_one` with a task name; a :class:`Task` says how to run it, which
metric it reports and whether higher is better. Another task plugs in with :func:`register_task`.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .causal_lm import DEFAULT_LR as CAUSAL_LM_LR
from ..methods import DEFAULT_LR, bench_methods, canonical
from ..serialization import atomic_write_text

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

    from .data import load_table, rotten_tomatoes, split_dataset
    from .train import RunSettings, run_classification

    key = (spec["model_dir"], spec.get("data"), spec.get("text_column"), spec.get("label_column"), spec.get("group_column"))
    if key not in _CACHE:  # a worker runs several rates/seeds on the same data: load it once
        if spec.get("data"):
            ds = load_table(spec["data"], spec.get("text_column", "text"), spec.get("label_column", "label"), spec.get("group_column"))
        else:
            ds = rotten_tomatoes()
        _CACHE[key] = (split_dataset(ds), AutoTokenizer.from_pretrained(spec["model_dir"]))
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
    on a validation part carved from train (10%, fixed), never on the held-out test part."""
    from transformers import AutoTokenizer

    from .causal_lm import CausalLMSettings, load_chat_splits, run_causal_lm

    key = ("causal-lm", spec["model_dir"], spec.get("data"))
    if key not in _CACHE:
        splits = load_chat_splits(spec.get("data"))
        held = set(sample_rows(len(splits["train"]), max(1, len(splits["train"]) // 10), seed=1))
        parts = {
            "train": [c for i, c in enumerate(splits["train"]) if i not in held],
            "validation": [c for i, c in enumerate(splits["train"]) if i in held],
            "test": splits["test"],
        }
        _CACHE[key] = (parts, AutoTokenizer.from_pretrained(spec["model_dir"]))
    parts, tokenizer = _CACHE[key]
    names = CausalLMSettings.__dataclass_fields__
    settings = CausalLMSettings(**{k: v for k, v in spec.items() if k in names})
    settings.eval_examples = spec.get("eval_rows")
    settings.generations = 0 if spec["eval_split"] == "validation" else settings.generations
    return run_causal_lm(settings, {"train": parts["train"], "test": parts[spec["eval_split"]]}, tokenizer)


TASKS: dict[str, Task] = {
    "classification": Task("accuracy", True, _classification, "text classification"),
    # a causal LM has no classifier head: "head" does not apply
    "causal-lm": Task("eval_loss", False, _causal_lm, "instruction tuning, answer-token loss",
                      methods=bench_methods("causal-lm"), default_lr=CAUSAL_LM_LR),
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
    sweep_seed: int = 0
    sweep_rows: int | None = 512  # validation rows scored in the sweep (None: all)
    test_rows: int | None = None  # test rows scored in the final runs (None: all)
    rank: int = 8
    density: float | None = None
    support_narrow: int | None = None
    batch_size: int = 16
    max_length: int = 64
    calibration_steps: int = 20
    threads: int | None = None
    jobs: int = 1  # methods run at once, each in its own process
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.methods is None:
            self.methods = list(TASKS[self.task].methods)

    def rates(self, method: str) -> list[float]:
        if self.lr is not None:
            return [self.lr]
        lr = TASKS[self.task].default_lr[method]
        return [lr / 3, lr, lr * 3] if self.sweep else [lr]

    def base_spec(self, method: str) -> dict[str, Any]:
        keys = ("model_dir", "data", "text_column", "label_column", "group_column", "steps", "rank", "density", "support_narrow",
                "batch_size", "max_length", "calibration_steps")
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


def worker(spec: dict[str, Any]) -> None:
    """Sweep (validation) then final runs (test) of one method, in this process."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    task, base = spec["task"], spec["base"]
    metric, higher = TASKS[task].metric, TASKS[task].higher_is_better
    rates = spec["rates"]
    lr = rates[0]
    if len(rates) > 1:
        scores = []
        for rate in rates:
            rec = _run_safely(task, base | {"lr": rate, "seed": spec["sweep_seed"], "eval_split": "validation", "eval_rows": spec["sweep_rows"]})
            rec |= {"phase": "sweep", "task": task, "eval_rows": spec["sweep_rows"]}
            _emit(rec)
            scores.append(rec[metric])
        valid = [(s, r) for s, r in zip(scores, rates) if math.isfinite(s)]
        if valid:
            lr = (max if higher else min)(valid)[1]
    for seed in spec["seeds"]:
        rec = _run_safely(task, base | {"lr": lr, "seed": seed, "eval_split": "test", "eval_rows": spec["test_rows"]})
        _emit(rec | {"phase": "final", "task": task, "eval_rows": spec["test_rows"], "swept_rates": rates})


# --------------------------------------------------------------------------- parent
def _launch(spec_path: Path, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])  # the sparseft the parent runs, first on the path
    env["PYTHONPATH"] = os.pathsep.join([src] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.Popen(
        [sys.executable, "-m", "sparseft.app.bench", "--worker", str(spec_path)],
        stdout=subprocess.PIPE, stderr=open(log_path, "w"), text=True, env=env,  # noqa: SIM115
    )


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Run every method (one subprocess each, ``settings.jobs`` at a time), write the outputs,
    return the summary."""
    import queue
    import threading

    from tqdm.auto import tqdm

    methods = [canonical(m) for m in settings.methods]
    task = TASKS[settings.task]
    out = Path(settings.output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    per_method = {m: (len(settings.rates(m)) if len(settings.rates(m)) > 1 else 0) + len(settings.seeds) for m in methods}
    bar = tqdm(total=sum(per_method.values()), desc="sparseft bench", unit="run", disable=not settings.show_progress, dynamic_ncols=True)
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}  # per method, in arrival order
    failed: dict[str, str] = {}
    events: queue.Queue = queue.Queue()  # (method, record) per finished run, (method, None) when a worker ends
    t0 = time.perf_counter()

    def start(method: str) -> None:
        spec = {
            "task": settings.task, "base": settings.base_spec(method), "rates": settings.rates(method),
            "sweep_seed": settings.sweep_seed, "sweep_rows": settings.sweep_rows, "seeds": settings.seeds,
            "test_rows": settings.test_rows, "threads": settings.threads,
        }
        spec_path = out / "logs" / f"{method}.spec.json"
        atomic_write_text(spec_path, json.dumps(spec, indent=2))
        proc = _launch(spec_path, out / "logs" / f"{method}.log")

        def pump() -> None:  # one reader thread per worker: the parent never blocks on one pipe
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(RECORD_PREFIX):
                    events.put((method, json.loads(line[len(RECORD_PREFIX):])))
            if proc.wait() != 0:
                failed[method] = f"worker exited with status {proc.returncode}; see {out / 'logs' / (method + '.log')}"
            events.put((method, None))

        threading.Thread(target=pump, daemon=True).start()

    def ordered(phase: str) -> list[dict[str, Any]]:  # method order, whatever order the runs finished in
        return [r for m in methods for r in records[m] if r["phase"] == phase]

    waiting, running = list(methods), 0
    while waiting or running:
        while waiting and running < max(1, settings.jobs):
            start(waiting.pop(0))
            running += 1
        method, rec = events.get()
        if rec is None:
            running -= 1
            if method in failed:
                bar.write(f"{method}: FAILED ({failed[method]})", file=sys.stderr)
                bar.update(per_method[method] - len(records[method]))
            continue
        records[method].append(rec)
        bar.update(1)
        where = "validation" if rec["phase"] == "sweep" else "test"
        bar.write(f"[{time.perf_counter() - t0:6.0f} s] {method:<18} {rec['phase']:<5} lr={rec['lr']:.1e} seed={rec['seed']} "
                  f"{where} {task.metric} {rec[task.metric]:.4f}" + (f"  ({rec.get('wall_s', 0):.0f} s)" if "wall_s" in rec else ""),
                  file=sys.stderr)
        atomic_write_text(out / "results.json", json.dumps(ordered("final"), indent=2))
        atomic_write_text(out / "sweep.json", json.dumps(ordered("sweep"), indent=2))
    bar.close()
    finals = ordered("final")
    summary = summarize(finals, settings.task, methods)
    summary_doc = {"settings": asdict(settings), "failed": failed, "wall_s": time.perf_counter() - t0, "methods": summary}
    atomic_write_text(out / "results.json", json.dumps(finals, indent=2))
    atomic_write_text(out / "sweep.json", json.dumps(ordered("sweep"), indent=2))
    atomic_write_text(out / "summary.json", json.dumps(summary_doc, indent=2))
    atomic_write_text(out / "benchmark.md", markdown_table(summary, settings.task) + "\n")
    plot(finals, summary, settings.task, out)
    return summary_doc


# --------------------------------------------------------------------------- reporting
def summarize(records: list[dict[str, Any]], task: str, methods: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per method: metric mean ± sample std over seeds, cost columns, ratio to full."""
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
            "trainable_params": runs[0]["trainable_params"],
            f"{metric}_mean": statistics.fmean(values),
            f"{metric}_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "state_bytes": max(r["state_bytes"] for r in runs),
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


def _cells(row: dict[str, Any], metric: str) -> list[str]:
    ratio = row["step_time_vs_full"]
    return [
        row["method"],
        f"{row['trainable_params']:,d}",
        f"{row[metric + '_mean']:.4f} ± {row[metric + '_std']:.4f} (n={row['runs']})",
        f"{row['lr']:.1e}",
        f"{row['state_bytes']:,d}",
        f"{row['peak_rss_bytes'] / 2**20:,.0f}",
        f"{row['step_time_s']:.3f}",
        f"{ratio:.2f}×" if ratio is not None else "—",
        f"{row['calibration_s']:.1f}",
    ] + ([f"{row['perplexity_before']:.2f} → {row['perplexity']:.2f}"] if metric == "eval_loss" else [])


def _headers(metric: str) -> list[str]:
    return ["method", "trainable params", f"{metric} (mean ± std)", "lr", "state bytes", "peak RSS MiB", "step s (median)",
            "step vs full", "calibration s"] + (["perplexity before → after"] if metric == "eval_loss" else [])


def markdown_table(summary: list[dict[str, Any]], task: str) -> str:
    metric = TASKS[task].metric
    head = _headers(metric)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(_cells(r, metric)) + " |" for r in summary]
    return "\n".join(lines)


def print_table(summary: list[dict[str, Any]], task: str, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = TASKS[task].metric
    table = Table(title=title)
    for col in _headers(metric):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in summary:
        table.add_row(*_cells(r, metric))
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)
    console.print(table)


def plot(records: list[dict[str, Any]], summary: list[dict[str, Any]], task: str, out: Path) -> list[Path]:
    """``accuracy_vs_params.png`` (metric vs trainable parameters) and ``loss_curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = TASKS[task].metric
    paths = []
    if summary:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in summary:
            ax.errorbar(r["trainable_params"], r[metric + "_mean"], yerr=r[metric + "_std"], fmt="o", capsize=3)
            ax.annotate(r["method"], (r["trainable_params"], r[metric + "_mean"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / f"{metric}_vs_params.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    curves = [r for r in records if r.get("loss_curve")]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(r["method"] for r in curves):
            runs = [r["loss_curve"] for r in curves if r["method"] == method]
            steps = [s for s, _ in runs[0]]
            mean = [statistics.fmean(c[i][1] for c in runs if len(c) > i) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", markersize=3, label=method)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out / "loss_curves.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m sparseft.app.bench --worker SPEC.json (internal; use `sparseft bench`)", file=sys.stderr)
        return 2
    worker(json.loads(Path(argv[1]).read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
