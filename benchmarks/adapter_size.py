"""Adapter folder size: the default SparseGrad against peft's LoRA at the same budget.

    python benchmarks/adapter_size.py [--out benchmarks/results]

For the embedded MiniLM (sequence classification, 2 labels) and SmolLM2-135M-Instruct (causal
LM): ``prepare("sparsegrad", rank=8)`` (the default: a random support, the narrow side rotated by
gradient bases) calibrated on 4 batches of random tokens (sizes do not depend on the data), and
``prepare("lora-mlp", rank=8)`` (peft LoRA r=8 on the same MLP layers); each saved with
``save_pretrained``. Prints the bytes of each folder, their ratio, and the part of sparseft's file
that is bases (one d×d per group of the rotated side: the issue's allowance); writes
``adapter_size.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from sparseft.app.causal_lm import load_causal_lm  # noqa: E402
from sparseft.app.resources import default_model_dir, smollm2_dir  # noqa: E402
from sparseft.app.train import load_classifier  # noqa: E402
from sparseft.methods import prepare  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bases_bytes(path: Path) -> int:
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith("bases."))


def measure(name: str, load, vocab: int, labels: bool, out: Path) -> dict:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, vocab, (4, 32), generator=gen)
        batches.append({"input_ids": ids, "labels": torch.randint(0, 2, (4,), generator=gen) if labels else ids})
    sparse = prepare("sparsegrad", load(), rank=8)
    sparse.sparse.calibrate(batches, steps=4, show_progress=False)
    sparse.model.save_pretrained(out / f"{name}-sparsegrad")
    lora = prepare("lora-mlp", load(), rank=8)
    lora.model.save_pretrained(out / f"{name}-lora")
    row = {"model": name, "sparsegrad_bytes": folder_bytes(out / f"{name}-sparsegrad"),
           "lora_bytes": folder_bytes(out / f"{name}-lora"), "bases_bytes": bases_bytes(out / f"{name}-sparsegrad"),
           "sparsegrad_trainable": sparse.trainable_params, "lora_trainable": lora.trainable_params}
    row["ratio"] = row["sparsegrad_bytes"] / row["lora_bytes"]
    row["ratio_without_bases"] = (row["sparsegrad_bytes"] - row["bases_bytes"]) / row["lora_bytes"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(measure("minilm", lambda: load_classifier(default_model_dir(), 2, 0), 30522, True, Path(tmp)))
        rows.append(measure("smollm2", lambda: load_causal_lm(smollm2_dir()), 49152, False, Path(tmp)))
    print("| model | sparseft folder, bytes | peft LoRA r=8 folder, bytes | ratio | bases, bytes | ratio without bases | trainable (sparseft / LoRA) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['sparsegrad_bytes']:,d} | {r['lora_bytes']:,d} | {r['ratio']:.2f} | {r['bases_bytes']:,d} | "
              f"{r['ratio_without_bases']:.2f} | {r['sparsegrad_trainable']:,d} / {r['lora_trainable']:,d} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "adapter_size.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
