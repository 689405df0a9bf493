"""One suite run outside the protocol, to ask whether a task is learnable at some budget.

    python benchmarks/suite_probe.py newsgroups full --steps 300 --max-length 80 --lr 1e-4

Prints validation accuracy at four points during training (the suite's `run_job`, one thread,
no test rows read). This is how VitaminC, a task of an earlier suite, was found not learnable at
the suite's budget (docs/benchmark.md).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from sparseft.app.suite import SuiteSettings, _init_worker, run_job

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("task")
parser.add_argument("method")
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--max-length", type=int, default=80)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--regime", default="peft", choices=("peft", "paper"))
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

_init_worker(1)
settings = asdict(SuiteSettings(steps=args.steps, max_length=args.max_length, regime=args.regime, curve_points=4))
t0 = time.perf_counter()
rec = run_job({"task": args.task, "method": args.method, "lr": args.lr, "seed": args.seed, "need_test": False,
               "settings": settings})
curve = ", ".join(f"step {s}: {a:.4f}" for s, a in rec["curve"])
print(f"{args.task} {args.method} lr={args.lr:g} {args.steps} steps, max length {args.max_length}, {args.regime} regime: "
      f"validation {rec['val_accuracy']:.4f} ({curve}); final loss {rec['final_loss']:.4f}; {time.perf_counter() - t0:.0f} s")
