"""Train a tiny random-init BERT with SparseGrad on 1 process or under torchrun / accelerate
(gloo on CPU), writing the trained weights to compare. Used by tests/test_distributed.py.

Every rank sees its 1/world share of each global batch, so a W-process run and a 1-process
run train on the same global batches. Calibration reduces each layer's gradient over the ranks
before it forms Grams and scores, so it equals a 1-process calibration on the same global
batches (``calibration_batches``).

    torchrun --nproc-per-node 2 tests/ddp_worker.py OUT [torch|accelerate|fsdp2|ddp-compiled]
"""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import sys
from pathlib import Path

import torch

from sparseft import ConfigError, SparseAdamW, SparseGradConfig, get_sparse_model
from sparseft.distributed import count_broadcast_bytes
from sparseft.layer import adapted_weight
from sparseft.serialization import save_tensors

broadcast = count_broadcast_bytes()
OUT = Path(".")
GLOBAL_BATCH, SEQ, CALIB_STEPS, TRAIN_STEPS = 8, 12, 3, 5
VARIANTS = ("fixed", "dynamic-sparseadamw", "dynamic-attach", "dynamic-hook")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
    )
    return BertForSequenceClassification(config)


def global_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 64, (GLOBAL_BATCH, SEQ), generator=gen),
            "attention_mask": torch.ones(GLOBAL_BATCH, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (GLOBAL_BATCH,), generator=gen),
        }
        for _ in range(n)
    ]


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    size = GLOBAL_BATCH // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def calibration_batches(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """This rank's share of each global calibration batch (world=1: the global batches)."""
    return [shard(b, rank, world) for b in global_batches(CALIB_STEPS, seed=1)]


def build(variant: str, rank: int, world: int, calib: dict[str, torch.Tensor] | None = None):
    """The adapted model and its optimizer; ``calib`` (from ``calibration_state``) replaces
    calibration, so two runs can be compared on exactly the same bases and support."""
    selection = "fixed" if variant == "fixed" else "dynamic"
    # abs-sum: the test compares 1- and 2-process calibration to round-off, which holds for a
    # gradient-chosen support (leading directions); a random support also trains directions at the
    # Gram's round-off level, which differ between any two calibrations (docs/sparsegrad.md)
    model = get_sparse_model(tiny_bert(), SparseGradConfig(density=0.05, selection=selection, support_criterion="abs-sum", rotation="both"))
    if calib is None:
        model.calibrate(calibration_batches(rank, world), steps=100, show_progress=False)
    else:
        model.bases.load(calib, model._group_shapes(), "cpu", torch.float32, model._group_parts())
        for name, layer in model.sparse_layers().items():
            if selection == "fixed":
                layer.set_support(calib[f"{name}.rows"], calib[f"{name}.cols"])
            layer.calibrated = True
    params = [p for p in model.parameters() if p.requires_grad]
    if variant == "dynamic-sparseadamw":
        opt = SparseAdamW(params, lr=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        if variant == "dynamic-attach":
            model.attach_optimizer(opt)
    return model, opt


def weights(model) -> dict[str, torch.Tensor]:
    """What the run learned: each adapted layer's effective weight and the task head."""
    out = {f"{name}.weight": adapted_weight(layer) for name, layer in model.sparse_layers().items()}
    out.update({f"classifier.{k}": v for k, v in model.base_model.classifier.state_dict().items()})
    return out


def calibration_state(model) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in model.bases.export().items()}
    for name, layer in model.sparse_layers().items():
        if layer.selection == "fixed":
            out[f"{name}.rows"], out[f"{name}.cols"] = layer.rows.clone(), layer.cols.clone()
    return out


