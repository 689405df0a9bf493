"""How long `sparseft train --task causal-lm` should train: one run of a method at a rate and a
step count, scored on the decoder bench's group-disjoint validation part (all of it).

    python benchmarks/causal_lm_steps.py --steps 100 --lr 9e-3 [--method sparse-random] [--seed 0] [--out F.json]

SmolLM2-135M-Instruct on chatterbot-corpus (1788 train / 110 validation conversations, batch 16,
128 tokens), one thread, CPU, float32. Run several side by side (one thread each) and compare
their validation ``eval_loss``; the chosen length is `cli.TRAIN_DEFAULTS` (docs/llm.md).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--method", default="sparse-random")
    ap.add_argument("--seed", type=int, default=0, help="the run's seed (adapter init, support, batch order; the split is fixed)")
    ap.add_argument("--out", help="the record as JSON (default: print only)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sparseft.app.runner import quiet_dependencies

    # before the import below, which imports bitsandbytes: it logs its offline hub warnings then
    quiet_dependencies()
    from sparseft.app.causal_lm import CausalLMSettings, carve_validation, load_chat_splits, run_causal_lm

    settings = CausalLMSettings(method=args.method, lr=args.lr, steps=args.steps, seed=args.seed, eval_split="validation", eval_examples=None,
                                show_progress=False, device="cpu", precision="fp32")
    start = time.perf_counter()
    record = run_causal_lm(settings, carve_validation(load_chat_splits()))
    record["wall_s"] = time.perf_counter() - start
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
    last = record["loss_curve"][-1][1] if record["loss_curve"] else float("nan")
    print(f"{args.method} lr {args.lr:g} steps {args.steps} seed {args.seed}: validation eval_loss {record['eval_loss']:.4f} "
          f"(before {record['eval_loss_before']:.4f}), last train loss {last:.4f}, wall {record['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
