"""Real supports and the accuracy a leading-block restriction costs (all-MiniLM-L6-v2, Rotten Tomatoes).

    python benchmarks/supports.py [--steps 200] [--narrow 0 64 24] [--seed 0] [--out benchmarks/results]

For each value L of --narrow (0 = no restriction) one ``sparseft train`` run of sparsegrad-fixed
(rank-8 budget, same seed, same data order) where each layer's support may use only the leading
L directions of its *narrow* side (the model width, 384 here: columns of intermediate.dense,
rows of output.dense); the wide side stays free. Prints, per layer group, the distinct rows |R|
and columns |C| of the calibrated support (what the fast path's cost grows with), the rank
below which 90% of the support's rows / columns fall, and the validation accuracy of each run
(``--eval-split test`` to score on test instead).
The restriction is applied by narrowing each layer's ``block`` before calibration (the
config's ``support_rows`` / ``support_cols`` restrict the same axis in every layer, which for a
BERT MLP pair would cut the wide side of one of the two layers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import sparseft.methods as methods
from sparseft.app.cli import _load_splits
from sparseft.app.resources import default_model_dir
from sparseft.app.train import RunSettings, run_classification

SPREAD: dict[str, dict] = {}


def narrowed(L: int):
    original = methods.get_sparse_model

    def get_sparse_model(model, config, bases=None):
        sparse = original(model, config, bases)
        layers = sparse.sparse_layers()
        if L:
            for layer in layers.values():
                layer.block = (min(layer.m, L), layer.n) if layer.m <= layer.n else (layer.m, min(layer.n, L))
        original_calibrate = sparse.calibrate

        def calibrate(*args, **kwargs):
            report = original_calibrate(*args, **kwargs)
            for name, layer in layers.items():
                SPREAD[name] = {
                    "shape": [layer.m, layer.n],
                    "R": layer.support.touched[0],
                    "C": layer.support.touched[1],
                    "rows_90": int(torch.quantile(layer.rows.float(), 0.9)),
                    "cols_90": int(torch.quantile(layer.cols.float(), 0.9)),
                }
            return report

        sparse.calibrate = calibrate
        return sparse

    return get_sparse_model


def calibrate_only(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from sparseft.app.data import batches, encode
    from sparseft.app.train import load_classifier

    splits = _load_splits(argparse.Namespace(data=None, text_column="text", label_column="label", group_column=None))
    model_dir = str(default_model_dir())
    train = encode(AutoTokenizer.from_pretrained(model_dir), splits["train"], 64)
    model = load_classifier(model_dir, len(splits["train"].label_names), args.seed)
    methods.get_sparse_model = narrowed(0)
    prepared = methods.prepare("sparsegrad-fixed", model, rank=8)
    t0 = time.perf_counter()
    report = prepared.sparse.calibrate(batches(train, 16, seed=10_000 + args.seed, steps=args.calibration_steps),
                                       steps=args.calibration_steps, show_progress=False)
    print(f"calibration: {args.calibration_steps} steps of 16x64 tokens, {time.perf_counter() - t0:.1f} s "
          f"(Gram pass {report.gram_seconds:.1f} s, eigh {sum(report.eigh_seconds.values()):.1f} s, support pass {report.support_seconds:.1f} s)")
    for name, s in SPREAD.items():
        print(f"  {name} {s['shape'][0]}x{s['shape'][1]} k={prepared.sparse.sparse_layers()[name].k}: |R| {s['R']}, |C| {s['C']}, "
              f"90% of support rows < {s['rows_90']}, cols < {s['cols_90']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "supports_calibration.json").write_text(json.dumps({"settings": vars(args), "layers": SPREAD}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--narrow", type=int, nargs="+", default=[0, 64, 24])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration-steps", type=int, default=20)
    ap.add_argument("--calibrate-only", action="store_true", help="measure |R|, |C| of the unrestricted support; no training")
    ap.add_argument("--eval-split", default="validation", choices=["validation", "test"],
                    help="where accuracy is scored (validation: a restriction is a design choice, never chosen on test)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    if args.calibrate_only:
        calibrate_only(args)
        return
    splits = _load_splits(argparse.Namespace(data=None, text_column="text", label_column="label", group_column=None))
    from transformers import AutoTokenizer

    model_dir = str(default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runs = []
    original = methods.get_sparse_model
    for L in args.narrow:
        methods.get_sparse_model = narrowed(L)
        SPREAD.clear()
        try:
            t0 = time.perf_counter()
            result = run_classification(
                RunSettings(model_dir=model_dir, method="sparsegrad-fixed", steps=args.steps, seed=args.seed, show_progress=False,
                            eval_split=args.eval_split, calibration_steps=args.calibration_steps),
                splits,
                tokenizer,
            )
        finally:
            methods.get_sparse_model = original
        groups: dict[str, list] = {}
        for name, s in SPREAD.items():
            groups.setdefault("intermediate" if "intermediate" in name else "output", []).append(s)
        summary = {
            g: {key: statistics.mean(s[key] for s in v) for key in ("R", "C", "rows_90", "cols_90")} | {"shape": v[0]["shape"]}
            for g, v in groups.items()
        }
        runs.append({"narrow": L, "accuracy": result.accuracy, "final_loss": result.final_loss, "step_time_s": result.step_time_s,
                     "wall_s": time.perf_counter() - t0, "groups": summary, "layers": dict(SPREAD)})
        print(f"narrow={L or 'none'}: {args.eval_split} accuracy {result.accuracy:.4f}, final loss {result.final_loss:.4f}, "
              f"median step {result.step_time_s:.3f} s", flush=True)
        for g, s in summary.items():
            print(f"  {g} {s['shape'][0]}x{s['shape'][1]}: |R| {s['R']:.0f}, |C| {s['C']:.0f}, "
                  f"90% of support rows < {s['rows_90']:.0f}, cols < {s['cols_90']:.0f} (mean over layers)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "supports.json").write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2))
    print(f"wrote {out / 'supports.json'}")


if __name__ == "__main__":
    main()
