"""The ``sparseft`` command line: ``sparseft train`` (and more jobs as sub-commands)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import SparseFTError
from .serialization import atomic_write_text


def _seeds(text: str) -> list[int]:
    """'3' → [0, 1, 2]; '0,5,7' → [0, 5, 7]."""
    try:
        parts = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--seeds takes a count (3) or a comma list (0,1,2), got {text!r}") from exc
    if len(parts) == 1 and "," not in text:
        if parts[0] < 1:
            raise argparse.ArgumentTypeError("--seeds count must be at least 1")
        return list(range(parts[0]))
    return parts


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face checkpoint directory (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--data", help="CSV/TSV/JSONL file (optionally .gz/.bz2); default: embedded Rotten Tomatoes")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--group-column", help="rows sharing this column's value stay on one side of the split")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400)")
    p.add_argument("--seeds", type=_seeds, default=[0], help="a count (3 → seeds 0,1,2) or a list (0,5,7)")
    p.add_argument("--rank", type=int, default=8, help="sparse budgets match LoRA at this rank: k = r·(m+n) per layer")
    p.add_argument("--density", type=float, help="sparse budget as a fraction of each layer instead of --rank")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--calibration-steps", type=int, default=20)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _load_splits(args: argparse.Namespace):
    from .data import load_table, rotten_tomatoes, split_dataset

    if args.data:
        ds = load_table(args.data, args.text_column, args.label_column, args.group_column)
    else:
        ds = rotten_tomatoes()
    return split_dataset(ds)


def _model_dir(args: argparse.Namespace) -> str:
    from .resources import default_model_dir

    path = Path(args.model) if args.model else default_model_dir()
    if not (path / "config.json").is_file():
        raise SparseFTError(f"--model {path} is not a Hugging Face checkpoint directory (no config.json).")
    return str(path)


def _table(records: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("method", "seed", "lr", "accuracy", "trainable", "state MB", "peak RSS MB", "step s", "calib s", "wall s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in records:
        table.add_row(
            r["method"],
            str(r["seed"]),
            f"{r['lr']:.1e}",
            f"{r['accuracy']:.4f}",
            f"{r['trainable_params']:,d}",
            f"{r['state_bytes'] / 2**20:.2f}",
            f"{r['peak_rss_bytes'] / 2**20:.0f}",
            f"{r['step_time_s']:.3f}",
            f"{r['calibration_s']:.1f}",
            f"{r['wall_s']:.1f}",
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(table)


def cmd_train(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .methods import canonical
    from .train import RunSettings, run_classification

    model_dir = _model_dir(args)
    splits = _load_splits(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(args.output_dir)
    records: list[dict[str, Any]] = []
    print(
        f"train {len(splits['train'])} / validation {len(splits['validation'])} / test {len(splits['test'])} rows, "
        f"labels {splits['train'].label_names}, model {model_dir}",
        file=sys.stderr,
    )
    for seed in args.seeds:
        settings = RunSettings(
            model_dir=model_dir,
            method=canonical(args.method),
            lr=args.lr,
            steps=args.steps,
            seed=seed,
            batch_size=args.batch_size,
            max_length=args.max_length,
            rank=args.rank,
            density=args.density,
            calibration_steps=args.calibration_steps,
            show_progress=not args.no_progress,
        )
        result = run_classification(settings, splits, tokenizer)
        records.append(result.to_dict())
        atomic_write_text(out / "results.json", json.dumps(records, indent=2))
    _table(records, f"sparseft train: {records[0]['method']} on {'embedded Rotten Tomatoes' if not args.data else args.data}")
    for r in records:
        print(f"{r['method']} seed {r['seed']}: accuracy {r['accuracy']:.4f} ({r['eval_split']}), "
              f"trainable params {r['trainable_params']:,d}, wall {r['wall_s']:.1f} s")
    print(f"results: {out / 'results.json'}")
    return 0


# `sparseft bench` defaults, sized for a 2-core CPU machine: 8 methods × (3 sweep runs scored on
# 512 validation rows + 3 seed runs scored on the whole test split), 80 steps each, one torch
# thread per worker. --quick is a smoke test of every method (a few steps, no sweep, 1 seed).
BENCH_DEFAULTS = {"steps": 80, "seeds": [0, 1, 2], "calibration_steps": 20, "sweep_rows": 512}
QUICK = {"steps": 4, "seeds": [0], "calibration_steps": 3, "test_rows": 200, "sweep": False}


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import TASKS, BenchSettings, print_table, run_bench
    from .methods import canonical

    model_dir = _model_dir(args)
    splits = _load_splits(args)  # fail fast on a bad --data, and say what the split is
    methods = [canonical(m.strip()) for m in args.methods.split(",") if m.strip()] if args.methods else None
    explicit = {a for a in ("steps", "seeds", "calibration_steps") if getattr(args, a) is not None}
    chosen = dict(BENCH_DEFAULTS, **(QUICK if args.quick else {}))
    chosen.update({a: getattr(args, a) for a in explicit})
    settings = BenchSettings(
        model_dir=model_dir,
        output_dir=args.output_dir,
        task=args.task,
        data=args.data,
        text_column=args.text_column,
        label_column=args.label_column,
        group_column=args.group_column,
        steps=chosen["steps"],
        seeds=chosen["seeds"],
        lr=args.lr,
        sweep=chosen.get("sweep", True) and not args.no_sweep,
        sweep_rows=args.sweep_rows if args.sweep_rows is not None else chosen["sweep_rows"],
        test_rows=args.test_rows if args.test_rows is not None else chosen.get("test_rows"),
        rank=args.rank,
        density=args.density,
        batch_size=args.batch_size,
        max_length=args.max_length,
        calibration_steps=chosen["calibration_steps"],
        threads=args.threads or 1,  # one thread per worker: stable timings on a shared machine
        show_progress=not args.no_progress,
    )
    if methods:
        settings.methods = methods
    if settings.lr is not None:
        rates = f"lr {settings.lr:g}"
    elif settings.sweep:
        rates = f"lr sweep on {settings.sweep_rows or 'all'} validation rows"
    else:
        rates = "default lr"
    print(
        f"bench: {len(settings.methods)} methods, {settings.steps} steps, seeds {settings.seeds}, {rates}; "
        f"train {len(splits['train'])} / validation {len(splits['validation'])} / test {len(splits['test'])} rows, model {model_dir}",
        file=sys.stderr,
    )
    doc = run_bench(settings)
    task = TASKS[settings.task]
    print_table(doc["methods"], settings.task, f"sparseft bench ({task.label or settings.task}): test {task.metric}, "
                f"{settings.steps} steps, rank-{settings.rank} budgets, seeds {settings.seeds}")
    out = Path(settings.output_dir)
    for method, why in doc["failed"].items():
        print(f"{method}: {why}", file=sys.stderr)
    print(f"results: {out / 'results.json'} (test runs), {out / 'sweep.json'} (validation sweep), "
          f"{out / 'benchmark.md'}, plots in {out}; wall {doc['wall_s']:.0f} s")
    return 1 if doc["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparseft", description="Sparse fine-tuning of transformer MLP layers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a classifier with one method and report held-out accuracy")
    _add_common(train)
    train.add_argument("--method", default="sparsegrad", help="full, head, lora-mlp, lora-attn, meprop, sparsegrad[-fixed|-dynamic], s2ft")
    train.add_argument("--lr", type=float, help="learning rate (default: the method's default)")
    train.add_argument("--output-dir", default="runs/train", help="writes DIR/results.json")
    train.set_defaults(func=cmd_train)

    from .bench import TASKS

    bench = sub.add_parser("bench", help="every method side by side: LR sweep on validation, seeds on test, table + plots")
    _add_common(bench)
    # None = the bench defaults (BENCH_DEFAULTS, or QUICK with --quick)
    bench.set_defaults(steps=None, seeds=None, calibration_steps=None)
    what = {"steps": "optimizer steps per run", "seeds": "final-run seeds: a count (3 → 0,1,2) or a list (0,5,7)",
            "calibration_steps": "calibration steps (SparseGrad)"}
    for action in bench._actions:
        if action.dest in what:
            action.help = f"{what[action.dest]} (bench default {BENCH_DEFAULTS[action.dest]}, --quick {QUICK[action.dest]})"
    bench.add_argument("--methods", help="comma list (default: all 8): full,head,lora-mlp,lora-attn,meprop,sparsegrad-fixed,sparsegrad-dynamic,s2ft")
    bench.add_argument("--lr", type=float, help="one learning rate for every method (skips the sweep)")
    bench.add_argument("--no-sweep", action="store_true", help="use each method's default learning rate, no sweep")
    bench.add_argument("--sweep-rows", type=int, help=f"validation rows scored in the sweep (default {BENCH_DEFAULTS['sweep_rows']}; 0 = all)")
    bench.add_argument("--test-rows", type=int, help="test rows scored in the final runs (default: all)")
    bench.add_argument("--quick", action="store_true", help="smoke run: every method, 4 steps, 1 seed, no sweep, 200 test rows")
    bench.add_argument("--task", default="classification", choices=sorted(TASKS), help="default %(default)s")
    bench.add_argument("--output-dir", default="runs/bench", help="writes DIR/results.json, sweep.json, summary.json, benchmark.md, PNGs")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except SparseFTError as exc:
        print(f"sparseft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
