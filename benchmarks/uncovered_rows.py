"""The value gradient of a random support that misses a row of its layer, against one on every row.

    python benchmarks/uncovered_rows.py [--tokens 4096] [--rounds 15] [--threads 2]

The default's support is the top-k of seeded uniform scores over the layer (LoRA-r8's count, k =
8·(m+n)). Over 20 seeds per orientation of TinyLlama's 5632×2048 MLP it counts how often the
support misses a row or a column, then times ``value_grad`` (float32, on this CPU) for one seed
that misses and one that does not, interleaved round by round. Before ``FULL_COVER``
(``sparseft.update.support``) a missing row made D one row short, and every step copied g's
other rows; now D keeps the row, empty, and both take the same ops.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from step_time import interleaved, milliseconds_and_ratio  # (benchmarks/ is the script's folder)

from sparseft import MePropConfig, get_sparse_model
from sparseft.update.kernels import kernels_for
from sparseft.update.support import seeded_scores


def support(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.topk(seeded_scores((m, n), seed).flatten(), k, sorted=False).indices.sort().values
    return idx // n, idx % n


def misses(m: int, n: int, k: int, seed: int) -> bool:
    rows, cols = support(m, n, k, seed)
    return torch.unique(rows).numel() < m or torch.unique(cols).numel() < n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m, n = 5632, 2048
    k = 8 * (m + n)
    for shape in ((m, n), (n, m)):
        print(f"{shape[0]}x{shape[1]}, k={k}: {sum(misses(*shape, k, s) for s in range(20))} of 20 seeds miss a row or a column")
    seeds = {"misses a row": next(s for s in range(40) if misses(m, n, k, s)),
             "every row": next(s for s in range(40) if not misses(m, n, k, s))}
    g, x = torch.randn(args.tokens, m), torch.randn(args.tokens, n)
    kn = kernels_for(x.device)
    layers = {}
    for name, seed in seeds.items():
        model = get_sparse_model(nn.Sequential(nn.Linear(n, m)), MePropConfig(selection="fixed", density=None, match_lora_rank=8,
                                                                              target_modules=["0"]))
        layer = next(iter(model.sparse_layers().values()))
        layer.support.set(*support(m, n, k, seed))
        layers[name] = layer.update
        print(f"{name}: seed {seed}, touches {layer.support.touched} rows/columns, D {layer.support.shape()}, "
              f"path {layer.update.path_for(args.tokens)}")
        layers[name].value_grad(g, x, kn)  # (the first call builds the support's patterns)
    calls = {name: (lambda update=update: update.value_grad(g, x, kn)) for name, update in layers.items()}
    median = interleaved(calls, args.rounds)
    print(f"value_grad at N={args.tokens}, median of {args.rounds}: {milliseconds_and_ratio(median, 'misses a row', 'every row')}")


if __name__ == "__main__":
    main()
