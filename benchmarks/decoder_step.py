"""Training-step time and peak memory of a real decoder, methods side by side, as users run it on a GPU.

    PYTHONPATH=src python benchmarks/decoder_step.py [--shape tinyllama|tiny] [--device cuda] [--precision bf16]
        [--tokens 8x512 4x2048] [--methods full,lora-mlp,shira,sparse-random,...] [--rounds 10] [--out DIR] [--cpu-peak]
        [--count-ops] [--quantize 4bit]

A LLaMA decoder at TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 22 blocks, 32 heads, 4 KV heads,
vocabulary 32000; ``--shape tiny``: a 2-block toy for a CPU smoke run), random init (step time does
not depend on the weights' values), weights in the precision's dtype, the step under autocast.
Every method is prepared as the jobs prepare it (``methods.prepare``, LoRA-r8's budget on
gate/up/down), calibrated on 4 batches where it needs it. Per token setting (rows × length):

- step time: 3 warm-up steps each, then ``--rounds`` rounds, each timing one synchronised step
  (forward, backward, optimizer step) of every method in turn, the order turning each round; the
  ratio to LoRA-MLP is the median of the paired per-round ratios (each method is built once, for
  every setting);
- peak memory (CUDA): each method's peak allocated bytes over one step as if alone on the device
  (``cuda_peak``: what it holds between steps plus what the step allocates);
  on a CPU with ``--cpu-peak``: each method alone in a fresh process, its peak resident bytes
  above the process's before the model was built (glibc told to map every block over 64 KiB on
  its own, so a freed tensor leaves the resident set at once), over the second step.

Prints a table and writes ``decoder_step.json`` to ``--out`` after each token setting. ``--count-ops``
counts instead, per method, the aten ops of one step that do work (views aside; the first token
setting): each is a kernel launch on a GPU, so this CPU can see launches a method adds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from step_time import fastest_ratio, paired_ratio, turned  # (benchmarks/ is the script's folder)

from sparseft.app.placement import resolve
from sparseft.methods import DEFAULT_METHOD, canonical, prepare, split_methods
from sparseft.serialization import atomic_write_text

SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=32000),
    "tinyllama-2": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
                        num_key_value_heads=4, vocab_size=32000),  # TinyLlama's widths, 2 blocks: CPU comparisons
    # TinyLlama's depth at toy widths: a step's time is then the host's (Python, dispatch), the floor of a GPU step
    # whose kernels are shorter than their launches
    "tiny-22": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=22, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=512),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=512),
}
# the default with its merge kept between optimizer steps: a GPU decides whether the 3 merges it saves per MLP
# and step pay for the merged weights it holds (#28's candidate "the cached merge")
CACHED = "sparse-random[cache_update=True]"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quantize_4bit(model: torch.nn.Module, compute: torch.dtype) -> torch.nn.Module:
    """Every linear layer of the decoder blocks stored as bitsandbytes NF4 with double quantization
    (what ``sparseft train --quantize 4bit`` loads, QLoRA's), computing in ``compute``, in place:
    quantized from the random weights on their device, which is what loading a checkpoint with
    ``BitsAndBytesConfig`` does."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and ".layers." in name:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", compress_statistics=True,
                                      device=torch.device("meta"))
            layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, module=layer).to(module.weight.device)
            if module.bias is not None:
                layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model


