"""The ``sparseft`` command line: ``sparseft train`` (and more jobs as sub-commands)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import SparseFTError
from ..methods import DEFAULT_METHOD, METHODS, bench_methods
from .outputs import check_folders, claimed
from .provenance import run_metadata
from .placement import DEVICE_HELP, PRECISIONS
from .threads import RULE as THREADS_RULE

# argument parsing loads no torch: `sparseft --help` and bad arguments answer at once; the kinds
# `train` and `bench` run (bench.TASKS holds how each runs, tests/test_bench.py keeps the two equal)
TASK_KINDS = ("causal-lm", "classification")


def atomic_write_text(path: Path, text: str) -> None:
    from ..serialization import atomic_write_text as write

    write(path, text)


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


def _grid(text: str) -> tuple[float, ...]:
    """--grid: positive factors, e.g. "0.333,1,3"."""
    from ..errors import ConfigError

    try:
        factors = tuple(sorted(float(f) for f in text.split(",") if f.strip()))
    except ValueError as exc:
        raise ConfigError(f"--grid {text!r}: give positive numbers separated by commas, e.g. 0.333,1,3.") from exc
    if not factors or min(factors) <= 0:
        raise ConfigError(f"--grid {text!r}: give positive numbers separated by commas, e.g. 0.333,1,3.")
    return factors


def _narrow(text: str) -> int | str:
    """--support-narrow: a positive whole number or "auto"."""
    return "auto" if text.strip().lower() == "auto" else _positive(int)(text)


def _positive(kind: type):
    """argparse type: a number > 0 (a clear usage error instead of a failure deep in the run)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from exc
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0 and finite, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local Hugging Face checkpoint directory (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--data", help="CSV/TSV/JSONL file (optionally .gz/.bz2), or a suite task by name (rotten_tomatoes, sarcasm, "
                   "trec, newsgroups: its fixed splits); default: embedded Rotten Tomatoes")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--group-column", help="rows sharing this column's value stay on one side of the split")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per run (default 400; 0: evaluate the untrained model)")
    p.add_argument("--seeds", type=_seeds, default=[0], help="a count (3 → seeds 0,1,2) or a list (0,5,7)")
    p.add_argument("--rank", type=_positive(int), default=8, help="sparse budgets match LoRA at this rank: k = r·(m+n) per layer")
    p.add_argument("--density", type=float, help="sparse budget as a fraction of each layer instead of --rank")
    p.add_argument("--support-narrow", type=_narrow, metavar="L", help="SparseGrad: keep each layer's support in the "
                   "leading L directions of its narrow side, or 'auto' for the largest L whose gradient costs ≤10%% of "
                   "the frozen layer's (faster; docs/performance.md has what it costs)")
    p.add_argument("--batch-size", type=_positive(int), default=16)
    p.add_argument("--max-length", type=_positive(int), default=64)
    p.add_argument("--calibration-steps", type=_positive(int), default=20)
    p.add_argument("--reselect-every", type=_positive(int), help="fixed-selection SparseGrad: re-choose 10%% of the support every N steps")
    p.add_argument("--quantize", choices=("4bit", "8bit"), help="load the base model's linear layers quantized with "
                   "bitsandbytes (4bit: NF4, as QLoRA; 8bit: LLM.int8) to fit a smaller GPU; the sparse/LoRA update "
                   'trains beside them in float32 (pip install "sparseft[quant]")')
    p.add_argument("--threads", type=_positive(int), help=f"torch CPU threads (default: {THREADS_RULE}, "
                   "or OMP_NUM_THREADS; calibration's float64 eigh always runs on one thread)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_placement(p)


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"where to run: {DEVICE_HELP} (default auto)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="fp32, or bf16/fp16 autocast (weights and trained "
                   "values stay float32); auto: bf16 on a GPU that has it, else fp32")


def _placement(args: argparse.Namespace):
    """The resolved --device/--precision, printed once at the start of a job."""
    from .placement import resolve

    placement = resolve(args.device, args.precision)
    print(f"device: {placement.describe()}", file=sys.stderr)
    return placement


def _load_splits(args: argparse.Namespace):
    from .tasks import load_splits

    return load_splits(args.data, args.text_column, args.label_column, args.group_column)


def _data_source(args: argparse.Namespace) -> dict[str, Any]:
    """--data (and a table's columns), as the run file records them (predict splits the same way)."""
    data = args.data if not args.data or not Path(args.data).is_file() else str(Path(args.data).resolve())
    if getattr(args, "task", "classification") == "causal-lm":
        return {"path": data}
    return {"path": data, "text_column": args.text_column, "label_column": args.label_column, "group_column": args.group_column}


def _model_dir(args: argparse.Namespace) -> str:
    from .resources import default_model_dir

    path = Path(args.model) if args.model else default_model_dir()
    if not (path / "config.json").is_file():
        raise SparseFTError(f"--model {path} is not a Hugging Face checkpoint directory (no config.json).")
    return str(path.resolve())  # (the run file records it: predict may run from another folder)


def _table(records: list[dict[str, Any]], title: str) -> None:
    from .tables import STATE_NOTE, mib, rate, show_table, state_with_bases_bytes

    headers = ("method", "seed", "lr", "accuracy", "trainable", "state MiB", "peak RSS MiB", "step s", "calib s", "wall s")
    rows = [
        (r["method"], str(r["seed"]), rate(r["lr"]), f"{r['accuracy']:.4f}", f"{r['trainable_params']:,d}",
         mib(state_with_bases_bytes(r)), mib(r["peak_rss_bytes"], 0), f"{r['step_time_s']:.3f}",
         f"{r['calibration_s']:.1f}", f"{r['wall_s']:.1f}")
        for r in records
    ]
    show_table(title, headers, rows, caption=STATE_NOTE)


# `sparseft train`'s defaults by task (RunSettings / CausalLMSettings default the same; a test pins it).
# causal-lm: 100 steps of batch 16 (about one epoch of chatterbot) scored best on validation; 400 memorised
# it (held-out loss worse than untrained; docs/llm.md, benchmarks/causal_lm_steps.py).
TRAIN_DEFAULTS = {"classification": {"steps": 400, "max_length": 64}, "causal-lm": {"steps": 100, "max_length": 128}}


def _run_options(args: argparse.Namespace, model_dir: str, seed: int, placement: Any) -> dict[str, Any]:
    """The settings every `sparseft train` run takes from the command line, whatever the task:
    what it trains, and where it keeps checkpoints and what it trained (OUTPUT_DIR/<part>/seed-S)."""
    from ..methods import canonical

    default = TRAIN_DEFAULTS[getattr(args, "task", "classification")]
    out = Path(args.output_dir)
    return {
        "model_dir": model_dir, "method": canonical(args.method), "lr": args.lr, "seed": seed,
        "steps": default["steps"] if args.steps is None else args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length or default["max_length"], "rank": args.rank,
        "density": args.density, "support_narrow": args.support_narrow, "calibration_steps": args.calibration_steps,
        "show_progress": not args.no_progress, "device": placement.device, "precision": placement.precision,
        "quantize": args.quantize, "reselect_every": args.reselect_every,
        "checkpoint_dir": str(out / "checkpoints" / f"seed-{seed}") if args.checkpoint_every else None,
        "checkpoint_every": args.checkpoint_every or 0,
        "resume_dir": str(Path(args.resume) / "checkpoints" / f"seed-{seed}") if args.resume else None,
        "save_dir": None if args.no_save else str(out / "adapters" / f"seed-{seed}"),
        "save_merged_dir": str(out / "merged" / f"seed-{seed}") if args.save_merged else None,
        "merged_dtype": args.merged_dtype,
        "data": _data_source(args),
    }


def _check_train_folders(args: argparse.Namespace) -> None:
    """Every folder `sparseft train` will write, checked before anything loads."""
    out = Path(args.output_dir)
    check_folders([(out / part / f"seed-{seed}", f"--output-dir {out}: {part}/seed-{seed}")
                   for seed in args.seeds for part, used in (("adapters", not args.no_save), ("merged", args.save_merged),
                                                             ("checkpoints", args.checkpoint_every)) if used])


def _with_run(record: dict[str, Any], args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """A `sparseft train` record with what reproduces it: the command line, resolved as the run saw it."""
    return {**record, "run": run_metadata(args, model_dir=settings.model_dir, steps=settings.steps, batch_size=settings.batch_size,
                                          max_length=settings.max_length, rank=settings.rank)}


def _print_saved(args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    print(f"results: {out / 'results.json'}")
    if not args.no_save:
        print(f"saved: {out / 'adapters'}/seed-S (load with `sparseft predict --adapter DIR`)"
              + (f", merged models in {out / 'merged'}/seed-S" if args.save_merged else ""))


def cmd_train_causal_lm(args: argparse.Namespace) -> int:
    """``sparseft train --task causal-lm``: instruction-tune a chat model, report held-out answer
    loss/perplexity before and after, and greedy generations for a few held-out prompts."""
    from transformers import AutoTokenizer

    from .causal_lm import CausalLMSettings, load_chat_splits, run_causal_lm
    from .resources import smollm2_dir

    _check_train_folders(args)
    placement = _placement(args)
    model_dir = _model_dir(args) if args.model else str(smollm2_dir())
    splits = load_chat_splits(args.data)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(args.output_dir)
    print(
        f"train {len(splits['train'])} / held-out {len(splits['test'])} conversations "
        f"({args.data or 'embedded chatterbot-corpus English'}), model {model_dir}",
        file=sys.stderr,
    )
    records: list[dict[str, Any]] = []
    for seed in args.seeds:
        settings = CausalLMSettings(
            **_run_options(args, model_dir, seed, placement),
            eval_examples=args.eval_examples,
            generations=args.generations,
        )
        records.append(_with_run(run_causal_lm(settings, splits, tokenizer), args, settings))
        atomic_write_text(out / "results.json", json.dumps(records, indent=2))
    _causal_lm_table(records, f"sparseft train --task causal-lm: {records[0]['method']}")
    for r in records:
        print(f"\n{r['method']} seed {r['seed']}: held-out answer loss {r['eval_loss_before']:.4f} → {r['eval_loss']:.4f}, "
              f"perplexity {r['perplexity_before']:.2f} → {r['perplexity']:.2f} ({r['eval_examples']} conversations), "
              f"trainable params {r['trainable_params']:,d}, wall {r['wall_s']:.1f} s")
        for g in r["generations"]:
            print(f"  Q: {g['prompt']}\n    reference: {g['reference']}\n    before:    {g['before']}\n    after:     {g['after']}")
    _print_saved(args)
    return 0


def _causal_lm_table(records: list[dict[str, Any]], title: str) -> None:
    from .tables import STATE_NOTE, mib, rate, show_table, state_with_bases_bytes

    headers = ("method", "seed", "lr", "loss before", "loss after", "ppl before", "ppl after", "trainable", "state MiB",
               "peak RSS MiB", "step s", "calib s", "wall s")
    rows = [
        (r["method"], str(r["seed"]), rate(r["lr"]), f"{r['eval_loss_before']:.4f}", f"{r['eval_loss']:.4f}",
         f"{r['perplexity_before']:.2f}", f"{r['perplexity']:.2f}", f"{r['trainable_params']:,d}",
         mib(state_with_bases_bytes(r)), mib(r["peak_rss_bytes"], 0), f"{r['step_time_s']:.3f}",
         f"{r['calibration_s']:.1f}", f"{r['wall_s']:.1f}")
        for r in records
    ]
    show_table(title, headers, rows, caption=STATE_NOTE)


def cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "task", "classification") == "causal-lm":
        return cmd_train_causal_lm(args)
    from transformers import AutoTokenizer

    from .train import RunSettings, run_classification

    placement = _placement(args)
    model_dir = _model_dir(args)
    splits = _load_splits(args)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = Path(args.output_dir)
    _check_train_folders(args)
    records: list[dict[str, Any]] = []
    print(
        f"train {len(splits['train'])} / validation {len(splits['validation'])} / test {len(splits['test'])} rows, "
        f"labels {splits['train'].label_names}, model {model_dir}",
        file=sys.stderr,
    )
    for seed in args.seeds:
        settings = RunSettings(**_run_options(args, model_dir, seed, placement))
        records.append(_with_run(run_classification(settings, splits, tokenizer).to_dict(), args, settings))
        atomic_write_text(out / "results.json", json.dumps(records, indent=2))
    _table(records, f"sparseft train: {records[0]['method']} on {'embedded Rotten Tomatoes' if not args.data else args.data}")
    for r in records:
        print(f"{r['method']} seed {r['seed']}: accuracy {r['accuracy']:.4f} ({r['eval_split']}), "
              f"trainable params {r['trainable_params']:,d}, wall {r['wall_s']:.1f} s")
    _print_saved(args)
    return 0


def _predict_groups(args: argparse.Namespace, run: dict[str, Any]) -> str | None:
    """The group column to split ``--data`` by: the training run's, when it is the same file, so
    its test split holds no training row; a different one is refused."""
    trained = run.get("data") or {}
    if not args.data or trained.get("path") != str(Path(args.data).resolve()):
        return args.group_column
    if args.group_column is not None and args.group_column != trained.get("group_column"):
        from ..errors import DataError

        raise DataError(f"{args.data} was split for training with --group-column {trained.get('group_column')}; another split "
                        "would put training rows in the scored split: pass the same --group-column (or none, to use it).")
    return trained.get("group_column")


def cmd_predict(args: argparse.Namespace) -> int:
    """Load what `sparseft train` saved; score a labelled file (accuracy) or label texts. The run
    file is read, and the arguments and data checked against it, before the model loads."""
    from .train import check_merge_target, load_trained, read_trained

    saved = read_trained(args.adapter)
    if args.save_merged:  # (before anything loads or scores)
        if saved[0]["kind"] == "model" and saved[0].get("quantize"):
            from ..errors import ConfigError

            raise ConfigError(f"--save-merged: {args.adapter} holds a whole model ({saved[0].get('method')}) saved as it "
                              f"trained, on a {saved[0]['quantize']} base: there is no adapter to merge. Serve that folder.")
        check_merge_target(Path(args.save_merged), None if args.full_precision else saved[0].get("quantize"))
    prepare = _predict_causal_lm if saved[0].get("task") == "causal-lm" else _predict_classification
    predict = prepare(args, saved[0])  # flags checked, data read: a wrong one is named before the model loads
    placement = _placement(args)
    if args.full_precision and saved[0].get("quantize"):
        print(f"base: float32, not {saved[0]['quantize']} as in training (--full-precision)", file=sys.stderr)
    model, tokenizer, _ = load_trained(args.adapter, args.model, placement, saved=saved, full_precision=args.full_precision)
    status = predict(placement.move(model), tokenizer, placement)
    if args.save_merged and status == 0:
        from .train import save_merged

        save_merged(model, tokenizer, saved, args.save_merged, args.model, args.merged_dtype)  # (last: merges in place)
        print(f"merged: {args.save_merged} (loads with from_pretrained, no sparseft needed)", file=sys.stderr)
    return status


def _predict_classification(args: argparse.Namespace, run: dict[str, Any]) -> Callable[..., int]:
    """A classifier run: label each --text, or score the accuracy of labelled data (the default
    data's test part unless --data/--split say otherwise); the data is read and its labels
    checked now, the returned function runs the model."""
    import torch

    from ..errors import ConfigError
    from .data import encode, load_table, split_dataset
    from .train import accuracy, check_finite

    if args.max_new_tokens is not None:
        raise ConfigError("--max-new-tokens: a classifier run labels texts and generates none; drop the flag.")

    def label_texts(model, tokenizer, placement) -> int:
        enc = tokenizer(args.text, truncation=True, max_length=run["max_length"], padding=True, return_tensors="pt")
        with torch.no_grad(), placement.autocast():
            logits = model(**enc.to(placement.device)).logits.float()
        check_finite(logits)
        probs = logits.softmax(-1).cpu()
        for text, p in zip(args.text, probs):
            print(json.dumps({"text": text, "label": run["label_names"][int(p.argmax())], "probability": round(float(p.max()), 4)}))
        return 0

    if args.text:
        return label_texts
    if args.data:
        table = load_table(args.data, args.text_column, args.label_column, _predict_groups(args, run))
    else:
        from .data import rotten_tomatoes

        table = rotten_tomatoes()
    if table.label_names != run["label_names"]:
        from ..errors import DataError

        raise DataError(f"The data's labels {table.label_names} are not the model's {run['label_names']}: "
                        "pass the same --label-column / data the model was trained on.")
    data = split_dataset(table)[args.split] if args.split != "all" else table

    def score(model, tokenizer, placement) -> int:
        acc = accuracy(model, encode(tokenizer, data, run["max_length"]), placement=placement)
        print(json.dumps({"accuracy": acc, "rows": len(data), "split": args.split, "method": run["method"],
                          "trained_accuracy": run["accuracy"], "trained_split": run["eval_split"]}))
        return 0

    return score


MAX_NEW_TOKENS = 64  # a decoder run's --text answers, at most (greedy)


def _predict_causal_lm(args: argparse.Namespace, run: dict[str, Any]) -> Callable[..., int]:
    """A decoder run: answer each --text (greedy, as a user turn), or score the held-out answer
    loss of chat data (the run's own data by default, split as at training); the flags are
    checked and the data read now, the returned function runs the model."""
    import torch

    from ..errors import ConfigError
    from .causal_lm import answer_loss, encode_chat, generate_answers, load_chat_splits
    from .train import check_finite

    def answer(model, tokenizer, placement) -> int:
        convs = [[{"role": "user", "content": text}] for text in args.text]
        for text, reply in zip(args.text, generate_answers(model, tokenizer, convs, args.max_new_tokens or MAX_NEW_TOKENS,
                                                           placement)):
            print(json.dumps({"prompt": text, "answer": reply}))
        return 0

    if args.text:
        return answer
    if args.split == "validation":
        raise ConfigError("A --task causal-lm run splits its data into train and test only: pass --split test, train or all.")
    tabular = [flag for flag, given in (("--text-column", args.text_column != "text"), ("--label-column", args.label_column != "label"),
                                        ("--group-column", args.group_column is not None)) if given]
    if tabular:
        raise ConfigError(f"{', '.join(tabular)}: a decoder run reads chat JSONL (prompt/response or messages), which has no "
                          "columns to choose; drop the flag.")
    if args.max_new_tokens is not None:
        raise ConfigError("--max-new-tokens bounds the answers to --text; scoring chat data generates none: pass --text, or "
                          "drop the flag.")
    data = args.data or (run.get("data") or {}).get("path")
    splits = load_chat_splits(data)
    convs = splits["train"] + splits["test"] if args.split == "all" else splits[args.split]

    def score(model, tokenizer, placement) -> int:
        loss = answer_loss(model, encode_chat(tokenizer, convs, run["max_length"]), placement=placement)
        check_finite(torch.tensor(loss))
        print(json.dumps({"eval_loss": loss, "perplexity": math.exp(loss), "conversations": len(convs), "split": args.split,
                          "data": data or "chatterbot-corpus English", "method": run["method"],
                          "trained_eval_loss": run.get("eval_loss"), "trained_eval_examples": run.get("eval_examples")}))
        return 0

    return score


# `sparseft bench` defaults, sized for a 2-core CPU machine: 10 methods (`methods.bench_methods`) × (3 sweep runs scored on
# 512 validation rows + 3 seed runs scored on the whole test split), 150 steps each (enough for
# every method to leave the majority-class floor), one torch thread per worker, two workers at
# once. A causal-LM step costs far more than a MiniLM step (docs/benchmark.md), so its default is
# one seed at each method's default rate.
# --quick is a smoke test of every method (a few steps, no sweep, 1 seed).
BENCH_DEFAULTS = {
    "classification": {"steps": 150, "seeds": [0, 1, 2], "calibration_steps": 20, "sweep_rows": 512},
    "causal-lm": {"steps": 25, "seeds": [0], "calibration_steps": 10, "sweep_rows": None, "sweep": False},
}
QUICK = {"steps": 4, "seeds": [0], "calibration_steps": 3, "test_rows": 200, "sweep": False}


def cmd_prepare(progress: bool = True) -> int:
    """``sparseft bench --prepare``: every offline source's status, then fetch what is missing or
    does not match its pin, then the status again; exit 1 while any source is still not present."""
    from . import sources

    before = sources.statuses()
    sources.print_report(before)
    todo = [r.source for r in before if r.state != "present"]
    if not todo:
        print("all sources present and matching their pins")
        return 0
    print(f"fetching {len(todo)} source(s): {', '.join(s.name for s in todo)}")
    after = {r.source.name: r for r in sources.prepare(todo, progress=progress)}
    final = [after.get(r.source.name, r) for r in before]
    sources.print_report(final)
    bad = [r for r in final if r.state != "present"]
    if bad:
        print(f"{len(bad)} source(s) still unavailable: {', '.join(r.source.name for r in bad)}; the suite runs "
              "without them only with --tasks naming present tasks")
        return 1
    return 0


def cmd_suite(args: argparse.Namespace) -> int:
    """``sparseft bench --suite``: every suite task, paired seeds, per-method sweep, CIs vs LoRA-MLP."""
    from ..methods import split_methods
    from .suite import SuiteSettings, print_table, run_suite

    if args.prepare:
        code = cmd_prepare(progress=not args.no_progress)
        if not args.suite:
            return code
    given = {"steps": args.steps, "seeds": len(args.seeds) if args.seeds else None, "rank": args.rank,
             "batch_size": args.batch_size, "max_length": args.max_length, "calibration_steps": args.calibration_steps,
             "test_rows": args.test_rows, "val_rows": args.sweep_rows, "jobs": args.jobs, "threads": args.threads}
    given = {k: v for k, v in given.items() if v is not None}
    given["output_dir"] = args.output_dir if args.output_dir != "runs/bench" else "runs/suite"
    if args.regime:  # (otherwise SuiteSettings' default)
        given["regime"] = args.regime
    given["model"] = args.model or "minilm"
    given["show_progress"] = not args.no_progress
    given["reuse"] = tuple(args.reuse) if args.reuse else None
    given["compare_to"] = args.compare_to
    placement = _placement(args)
    given["device"], given["precision"] = placement.device, placement.precision
    if args.max_extend is not None:
        given["max_extend"] = args.max_extend
    if args.grid:
        given["grid"] = _grid(args.grid)
    if args.methods:
        given["methods"] = tuple(split_methods(args.methods))
    if args.tasks:
        given["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    if args.jobs is None:
        given["jobs"] = max(1, (os.cpu_count() or 1) // (args.threads or 1))
    settings = SuiteSettings.quick(**given) if args.quick else SuiteSettings(**given)
    print(f"suite: {settings.regime} regime, model {settings.model}, tasks {', '.join(settings.tasks)}; "
          f"{len(settings.methods)} methods, {settings.steps} steps, {settings.seeds} seeds, lr grid ×{', '.join(f'{g:.3g}' for g in settings.grid)} "
          f"(+{settings.max_extend} at an edge), {settings.val_rows} validation / {settings.test_rows} test rows per task, "
          f"{settings.jobs} worker{'s' if settings.jobs != 1 else ''}", file=sys.stderr)
    doc = run_suite(settings)
    print_table(doc["records"], settings)
    for failure in doc["failures"]:
        print(f"failed: {failure['task']} {failure['method']} lr={failure['lr']:g} seed={failure['seed']}: {failure['error']}", file=sys.stderr)
    detect = doc["detectable_difference"]
    out = Path(settings.output_dir)
    print(f"results: {out / 'suite.json'}, {out / 'suite.md'}, {out / 'suite_ci.png'}, runs in {out / 'records.jsonl'}; "
          f"wall {doc['wall_s'] / 60:.1f} min" + (f"; pooled CI half-width ≈ {100 * detect:.2f} points" if detect else ""))
    return 1 if doc["failures"] else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import TASKS, BenchSettings, print_table, run_bench
    from ..methods import canonical, split_methods
    from .threads import default_threads

    if args.suite or args.prepare:
        return cmd_suite(args)

    placement = _placement(args)
    if args.task == "causal-lm":
        from .causal_lm import carve_validation, load_chat_splits
        from .resources import smollm2_dir

        model_dir = _model_dir(args) if args.model else str(smollm2_dir())
        splits = carve_validation(load_chat_splits(args.data))
    else:
        model_dir = _model_dir(args)
        splits = _load_splits(args)  # fail fast on a bad --data, and say what the split is
    methods = [canonical(m) for m in split_methods(args.methods)] if args.methods else None
    explicit = {a for a in ("steps", "seeds", "calibration_steps") if getattr(args, a) is not None}
    chosen = dict(BENCH_DEFAULTS[args.task], **(QUICK if args.quick else {}))
    chosen.update({a: getattr(args, a) for a in explicit})
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // (args.threads or 1))
    threads = args.threads or (default_threads() if jobs == 1 else 1)
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
        sweep=(chosen.get("sweep", True) or args.sweep) and not args.no_sweep,
        **({"max_extend": args.max_extend} if args.max_extend is not None else {}),
        **({"grid": _grid(args.grid)} if args.grid else {}),
        reuse=tuple(args.reuse or ()),
        sweep_rows=args.sweep_rows if args.sweep_rows is not None else chosen["sweep_rows"],
        test_rows=args.test_rows if args.test_rows is not None else chosen.get("test_rows"),
        rank=args.rank,
        density=args.density,
        support_narrow=args.support_narrow,
        batch_size=args.batch_size,
        max_length=args.max_length or TRAIN_DEFAULTS[args.task]["max_length"],
        calibration_steps=chosen["calibration_steps"],
        # one thread per worker when workers run side by side (stable timings on a shared
        # machine); a single worker takes the idle cores (sparseft.app.threads)
        threads=threads,
        jobs=jobs,
        show_progress=not args.no_progress,
        smoke=args.quick,
        device=placement.device,
        precision=placement.precision,
    )
    if methods:
        settings.methods = methods
    if settings.lr is not None:
        rates = f"lr {settings.lr:g}"
    elif settings.sweep:
        rates = (f"lr sweep ×{', '.join(f'{g:.3g}' for g in settings.grid)} on {settings.sweep_rows or 'all'} validation rows "
                 f"(+{settings.max_extend} at an edge)")
    else:
        rates = "default lr"
    print(
        f"bench{' (smoke run)' if settings.smoke else ''}: {len(settings.methods)} methods, {settings.steps} steps, "
        f"seeds {settings.seeds}, {rates}, {settings.jobs} worker(s) at once × {settings.threads} torch thread(s); "
        f"train {len(splits['train'])} / validation {len(splits['validation'])} / test {len(splits['test'])} rows, model {model_dir}",
        file=sys.stderr,
    )
    doc = run_bench(settings)
    task = TASKS[settings.task]
    print_table(doc["methods"], settings.task, f"sparseft bench ({task.label or settings.task}): test {task.metric}, "
                f"{settings.steps} steps, rank-{settings.rank} budgets, seeds {settings.seeds}", smoke=settings.smoke)
    out = Path(settings.output_dir)
    for method, why in doc["failed"].items():
        print(f"{method}: {why}", file=sys.stderr)
    print(f"results: {out / 'results.json'} (test runs), {out / 'sweep.json'} (validation sweep), {out / 'records.jsonl'} (every run), "
          f"{out / 'benchmark.md'}, plots in {out}; wall {doc['wall_s']:.0f} s")
    return 1 if doc["failed"] else 0


def _add_merged_dtype(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--merged-dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="the --save-merged model's dtype (default auto: the base checkpoint's, as it is served; the "
                             "merge itself runs in float32)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="sparseft", description="Sparse fine-tuning of transformer MLP layers.")
    parser.add_argument("--version", action="version", version=f"sparseft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune with one method: a classifier (held-out accuracy) or, with --task causal-lm, a chat LM (held-out perplexity)")
    _add_common(train)
    train.add_argument("--method", default=DEFAULT_METHOD, help="full, head, lora-mlp, lora-attn, meprop, sparse-random (the default: k MLP entries "
                       "at random, no rotation, no calibration pass), sparsegrad (= sparsegrad-onesided: the same support "
                       "in a rotated basis, the narrow side rotated; SparseGradConfig()), sparsegrad-random (both sides rotated), sparsegrad-fixed "
                       "(calibrated support), sparsegrad-dynamic (= sparsegrad-paper), "
                       "s2ft, shira, supertuning; ablation meprop-fixed; variants of the sparse methods "
                       "with config fields: 'sparsegrad[support_narrow=auto]', 'sparsegrad[support_group=64]' (faster, "
                       "docs/sparsegrad.md), 'sparsegrad-fixed[support_criterion=snr]'")
    train.add_argument("--lr", type=_positive(float), help="learning rate (default: the method's default)")
    train.add_argument("--output-dir", default="runs/train", help="writes DIR/results.json")
    train.add_argument("--checkpoint-every", type=_positive(int), help="save a resumable checkpoint every N steps "
                       "to OUTPUT_DIR/checkpoints/seed-S/ (atomic; the newest two are kept)")
    train.add_argument("--resume", metavar="DIR", help="continue each seed from the latest checkpoint in "
                       "DIR/checkpoints/seed-S/ (DIR: an earlier --output-dir); seeds without one start fresh")
    train.add_argument(
        "--task",
        choices=TASK_KINDS,
        default="classification",
        help="classification (default; CSV/JSONL text+label) or causal-lm: instruction-tune a chat model "
        "(default SmolLM2-135M-Instruct on chatterbot-corpus; --data JSONL of prompt/response or messages)",
    )
    train.add_argument("--eval-examples", type=int, default=200, help="causal-lm: held-out conversations scored (default 200)")
    train.add_argument("--generations", type=int, default=3, help="causal-lm: held-out prompts answered before/after (default 3)")
    train.set_defaults(steps=None, max_length=None)  # by task: TRAIN_DEFAULTS
    for action in train._actions:
        if action.dest in ("steps", "max_length"):
            defaults = ", ".join(f"{task} {d[action.dest]}" for task, d in TRAIN_DEFAULTS.items())
            action.help = {"steps": f"optimizer steps per run (default: {defaults}; 0: evaluate the untrained model)",
                           "max_length": f"tokens per example (default: {defaults})"}[action.dest]
    train.add_argument("--no-save", action="store_true", help="do not save what was trained (default: the adapter of "
                       "each seed in OUTPUT_DIR/adapters/seed-S; full/head: the whole model)")
    train.add_argument("--save-merged", action="store_true", help="also save a plain merged model per seed in "
                       "OUTPUT_DIR/merged/seed-S (loads with from_pretrained, no sparseft needed; with --quantize, merged into "
                       "the float32 base on the CPU)")
    _add_merged_dtype(train)
    train.set_defaults(func=cmd_train)

    predict = sub.add_parser("predict", help="load what `sparseft train` saved: score labelled data or label texts "
                             "(a decoder run: answer prompts or score chat data)")
    predict.add_argument("--adapter", required=True, help="OUTPUT_DIR/adapters/seed-S (or a --save-merged folder)")
    predict.add_argument("--model", help="the base model folder, when it moved since training (default: the one the run "
                         "recorded; its fingerprint must match)")
    predict.add_argument("--text", action="append", help="a text to label, or a prompt a decoder run answers (repeatable); "
                         "prints JSON lines")
    predict.add_argument("--data", help="a labelled CSV/TSV/JSONL to score (default: the embedded Rotten Tomatoes); a decoder "
                         "run: chat JSONL, scored by answer loss (default: the data it trained on)")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--label-column", default="label")
    predict.add_argument("--group-column")
    predict.add_argument("--split", choices=("train", "validation", "test", "all"), default="test",
                         help="which part of the data's fixed split to score (default test, as in training)")
    predict.add_argument("--max-new-tokens", type=_positive(int),
                         help=f"a decoder run's --text: tokens answered at most (greedy; default {MAX_NEW_TOKENS})")
    predict.add_argument("--threads", type=_positive(int), help=f"torch CPU threads (default: {THREADS_RULE})")
    predict.add_argument("--full-precision", action="store_true", help="a run trained with --quantize: load its base in "
                         "float32, not quantized, as the adapter is served (QLoRA's route); scores then differ from the "
                         "run's by the quantization's rounding of W0")
    predict.add_argument("--save-merged", metavar="DIR", help="also save the base with the adapter merged in, as a plain "
                         "model in DIR (a new folder; loads with from_pretrained, no sparseft needed): with --full-precision, "
                         "the float32 model to serve of a run trained with --quantize")
    _add_merged_dtype(predict)
    _add_placement(predict)
    predict.set_defaults(func=cmd_predict)

    bench = sub.add_parser("bench", help="every method side by side: LR sweep on validation, seeds on test, table + plots")
    _add_common(bench)
    # None = the bench defaults (BENCH_DEFAULTS, or QUICK with --quick)
    bench.set_defaults(steps=None, seeds=None, calibration_steps=None, max_length=None)
    what = {"steps": "optimizer steps per run", "seeds": "final-run seeds: a count (3 → 0,1,2) or a list (0,5,7)",
            "calibration_steps": "calibration steps (SparseGrad)"}
    for action in bench._actions:
        if action.dest in what:
            defaults = ", ".join(f"{task} {d[action.dest]}" for task, d in BENCH_DEFAULTS.items())
            action.help = f"{what[action.dest]} (bench default: {defaults}; --quick {QUICK[action.dest]})"
    for action in bench._actions:
        if action.dest == "threads":
            action.help = f"torch CPU threads per worker (default 1; with --jobs 1: {THREADS_RULE})"
    default_set = bench_methods()
    bench.add_argument("--methods", help=f"comma list (default: {','.join(default_set)}; head is classification only); "
                                         f"{', '.join(m for m in METHODS if m not in default_set)} by name")
    bench.add_argument("--lr", type=float, help="one learning rate for every method (skips the sweep)")
    bench.add_argument("--no-sweep", action="store_true", help="use each method's default learning rate, no sweep")
    bench.add_argument("--sweep", action="store_true", help="sweep the learning rate where the task's default does not (causal-lm)")
    bench.add_argument("--reuse", metavar="DIR", action="append", help="take the finished runs of an earlier output directory "
                       "made with the same run settings instead of training them again: resume a cut-off run (--reuse "
                       "OUTPUT_DIR) or add methods, seeds or rates next to a finished one; repeat it for several; with --suite, a "
                       "directory of the other --regime gives its full fine-tuning runs only (the same in either regime)")
    bench.add_argument("--grid", metavar="F,F,..", help="learning-rate factors around each method's default rate "
                       "(default 0.333,1,3; '1' runs the default rate only: with --suite every rate is then reported at "
                       "the grid's edge)")
    bench.add_argument("--max-extend", type=int, help="times a method's lr grid may grow (a ×3 step) past the end where "
                       "its best validation rate sits (default 2; 0 = never); a rate still there is marked (edge)")
    bench.add_argument("--sweep-rows", type=int, help=f"validation rows scored in the sweep (default {BENCH_DEFAULTS['classification']['sweep_rows']}; 0 = all)")
    bench.add_argument("--test-rows", type=int, help="test rows scored in the final runs (default: all)")
    bench.add_argument("--quick", action="store_true", help="smoke run: every method, 4 steps, 1 seed, no sweep, 200 test rows "
                       "(with --suite: every task and method, 6 steps, 2 rates, 2 seeds)")
    bench.add_argument("--jobs", type=_positive(int), help="runs at once, each in its own worker process "
                       "(default: CPU cores ÷ --threads; 1 for timings free of a neighbour)")
    bench.add_argument("--task", default="classification", choices=TASK_KINDS, help="default %(default)s")
    suite = bench.add_argument_group("suite (--suite): real tasks, paired seeds, 95%% CIs of each method's difference to lora-mlp")
    suite.add_argument("--suite", action="store_true", help="run the benchmark suite (rotten_tomatoes, sarcasm, trec, "
                       "newsgroups; writes OUTPUT_DIR/suite.json, suite.md, suite_ci.png); default output runs/suite")
    suite.add_argument("--regime", choices=("peft", "paper"), help="peft: only adapters and head train "
                       "(default); paper: attention, embeddings, LayerNorms and head train fully, only the MLP treatment differs")
    suite.add_argument("--tasks", help="comma list of suite tasks: rotten_tomatoes, sarcasm, "
                       "trec, newsgroups (default: all four)")
    suite.add_argument("--compare-to", metavar="METHOD", help="a second reference: each method's paired difference "
                       "(95%% CI) to METHOD as well as to lora-mlp, e.g. a variant against the default sparsegrad "
                       "(added to --methods if missing)")
    suite.add_argument("--prepare", action="store_true", help="report every offline source (present / missing / "
                       "mismatched, sizes; the table in sparseft/app/sources.py) and fetch what is missing; with --suite "
                       "it then runs")
    bench.add_argument("--output-dir", default="runs/bench", help="writes DIR/results.json, sweep.json, records.jsonl, summary.json, benchmark.md, PNGs")
    bench.set_defaults(func=cmd_bench)
    return parser


# What the application needs beyond the library (the `bench` extra, which includes `hf`).
BENCH_PACKAGES = frozenset({"transformers", "peft", "accelerate", "tqdm", "rich", "matplotlib", "numpy", "yaml", "gguf"})


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in BENCH_PACKAGES:
            raise
        print(f"sparseft: error: the command line needs the bench extra ({exc.name} is not installed): "
              'pip install "sparseft[bench]"', file=sys.stderr)
        return 2


def _validate(args: argparse.Namespace) -> None:
    """Every argument checked before anything heavy loads (no torch, no data, no model yet)."""
    from ..errors import ConfigError, DataError
    from ..methods import canonical, split_methods

    if getattr(args, "method", None):
        canonical(args.method)
    if getattr(args, "methods", None):
        for m in split_methods(args.methods):
            canonical(m)
    if getattr(args, "compare_to", None):
        canonical(args.compare_to)
    if getattr(args, "func", None) is cmd_bench and not args.suite:
        suite_only = [flag for flag, value in (("--regime", args.regime), ("--tasks", args.tasks), ("--compare-to", args.compare_to))
                      if value]
        if suite_only:
            raise ConfigError(f"{', '.join(suite_only)} {'is a suite option' if len(suite_only) == 1 else 'are suite options'}"
                              ": add --suite.")
    if getattr(args, "merged_dtype", "auto") != "auto" and not getattr(args, "save_merged", None):
        raise ConfigError(f"--merged-dtype {args.merged_dtype} sets the --save-merged model's dtype: add --save-merged.")
    steps = getattr(args, "steps", None)
    if steps is not None and steps < 0:
        raise ConfigError(f"--steps {steps} is negative: give a number of optimizer steps (0 evaluates the untrained model).")
    density = getattr(args, "density", None)
    if density is not None and not 0 < density <= 1:
        raise ConfigError(f"--density {density} must be in (0, 1]: the fraction of each layer's entries that train.")
    if getattr(args, "quantize", None):
        from ..methods import parse_method

        name = parse_method(args.method)[0] if getattr(args, "method", None) else None
        if name in ("full", "s2ft"):
            raise ConfigError(f"--method {name} trains W0 itself, which --quantize stores quantized: use a sparse or LoRA "
                              "method (sparsegrad, meprop, lora-mlp, shira, head) on a quantized base, or drop --quantize.")
        if name == "head" and getattr(args, "save_merged", False):
            raise ConfigError("--method head with --quantize saves its whole model, quantized, in adapters/seed-S: there is "
                              "no adapter to merge into the float32 base. Drop --save-merged.")
        if getattr(args, "func", None) is not cmd_train:
            raise ConfigError("--quantize is a `sparseft train` option (predict reads it from the run).")
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:  # (found, not imported: it would load torch)
            raise ConfigError('--quantize needs bitsandbytes: pip install "sparseft[quant]".')
    resume = getattr(args, "resume", None)
    if resume and not Path(resume).is_dir():
        raise ConfigError(f"--resume {resume}: no such directory; pass an earlier --output-dir (it holds checkpoints/).")
    for reuse in getattr(args, "reuse", None) or ():
        if not (Path(reuse) / "records.jsonl").is_file():
            raise ConfigError(f"--reuse {reuse}: no records.jsonl there; pass the --output-dir of an earlier bench or suite run.")
    max_extend = getattr(args, "max_extend", None)
    if max_extend is not None and max_extend < 0:
        raise ConfigError(f"--max-extend {max_extend} is negative: give how many times the grid may grow (0 = never).")
    data = getattr(args, "data", None)
    if data and not Path(data).is_file():
        from .tasks import SUITE_TASKS

        if data not in SUITE_TASKS or getattr(args, "task", "classification") == "causal-lm":
            raise DataError(f"--data {data}: no such file" + ("" if getattr(args, "task", "") == "causal-lm"
                            else f", nor a task by name ({', '.join(SUITE_TASKS)})") + ".")
    model = getattr(args, "model", None)
    if model and model not in ("minilm", "mpnet"):
        config = Path(model) / "config.json"
        if not config.is_file():
            raise ConfigError(f"--model {model}: no config.json there; pass a local Hugging Face model folder.")
        try:
            json.loads(config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--model {model}: config.json is not valid JSON ({exc}); re-save the model folder.") from exc


def _main(argv: list[str] | None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is local
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .runner import quiet_dependencies

    quiet_dependencies()
    args = build_parser().parse_args(argv)
    try:
        _validate(args)
    except SparseFTError as exc:
        print(f"sparseft: error: {exc}", file=sys.stderr)
        return 2
    import torch

    if getattr(args, "device", None) is not None:  # needs torch only: an unusable device fails before the rest loads
        from .placement import resolve

        try:
            resolve(args.device, args.precision)
        except SparseFTError as exc:
            print(f"sparseft: error: {exc}", file=sys.stderr)
            return 2
    import transformers

    transformers.logging.set_verbosity_error()
    if args.func in (cmd_train, cmd_predict):  # one process does the work: choose its threads
        from .threads import choose

        args.threads, why = choose(args.threads)
        print(f"torch threads: {args.threads} ({why}; --threads N to set)", file=sys.stderr)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        with claimed(out) if (out := _output_dir(args)) else contextlib.nullcontext():
            return args.func(args)
    except SparseFTError as exc:
        print(f"sparseft: error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # training diverged: nothing was saved as a result
        print(f"sparseft: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nsparseft: interrupted. {_what_is_kept(args)}", file=sys.stderr)
        return 130


def _output_dir(args: argparse.Namespace) -> str | None:
    """The folder a command writes (held for the run, outputs.claimed), or None."""
    if args.func is cmd_predict or (args.func is cmd_bench and args.prepare and not args.suite):
        return None
    if args.func is cmd_bench and args.suite and args.output_dir == "runs/bench":
        return "runs/suite"
    return args.output_dir


def _what_is_kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves, and how to go on from it."""
    out = _output_dir(args)
    if args.func is cmd_train and getattr(args, "checkpoint_every", None):
        return f"The newest checkpoints in {out}/checkpoints are kept: continue with --resume {out}."
    if args.func is cmd_train:
        return "The unfinished run saved nothing (add --checkpoint-every N to keep its progress)."
    if args.func is cmd_bench and args.suite:
        return f"Finished runs are kept in {out}/records.jsonl: continue with --reuse {out}."
    if args.func is cmd_bench:
        return f"Finished runs are kept in {out}/records.jsonl."
    return "Nothing was written."


if __name__ == "__main__":
    sys.exit(main())
