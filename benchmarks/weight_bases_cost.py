"""What bases from the weights cost to compute, once per layer: ``weight_bases(W0)`` (a float32
SVD of W0, on this machine's CPU threads) at the MLP shapes of BERT-base, a LLaMA-like 1.1B
(TinyLlama) and LLaMA-7B, each the median of ``--repeats`` runs on a random W0 (an SVD's cost does
not depend on the values). A model's total is the per-layer time times its MLP layers: an
extrapolation, said so in the output.

    python benchmarks/weight_bases_cost.py [--threads 2] [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sparseft.update.weight_bases import weight_bases

# name: (MLP layer shapes m×n, how many of each shape the model has)
SHAPES = {
    "BERT-base": [((3072, 768), 12), ((768, 3072), 12)],
    "TinyLlama-1.1B": [((5632, 2048), 44), ((2048, 5632), 22)],
    "LLaMA-7B": [((11008, 4096), 64), ((4096, 11008), 32)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for model, shapes in SHAPES.items():
        total = 0.0
        for (m, n), count in shapes:
            W = torch.randn(m, n, generator=torch.Generator().manual_seed(0)) / n**0.5
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                weight_bases(W)
                times.append(time.perf_counter() - t0)
            seconds = statistics.median(times)
            total += seconds * count
            rows.append({"model": model, "shape": f"{m}x{n}", "layers": count, "seconds_per_layer": seconds})
            print(f"{model:15s} {m:6d}×{n:<6d} {seconds:8.3f} s per layer (median of {args.repeats}), {count} such layers", flush=True)
        rows.append({"model": model, "shape": "all MLP layers", "layers": sum(c for _, c in shapes), "seconds_total": total})
        print(f"{model:15s} all MLP layers: {total:.1f} s (extrapolated: per-layer time × layers)", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "weight_bases_cost.json").write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
