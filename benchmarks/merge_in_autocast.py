"""The default's merged weight under bf16 autocast with float32 weights (the jobs' and
transformers.Trainer's ``bf16=True`` set-up): made in bf16 directly, against the float32 merge
that the linear then casts (the route before). Both give the same bits.

    python benchmarks/merge_in_autocast.py [--shape 5632x2048] [--rounds 21] [--threads 2]

One layer of the given shape, the default's random support (LoRA-r8's count), interleaved round
by round, median seconds. Bytes moved per merge (m·n entries): float32 copy 8, its cast 6 (14);
bf16 route 6 plus the k entries'.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from step_time import interleaved, milliseconds_and_ratio  # (benchmarks/ is the script's folder)

from sparseft import MePropConfig, get_sparse_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="5632x2048", help="m x n (outputs x inputs)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, n = map(int, args.shape.split("x"))
    model = get_sparse_model(nn.Sequential(nn.Linear(n, m)), MePropConfig(selection="fixed", density=None, match_lora_rank=8,
                                                                          target_modules=["0"]))
    layer = next(iter(model.sparse_layers().values()))
    with torch.no_grad():
        layer.param.normal_(0, 0.01)
    W0, param, update = layer.base_layer.weight, layer.param, layer.update
    routes = {"float32 merge, then cast": lambda: update.merge_into(W0, param).to(torch.bfloat16),
              "bf16 merge": lambda: update.merge_into(W0, param, dtype=torch.bfloat16)}
    assert torch.equal(*(route() for route in routes.values()))
    median = interleaved(routes, args.rounds)
    print(f"{m}x{n}, k={layer.k}, {args.threads} threads, median of {args.rounds}: "
          f"{milliseconds_and_ratio(median, 'bf16 merge', 'float32 merge, then cast')} (equal bits)")


if __name__ == "__main__":
    main()
