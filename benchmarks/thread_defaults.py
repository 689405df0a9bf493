"""What torch's thread count costs on a shared machine: the measurement behind `--threads`' default.

Times, in one process, (1) the calibration eigendecomposition of MiniLM's 1536×1536 MLP Gram in
float64 -- raw ``torch.linalg.eigh`` at each thread count, and ``sparseft.bases.eigenbasis`` called
with the process at the larger count (it runs on one thread whatever the process uses) -- and
(2) training steps of all-MiniLM-L6-v2 (batch 16 × 64 tokens, full fine-tuning and LoRA on the
MLPs) at each thread count. Prints JSON lines and the machine's load average, so the numbers say
whether another process shared the cores. About a minute on the 2-core machine when it is shared.

    PYTHONPATH=src python benchmarks/thread_defaults.py --threads 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def _eigh(threads: int, size: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size // 4, generator=g, dtype=torch.float64)
    gram = a @ a.T
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.linalg.eigh(gram)
        times.append(time.perf_counter() - t0)
    return min(times)


def _eigenbasis(threads: int, size: int, repeats: int) -> float:
    from sparseft.update.bank import eigenbasis

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size // 4, generator=g)
    gram = a @ a.T
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        eigenbasis(gram)
        times.append(time.perf_counter() - t0)
    assert torch.get_num_threads() == threads, "eigenbasis must restore the thread count"
    return min(times)


def _steps(threads: int, method: str, steps: int) -> float:
    import transformers
    from transformers import AutoModelForSequenceClassification

    from sparseft.app.resources import default_model_dir
    from sparseft.methods import prepare

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=2)
    prepared = prepare(method, model, rank=8)
    opt = prepared.make_optimizer(1e-4)
    batch = {"input_ids": torch.randint(1000, 2000, (16, 64)), "attention_mask": torch.ones(16, 64, dtype=torch.long),
             "labels": torch.randint(0, 2, (16,))}
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        prepared.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--size", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--methods", default="lora-mlp,full")
    a = p.parse_args()
    counts = [int(t) for t in a.threads.split(",")]
    print(json.dumps({"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}), flush=True)
    for t in counts:
        print(json.dumps({"what": f"torch.linalg.eigh {a.size}² float64", "threads": t, "s": round(_eigh(t, a.size, a.repeats), 3)}), flush=True)
    for t in counts:
        print(json.dumps({"what": f"sparseft eigenbasis {a.size}² (process at {t} threads)", "threads": t,
                          "s": round(_eigenbasis(t, a.size, a.repeats), 3)}), flush=True)
    for method in a.methods.split(","):
        for t in counts:
            print(json.dumps({"what": f"MiniLM {method} step, batch 16×64", "threads": t, "s": round(_steps(t, method, a.steps), 3)}), flush=True)
    print(json.dumps({"loadavg_after": os.getloadavg()}), flush=True)


if __name__ == "__main__":
    main()