def build(shape: str, method: str, placement, length: int, rows: int, longest: int = 0, quantize: str | None = None):
    """A fresh decoder on the device (``quantize`` "4bit": its blocks' linear layers in NF4),
    prepared for ``method``, calibrated on ``rows`` × ``length`` batches if it needs it, positions
    up to ``longest``; (model, optimizer, calibration s, trainable)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(length, longest, 128))
    with torch.device(placement.device):
        model = LlamaForCausalLM(config).to(DTYPES[placement.precision])
    if quantize:
        model = quantize_4bit(model, DTYPES[placement.precision])
    prepared = prepare(method, model, rank=8)
    calibration_s = 0.0
    if prepared.needs_calibration:
        t0 = time.perf_counter()
        prepared.sparse.calibrate([batch(config.vocab_size, rows, length, 100 + i, placement.device) for i in range(4)],
                                  steps=4, show_progress=False)
        sync(placement.device)
        calibration_s = time.perf_counter() - t0
    prepared.model.train()
    return prepared.model, prepared.make_optimizer(1e-5), calibration_s, prepared.trainable_params


def batch(vocab: int, rows: int, length: int, seed: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def step(model, optimizer, data, placement) -> float:
    sync(placement.device)
    t0 = time.perf_counter()
    with placement.autocast():
        loss = model(**data).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(placement.device)
    return time.perf_counter() - t0


def allocated(device: str) -> int:
    """Bytes of live tensors on a CUDA device (0 elsewhere)."""
    if not device.startswith("cuda"):
        return 0
    gc.collect()
    sync(device)
    return torch.cuda.memory_allocated(device)


def cuda_peak(model, optimizer, data, placement, resident: int) -> int:
    """Peak allocated bytes of one step of this method as if alone on the device: what it holds
    between steps (``resident``: what its build and first steps left allocated) plus the most the
    step allocates above what was allocated before it. The other methods' models sit idle on the
    device meanwhile, so they add to both readings alike; building each method again alone would
    cost minutes of a GPU loan (a random support's top-k runs on the CPU for every layer)."""
    before = allocated(placement.device)
    torch.cuda.reset_peak_memory_stats(placement.device)
    step(model, optimizer, data, placement)
    return resident + torch.cuda.max_memory_allocated(placement.device) - before


def cpu_peak(shape: str, method: str, placement, rows: int, length: int) -> int:
    """``cpu_peak_bytes`` of ``method``, in a fresh process."""
    command = [sys.executable, __file__, "--peak-of", method, "--shape", shape, "--device", placement.device,
               "--precision", placement.precision, "--tokens", f"{rows}x{length}"]
    done = subprocess.run(command, env=os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}, capture_output=True, text=True,
                          check=True)
    return int(done.stdout.split()[-1])


def cpu_peak_bytes(shape: str, method: str, placement, rows: int, length: int) -> int:
    """This process's peak resident bytes over a step after the first, above its resident bytes
    before the model was built (model, optimizer state and the step's transients together)."""
    from sparseft.app.metrics import peak_rss_bytes, reset_peak_rss

    warm = build("tiny", method, placement, 8, 1)  # (the libraries' imports and lazy set-up: not the method's memory)
    step(*warm[:2], batch(512, 1, 8, 0, placement.device), placement)
    del warm
    gc.collect()
    reset_peak_rss()
    before = peak_rss_bytes()
    model, optimizer, _, _ = build(shape, method, placement, length, rows)
    data = batch(model.config.vocab_size, rows, length, 0, placement.device)
    step(model, optimizer, data, placement)  # optimizer state exists from here on
    reset_peak_rss()
    step(model, optimizer, data, placement)
    return peak_rss_bytes() - before


