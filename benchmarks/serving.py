"""Serving several adapters on one base model: sparseft against peft's LoRA, side by side.

    python benchmarks/serving.py [--adapters 4] [--rounds 3] [--new-tokens 16] [--batch 8] [--out benchmarks/results]

On SmolLM2-135M-Instruct (the offline GGUF, dequantized to float32; one CPU thread), ``--adapters``
adapters per library on the MLPs (gate/up/down of all 30 blocks), at the same trainable budget:

- sparseft: SparseGrad, fixed selection, ``match_lora_rank=8`` (k = 8(m+n) entries per layer),
  calibrated on a few chatterbot batches (its own batches per adapter), values set to random
  numbers (N(0, 1e-3); serving cost does not depend on the values). The first adapter is the
  model's own (``from_pretrained``: "default"), the others ``load_adapter``-ed (kept as exact
  low-rank factors ΔW = B A, or dense ΔW where smaller).
- peft: LoRA r=8, alpha 16, on the same layers, A and B random (N(0, 1e-3)); the first adapter
  via ``PeftModel.from_pretrained``, the others ``load_adapter``-ed.

Measured, per library, in CPU time of the one working thread (the machine is shared: wall time
would measure the other jobs too): the median time of a ``set_adapter`` call (cycling through the
adapters); greedy ``generate`` tokens per CPU-second (a batch of short chat prompts,
``--new-tokens`` new tokens each) for a mixed batch (``adapter_names=``, the adapters in turn; for
sparseft also with the first adapter loaded a second time, so that every row goes through a
loaded adapter), one adapter unmerged (the first, and for sparseft also a loaded one, whose path
differs), the active adapter merged, and the base model (``disable_adapter``); and the bytes each
added adapter holds in memory, with its file size.
Writes ``serving.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from sparseft import MePropConfig, SparseGradConfig, SparseModel, get_sparse_model  # noqa: E402
from sparseft.app.causal_lm import encode_chat, load_causal_lm, load_chat_splits  # noqa: E402
from sparseft.app.data import batches  # noqa: E402
from sparseft.app.resources import smollm2_dir  # noqa: E402

MLP = ["gate_proj", "up_proj", "down_proj"]


def make_sparseft_adapters(model_dir: Path, train, n: int, out: Path, narrow: int | None, source: str) -> list[Path]:
    base = load_causal_lm(model_dir)
    dirs = []
    for i in range(n):
        if source == "none":  # the default method, sparse-random: identity bases, nothing to calibrate
            config = MePropConfig(selection="fixed", support_criterion="random", match_lora_rank=8)
        else:
            config = SparseGradConfig(selection="fixed", match_lora_rank=8, support_narrow=narrow, basis_source=source)
        tuner = get_sparse_model(base, config)
        if not tuner.is_calibrated:
            tuner.calibrate(batches(train, 4, seed=i, steps=2), steps=2, show_progress=False)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for layer in tuner.sparse_layers().values():
                layer.values.copy_(torch.randn(layer.values.shape, generator=gen) * 1e-3)
        dirs.append(out / f"sparseft-{i}")
        tuner.save_pretrained(dirs[-1])
        base = tuner.unload()
    return dirs


def make_peft_adapters(model_dir: Path, n: int, out: Path) -> list[Path]:
    base = load_causal_lm(model_dir)
    dirs = []
    for i in range(n):
        lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=MLP, lora_dropout=0.0))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 1e-3)
        dirs.append(out / f"peft-{i}")
        lora.save_pretrained(dirs[-1])
        base = lora.unload()
    return dirs


def switch_seconds(model, names: list[str], calls: int) -> float:
    times = []
    for i in range(calls):
        t0 = time.thread_time()
        model.set_adapter(names[i % len(names)])
        times.append(time.thread_time() - t0)
    model.set_adapter(names[0])
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--switch-calls", type=int, default=500)
    ap.add_argument("--support-narrow", type=int, default=None, help="SparseGradConfig.support_narrow (default: none)")
    ap.add_argument("--basis-source", choices=("gradients", "weights", "none"), default="gradients",
                    help="SparseGradConfig.basis_source: gradient bases are each adapter's own; bases from the weights "
                    "are the same for every adapter on the base, held once; none: the default method, sparse-random "
                    "(no rotation)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    splits = load_chat_splits()
    train = encode_chat(tokenizer, splits["train"][:64], 64)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": conv[0]["content"]}], tokenize=False,
                                           add_generation_prompt=True) for conv in splits["test"][: args.batch]]
    prompts = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    names = ["default"] + [f"a{i}" for i in range(1, args.adapters)]
    mixed = [names[i % len(names)] for i in range(args.batch)]

    with tempfile.TemporaryDirectory() as tmp:
        sdirs = make_sparseft_adapters(model_dir, train, args.adapters, Path(tmp), args.support_narrow, args.basis_source)
        pdirs = make_peft_adapters(model_dir, args.adapters, Path(tmp))
        files = {"sparseft": [os.path.getsize(d / "adapter_model.safetensors") for d in sdirs],
                 "peft": [os.path.getsize(d / "adapter_model.safetensors") for d in pdirs]}
        sparse = SparseModel.from_pretrained(load_causal_lm(model_dir), sdirs[0]).eval()
        lora = PeftModel.from_pretrained(load_causal_lm(model_dir), pdirs[0]).eval()
        for name, s, p in zip(names[1:], sdirs[1:], pdirs[1:]):
            sparse.load_adapter(s, name)
            lora.load_adapter(p, adapter_name=name)
        sparse.load_adapter(sdirs[0], "a0")  # the first again, as a loaded adapter: a mix of loaded ones only

    memory = {
        "sparseft": [sum(layer.extra_updates[n].nbytes() for layer in sparse.adapted_layers().values()) for n in names[1:]],
        "peft": [sum(p.numel() * p.element_size() for k, p in lora.named_parameters() if f".{n}." in k) for n in names[1:]],
    }
    forms = collections.Counter(type(layer.extra_updates[names[1]]).__name__ for layer in sparse.adapted_layers().values())
    bases_bytes = [sum(t.numel() * t.element_size() for layer in sparse.adapted_layers().values()
                       for t in layer.extra_updates[n].basis_tensors() if t is not None and any(
                           t is getattr(layer.extra_updates[n], side) for side in layer.extra_updates[n].owned))
                   for n in names[1:]]
    budget = {"sparseft_k": sum(layer.k for layer in sparse.adapted_layers().values()),
              "peft_params": sum(p.numel() for k, p in lora.named_parameters() if ".default." in k)}

    switch = {"sparseft": switch_seconds(sparse, names, args.switch_calls),
              "peft": switch_seconds(lora, names, args.switch_calls)}

    new_tokens = args.new_tokens

    wall: dict[int, float] = {}

    def generate(model, **extra) -> float:
        t0, w0 = time.thread_time(), time.perf_counter()
        with torch.no_grad():
            out = model.generate(**prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=pad, **extra)
        assert out.shape[1] == prompts["input_ids"].shape[1] + new_tokens
        wall[len(wall)] = time.perf_counter() - w0
        return time.thread_time() - t0

    def single(model, name):
        def run() -> float:
            model.set_adapter(name)
            try:
                return generate(model)
            finally:
                model.set_adapter("default")
        return run

    def merged(model):
        def run() -> float:
            model.merge_adapter()
            try:
                return generate(model)
            finally:
                model.unmerge_adapter()
        return run

    def base(model):
        def run() -> float:
            with model.disable_adapter():
                return generate(model)
        return run

    modes = {
        ("sparseft", "mixed"): lambda: generate(sparse, adapter_names=mixed),
        ("sparseft", "mixed_loaded"): lambda: generate(sparse, adapter_names=[n if n != "default" else "a0" for n in mixed]),
        ("peft", "mixed"): lambda: generate(lora, adapter_names=mixed),
        ("sparseft", "single"): single(sparse, "default"),
        ("peft", "single"): single(lora, "default"),
        ("sparseft", "single_loaded"): single(sparse, names[1]),
        ("sparseft", "merged"): merged(sparse),
        ("peft", "merged"): merged(lora),
        ("sparseft", "base"): base(sparse),
        ("peft", "base"): base(lora),
    }
    new_tokens = 2
    for run in modes.values():  # warm-up (short)
        run()
    new_tokens = args.new_tokens
    times: dict[tuple[str, str], list[float]] = {key: [] for key in modes}
    for _ in range(args.rounds):  # interleaved, so every mode sees the same machine load
        for key, run in modes.items():
            times[key].append(run())
    tokens = args.batch * args.new_tokens
    tok_s = {f"{lib}/{mode}": tokens / statistics.median(t) for (lib, mode), t in times.items()}

    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32)", "threads": torch.get_num_threads(),
        "adapters": args.adapters, "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds,
        "prompt_tokens": int(prompts["input_ids"].shape[1]), "mixed_adapter_names": mixed,
        "support_narrow": args.support_narrow, "basis_source": args.basis_source,
        "switch_seconds_median": switch, "switch_calls": args.switch_calls, "tokens_per_second": tok_s,
        "clock": "CPU time of the (single) working thread: the machine is shared, so wall time is not the work done",
        "generate_cpu_seconds": {f"{lib}/{mode}": t for (lib, mode), t in times.items()},
        "generate_wall_seconds_all_calls": list(wall.values()),
        "bytes_per_added_adapter": memory, "adapter_file_bytes": files, "trainable_budget": budget,
        "sparseft_loaded_forms": dict(forms), "sparseft_bases_bytes_per_added_adapter": bases_bytes,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(result, indent=2))

    def ts(lib: str, mode: str) -> str:
        return f"{tok_s[f'{lib}/{mode}']:.1f}" if f"{lib}/{mode}" in tok_s else "—"

    mean = statistics.mean
    rows = [
        ("set_adapter, median µs (CPU)", f"{switch['sparseft'] * 1e6:.1f}", f"{switch['peft'] * 1e6:.1f}"),
        (f"generate tok/s, mixed batch of {args.adapters} adapters", ts("sparseft", "mixed"), ts("peft", "mixed")),
        (f"generate tok/s, mixed batch of {args.adapters} loaded adapters", ts("sparseft", "mixed_loaded"), ts("peft", "mixed")),
        ("generate tok/s, one adapter unmerged (the first)", ts("sparseft", "single"), ts("peft", "single")),
        ("generate tok/s, one loaded adapter unmerged", ts("sparseft", "single_loaded"), ts("peft", "single")),
        ("generate tok/s, active adapter merged", ts("sparseft", "merged"), ts("peft", "merged")),
        ("generate tok/s, base model (disable_adapter)", ts("sparseft", "base"), ts("peft", "base")),
        ("memory per added adapter, bytes", f"{mean(memory['sparseft']):,.0f}", f"{mean(memory['peft']):,.0f}"),
        ("adapter file, bytes", f"{mean(files['sparseft']):,.0f}", f"{mean(files['peft']):,.0f}"),
        ("trainable entries per adapter", f"{budget['sparseft_k']:,d}", f"{budget['peft_params']:,d}"),
    ]
    print(f"SmolLM2-135M-Instruct, {torch.get_num_threads()} thread, batch {args.batch} × {args.new_tokens} new tokens "
          f"(prompts {result['prompt_tokens']} tokens, left-padded), greedy; median of {args.rounds} rounds; "
          "tokens per CPU-second of the one working thread.\n")
    narrow = (f", support_narrow={args.support_narrow}" if args.support_narrow else "") + (
        ", bases from the weights" if args.basis_source == "weights" else "")
    method = "sparse-random, no rotation" if args.basis_source == "none" else "SparseGrad"
    print(f"| | sparseft ({method}, LoRA r=8 budget{narrow}) | peft (LoRA r=8) |")
    print("|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nsparseft keeps each loaded layer as {dict(forms)}; of the memory per added adapter, bases: "
          f"{mean(bases_bytes):,.0f} bytes (held once where adapters share them).")


if __name__ == "__main__":
    main()
