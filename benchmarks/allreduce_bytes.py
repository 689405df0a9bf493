"""Bytes DDP all-reduces per optimizer step, per method, on the real all-MiniLM-L6-v2 shapes.

    torchrun --nproc-per-node 2 benchmarks/allreduce_bytes.py [--methods full,lora-mlp,...]

Random token ids (the byte count does not depend on the data). Gradient bytes are counted by a
DDP communication hook (sparseft.distributed.count_allreduce_bytes); broadcast bytes are what
DDP (default settings) broadcasts per step besides, i.e. buffers before each forward.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import AutoModelForSequenceClassification

from sparseft.distributed import count_allreduce_bytes, count_broadcast_bytes
from sparseft.methods import prepare
from sparseft.app.resources import default_model_dir


def batch(gen: torch.Generator, size: int = 8, length: int = 64) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(1000, 30000, (size, length), generator=gen),
            "attention_mask": torch.ones(size, length, dtype=torch.long), "labels": torch.randint(0, 2, (size,), generator=gen)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="full,head,lora-mlp,lora-attn,sparsegrad-fixed,sparsegrad-dynamic,meprop")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(rank)
    rows = []
    broadcast = count_broadcast_bytes()
    for method in args.methods.split(","):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(default_model_dir()), num_labels=2)
        prepared = prepare(method, model, rank=args.rank)
        if prepared.needs_calibration:
            prepared.sparse.calibrate([batch(gen) for _ in range(2)], steps=2, show_progress=False)
        buffers = sum(b.numel() * b.element_size() for b in prepared.model.buffers())
        ddp = torch.nn.parallel.DistributedDataParallel(prepared.model)  # default settings
        counter = count_allreduce_bytes(ddp)
        opt = prepared.make_optimizer(1e-4)
        per_step = []
        for _ in range(2):
            counter.reset()
            broadcast["bytes"] = 0
            ddp(**batch(gen)).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            per_step.append((counter.bytes, broadcast["bytes"]))
        trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
        rows.append({"method": method, "allreduce_bytes_per_step": per_step[-1][0], "broadcast_bytes_per_step": per_step[-1][1], "buckets": counter.buckets,
                     "trainable_params": prepared.trainable_params, "grad_tensor_numbers": trainable,
                     "buffer_bytes": buffers})
        if rank == 0:
            print(json.dumps(rows[-1]), flush=True)
        del ddp, opt, prepared, model
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
