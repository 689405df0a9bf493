"""Training-step time of whole real models, methods side by side (interleaved round by round).

    PYTHONPATH=src python benchmarks/model_step.py [--model minilm|mpnet] [--methods lora-mlp,sparse-random,sparsegrad,sparsegrad@rowmajor,lora-mlp@compiled,...]
                                                   [--regime peft|paper] [--rounds 12] [--threads 1]

Each method gets its own copy of the model, prepared as the suite prepares it (`methods.prepare`,
rank-8 budget) and calibrated on a few batches; then every round times one optimizer step (forward,
backward, AdamW step, zero_grad) of each method in turn, on the suite's batch shape (16 rows of
64 tokens; random token ids, since the time does not depend on the text). Reports the median step
per method and its ratio to LoRA-MLP's (the median over rounds of the paired ratio; the order of
methods turns every round; also the ratio of the fastest steps), and writes `model_step.json` (``--out``). Step time only:
the accuracy of each method is the suite's (docs/benchmark.md).
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

from sparseft.app.suite import _model_dir
from sparseft.app.train import load_classifier
from sparseft.methods import canonical, prepare, split_methods
from step_time import fastest_ratio, layout_kernels, paired_ratio, turned  # one timing protocol for both benchmarks (benchmarks/ is the script's folder)

# "<method>@<variant>": the method with one of the kernels' layout choices off, to time a layout
# choice against the default in one run. "@rowmajor": the wide activations handed on row-major
# (hand_off_n_major); "@w0given": W0 left as the model gives it (relay_base). See layout_kernels.
# "@compiled": the model stepped through torch.compile (compiled in the warm-up round).
VARIANTS = ("@rowmajor", "@w0given", "@compiled")


def split_variant(method: str) -> tuple[str, str]:
    """("sparsegrad", "@rowmajor") for "sparsegrad@rowmajor"; (method, "") without a variant."""
    for tag in VARIANTS:
        if method.endswith(tag):
            return method.removesuffix(tag), tag
    return method, ""


# the product's default (sparse-random), SparseGradConfig() (sparsegrad: the narrow side rotated) and the baselines
DEFAULT_METHODS = "lora-mlp,sparse-random,sparsegrad,shira,full"


def batch(vocab: int, rows: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (rows, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (rows,), generator=gen)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm", help="minilm, mpnet or a local model folder")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--regime", default="peft", choices=["peft", "paper"])
    ap.add_argument("--rounds", type=int, default=12, help="timed steps per method (after one warm-up step each)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = _model_dir(args.model, None)
    methods = [canonical(name) + tag for name, tag in map(split_variant, split_methods(args.methods))]
    runs = {}
    for method in methods:
        model = load_classifier(model_dir, 2, seed=0)
        vocab = model.config.vocab_size
        name, tag = split_variant(method)
        with layout_kernels(method, "cpu"):
            prepared = prepare(name, model, rank=8, regime=args.regime)
        calibration_s = 0.0
        if prepared.needs_calibration:
            t0 = time.perf_counter()
            prepared.sparse.calibrate([batch(vocab, args.rows, args.length, 100 + i) for i in range(10)], steps=10, show_progress=False)
            calibration_s = time.perf_counter() - t0
        model.train()
        runs[method] = {"model": model, "forward": torch.compile(model) if tag == "@compiled" else model,
                        "opt": prepared.make_optimizer(1e-5), "times": [], "calibration_s": calibration_s,
                        "trainable": prepared.trainable_params}
        print(f"prepared {method} ({prepared.trainable_params:,d} trainable, calibration {calibration_s:.1f} s)", flush=True)

    def step(method: str, data: dict) -> float:
        run = runs[method]
        with layout_kernels(method, "cpu"):
            t0 = time.perf_counter()
            run["forward"](**data).loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            return time.perf_counter() - t0

    for r in range(args.rounds + 1):  # round 0 warms up (allocations, CSR patterns, first merges)
        data = batch(vocab, args.rows, args.length, r)
        for method in turned(list(runs), r):
            seconds = step(method, data)
            if r:
                runs[method]["times"].append(seconds)
        print(f"round {r}/{args.rounds}: " + ", ".join(f"{m} {run['times'][-1] if r else 0:.3f}s" for m, run in runs.items()), flush=True)
    times = {m: run["times"] for m, run in runs.items()}
    ratios = paired_ratio(times, "lora-mlp") if "lora-mlp" in runs else {}
    fastest = fastest_ratio(times, "lora-mlp") if "lora-mlp" in runs else {}
    results = {"settings": vars(args) | {"torch": torch.__version__}, "methods": {}}
    print(f"\n{args.model}, {args.regime} regime, {args.rows}x{args.length} tokens, {args.threads} thread(s), median of {args.rounds} steps")
    print(f"{'method':60s} {'step s':>8s} {'vs LoRA-MLP':>12s} {'fastest vs':>11s} {'trainable':>12s}")
    for method, run in runs.items():
        median = statistics.median(run["times"])
        ratio, best = ratios.get(method, float("nan")), fastest.get(method, float("nan"))
        results["methods"][method] = {"median_step_s": median, "vs_lora_mlp": ratio, "fastest_vs_lora_mlp": best, "times": run["times"],
                                      "calibration_s": run["calibration_s"], "trainable_params": run["trainable"]}
        print(f"{method:60s} {median:8.3f} {ratio:12.2f} {best:11.2f} {run['trainable']:12,d}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"model_step_{Path(args.model).name}_{args.regime}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