def train(variant: str, rank: int = 0, world: int = 1, launcher: str = "torch", calib: dict | None = None,
          save_at: int | None = None, resume_from: str | None = None) -> tuple[dict, dict]:
    """Returns (trained weights, calibration state) of this rank. ``save_at``: write a training
    checkpoint (sparseft.app.checkpoint) to ``OUT/ckpt`` after that step; ``resume_from``: start
    from the checkpoint there and skip the steps it holds."""
    model, opt = build(variant, rank, world, calib)
    calib = calibration_state(model)
    backward = lambda loss: loss.backward()  # noqa: E731
    net = model
    if world > 1 and launcher == "accelerate":
        from accelerate import Accelerator

        acc = Accelerator(cpu=True)
        net, opt = acc.prepare(model, opt)
        backward = acc.backward
    elif world > 1 and launcher == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.bert.encoder.layer:
            fully_shard(block)
        net = fully_shard(model)
        params = [p for p in model.parameters() if p.requires_grad]  # now DTensor shards
        opt = type(opt)(params, lr=1e-2) if isinstance(opt, SparseAdamW) else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        if variant == "dynamic-attach":
            model.attach_optimizer(opt)
    elif world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)  # default settings
        if launcher == "ddp-compiled":  # DDP's graph split at its buckets, each adapted layer one operator
            net = torch.compile(net)
    model.train()
    broadcast["bytes"] = 0
    start = 0
    if resume_from is not None:
        from sparseft.app.checkpoint import load_checkpoint

        start = load_checkpoint(resume_from, model, opt)["step"]
    for step, batch in enumerate(global_batches(TRAIN_STEPS, seed=2), 1):
        if step <= start:
            continue
        loss = net(**shard(batch, rank, world)).loss
        backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == save_at:
            from sparseft.app.checkpoint import save_checkpoint

            save_checkpoint(OUT / "ckpt", model, opt, step=step)
    if launcher == "fsdp2" and world > 1:
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.unshard()
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in weights(model).items()}
        return full, calib
    if world > 1 and rank == 0:  # what DDP broadcast besides gradients during training
        bases = sum(b.numel() * b.element_size() for b in model.bases.buffers())
        (OUT / f"{variant}.broadcast.json").write_text(json.dumps({"broadcast": broadcast["bytes"], "bases": bases}))
    return weights(model), calib


def main() -> None:
    global OUT
    out = OUT = Path(sys.argv[1])
    launcher = sys.argv[2] if len(sys.argv) > 2 else "torch"
    torch.set_num_threads(1)
    # a rare SIGABRT in a rank (CI, 2026-12-07) printed only "terminate called without an active
    # exception": name the Python and C++ frames if it comes again
    faulthandler.enable(all_threads=True)
    torch._C._set_print_stack_traces_on_fatal_signal(True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and launcher in ("torch", "fsdp2", "ddp-compiled"):
        torch.distributed.init_process_group("gloo")
    elif world > 1:
        from accelerate import PartialState

        PartialState(cpu=True)  # accelerate initialises the gloo process group on CPU
    for variant in VARIANTS:
        if launcher == "ddp-compiled" and variant not in ("fixed", "dynamic-sparseadamw"):
            continue
        if launcher == "fsdp2" and variant != "fixed":
            # dynamic selection needs the whole gradient; FSDP shards it: refused, not wrong
            try:
                train("dynamic-sparseadamw" if variant == "dynamic-hook" else variant, rank, world, launcher)
            except ConfigError as exc:
                (out / f"{variant}.error.rank{rank}.txt").write_text(str(exc))
            # a sharded model sits in reference cycles (FSDP2's hooks): free it while its process
            # group lives, not at some later collection or at interpreter exit
            gc.collect()
            continue
        if variant == "dynamic-hook" and world > 1:
            # per-backward masking would cut local gradients before the all-reduce: refused
            try:
                train(variant, rank, world, launcher)
            except ConfigError as exc:
                (out / f"{variant}.error.rank{rank}.txt").write_text(str(exc))
            continue
        trained, calib = train(variant, rank, world, launcher)
        save_tensors(out / f"{variant}.calib.rank{rank}.safetensors", calib, {"kind": "calib"})
        if rank == 0:
            save_tensors(out / f"{variant}.weights.safetensors", trained, {"kind": "weights"})
        if launcher == "fsdp2" and variant == "fixed":
            # save at step 2 while training on, then resume a fresh sharded model from that file
            through, _ = train(variant, rank, world, launcher, calib=calib, save_at=2)
            resumed, _ = train(variant, rank, world, launcher, calib=calib, resume_from=str(out / "ckpt"))
            if rank == 0:
                save_tensors(out / "fixed.saving.safetensors", through, {"kind": "weights"})
                save_tensors(out / "fixed.resumed.safetensors", resumed, {"kind": "weights"})
    if world > 1:
        if rank == 0:
            (out / "backend.txt").write_text(torch.distributed.get_backend())
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # everything is written: leave without static destructors, where an exit-time
        # std::terminate of a joinable thread is the likeliest source of that rare SIGABRT
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