def op_count(shape: str, method: str, placement, rows: int, length: int) -> dict[str, int]:
    """The aten ops of a training step after the first that do work (views aside), by name: on a
    GPU each one is at least a kernel launch, which this CPU can count though not time."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.overloadpacket.__name__ != "_unsafe_view":
                self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    model, optimizer, _, _ = build(shape, method, placement, length, rows)
    data = batch(model.config.vocab_size, rows, length, 0, placement.device)
    step(model, optimizer, data, placement)
    with Count() as counted:
        step(model, optimizer, data, placement)
    return dict(counted.ops.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--tokens", nargs="+", default=["8x512", "4x2048"], help="rows x length per step")
    ap.add_argument("--methods", default=f"full,lora-mlp,shira,sparse-random,{CACHED},sparsegrad-dynamic",
                    help="sparse-random is the product's default (methods.DEFAULT_METHOD); its [cache_update=True] keeps "
                         "W0 + ΔW from the forward to the input gradient (3 merges per MLP and step instead of 6)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--cpu-peak", action="store_true", help="on a CPU, measure each method's peak resident memory too")
    ap.add_argument("--count-ops", action="store_true",
                    help="count each method's aten ops per step (views aside) instead of timing; writes decoder_ops.json")
    ap.add_argument("--quantize", choices=["4bit"], help="the blocks' linear layers stored in NF4 (bitsandbytes, as "
                    "`sparseft train --quantize 4bit`): QLoRA's setting; methods that train W0 (full, s2ft) do not apply")
    ap.add_argument("--peak-of", help=argparse.SUPPRESS)  # (the fresh process --cpu-peak runs per method)
    args = ap.parse_args()
    if args.quantize and (args.cpu_peak or args.count_ops or args.peak_of):
        ap.error("--quantize times steps and CUDA peaks; --cpu-peak and --count-ops build unquantized models")
    placement = resolve(args.device, args.precision)
    if args.peak_of:
        rows, length = map(int, args.tokens[0].split("x"))
        print(cpu_peak_bytes(args.shape, canonical(args.peak_of), placement, rows, length))
        return
    methods = [canonical(m) for m in split_methods(args.methods)]
    if "lora-mlp" not in methods:
        methods.insert(0, "lora-mlp")
    weights = "NF4, computing in " + str(DTYPES[placement.precision]).removeprefix("torch.") if args.quantize else \
        str(DTYPES[placement.precision]).removeprefix("torch.")
    print(f"decoder_step: {args.shape}, {placement.describe(weights)}, methods {', '.join(methods)}", flush=True)
    results = {"settings": vars(args) | {"torch": torch.__version__, **placement.record()}, "tokens": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.count_ops:
        rows, length = map(int, args.tokens[0].split("x"))
        results["ops_per_step"] = {m: op_count(args.shape, m, placement, rows, length) for m in methods}
        print(f"{'method':34s} {'aten ops per step (views aside)':>32s}")
        for method, ops in results["ops_per_step"].items():
            print(f"{method:34s} {sum(ops.values()):32d}   " + ", ".join(f"{k} {v}" for k, v in list(ops.items())[:6]))
        atomic_write_text(out / "decoder_ops.json", json.dumps(results, indent=1))
        return
    # each method built once for every token setting (building is most of this benchmark's time on
    # a GPU), warmed up at the first, and what it then holds on the device noted for its peak
    settings = [tuple(map(int, setting.split("x"))) for setting in args.tokens]
    longest = max(length for _, length in settings)
    models, built, resident = {}, {}, {}
    for method in methods:
        before, t0 = allocated(placement.device), time.perf_counter()
        model, optimizer, calibration_s, trainable = build(args.shape, method, placement, settings[0][1], settings[0][0], longest,
                                                           args.quantize)
        print(f"built {method} in {time.perf_counter() - t0:.1f} s", flush=True)
        models[method] = (model, optimizer)
        built[method] = {"calibration_s": calibration_s, "trainable_params": trainable,
                         **({"nf4_layers": sum(type(m).__name__ == "Linear4bit" for m in model.modules())} if args.quantize else {})}
        data = batch(model.config.vocab_size, *settings[0], 0, placement.device)
        for _ in range(args.warmup):
            step(model, optimizer, data, placement)
        resident[method] = allocated(placement.device) - before
    vocab = next(iter(models.values()))[0].config.vocab_size
    for index, (setting, (rows, length)) in enumerate(zip(args.tokens, settings)):
        data = batch(vocab, rows, length, 0, placement.device)
        for method, (model, optimizer) in models.items():
            for _ in range(args.warmup if index else 0):
                step(model, optimizer, data, placement)
        times: dict[str, list[float]] = {m: [] for m in models}
        for r in range(args.rounds):
            for method in turned(list(models), r):
                times[method].append(step(*models[method], data, placement))
        ratios, fastest = paired_ratio(times, "lora-mlp"), fastest_ratio(times, "lora-mlp")
        entry = results["tokens"].setdefault(setting, {"methods": {m: dict(built[m]) for m in methods}})
        print(f"\n{setting} tokens ({rows * length}), median of {args.rounds} steps")
        print(f"{'method':34s} {'step s':>8s} {'vs LoRA':>8s} {'fastest':>8s} {'peak GiB':>9s} {'calib s':>8s}")
        peak_kind = ("CUDA peak allocated" if placement.device.startswith("cuda")
                     else "peak resident above the process's start" if args.cpu_peak else None)
        for method in methods:
            peak = (cuda_peak(*models[method], data, placement, resident[method]) if placement.device.startswith("cuda")
                    else cpu_peak(args.shape, method, placement, rows, length) if args.cpu_peak else None)
            row = entry["methods"][method] | {"median_step_s": statistics.median(times[method]), "vs_lora_mlp": ratios[method],
                                             "fastest_vs_lora_mlp": fastest[method], "peak_bytes": peak, "peak_kind": peak_kind,
                                             "times": times[method]}
            entry["methods"][method] = row
            gib = "-" if peak is None else f"{peak / 2**30:.1f}"
            label = f"{method} (default)" if method == DEFAULT_METHOD else method
            print(f"{label:34s} {row['median_step_s']:8.4f} {ratios[method]:8.2f} {fastest[method]:8.2f} {gib:>9s} "
                  f"{row['calibration_s']:8.1f}", flush=True)
        # after every setting: a time limit that stops the next one keeps this one's numbers
        atomic_write_text(out / "decoder_step.json", json.dumps(results, indent=1))
        print(f"wrote {out / 'decoder_step.json'}")


if __name__ == "__main__":
    main()
