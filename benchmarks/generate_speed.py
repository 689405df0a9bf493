"""Greedy generate() speed of SmolLM2-135M-Instruct after SparseGrad's merge_and_unload, against
the unmodified model, timed alternately in one process.

    python benchmarks/generate_speed.py [--rounds 5] [--new-tokens 32] [--out benchmarks/results]

The adapter is calibrated on a few chatterbot batches and its values are set to random numbers
(a trained adapter merges the same way), so the merged weights really differ from the base.
Prints the median seconds per generate() call of each model, their ratio, and the module types
left in the merged model (plain ``nn.Linear`` only, no adapter code on the inference path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoTokenizer

from sparseft import SparseGradConfig, get_sparse_model
from sparseft.app.causal_lm import encode_chat, load_causal_lm, load_chat_splits
from sparseft.app.data import batches
from sparseft.app.resources import smollm2_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = load_chat_splits()
    plain = load_causal_lm(model_dir).eval()
    sparse = get_sparse_model(load_causal_lm(model_dir), SparseGradConfig(selection="fixed", match_lora_rank=8))
    train = encode_chat(tokenizer, splits["train"][:64], 64)
    sparse.calibrate(batches(train, 8, seed=0, steps=4), steps=4, show_progress=False)
    with torch.no_grad():
        for layer in sparse.sparse_layers().values():
            layer.values.normal_(0.0, 1e-3)
    merged = sparse.merge_and_unload().eval()
    with torch.no_grad():
        changed = max(float((a - b).abs().max()) for a, b in zip(merged.parameters(), plain.parameters()))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": splits["test"][0][-2]["content"]}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def generate(model) -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
        return time.perf_counter() - t0

    generate(plain), generate(merged)  # warm-up
    times: dict[str, list[float]] = {"unmodified": [], "merged": []}
    for _ in range(args.rounds):  # alternate, so both see the same machine load
        times["unmodified"].append(generate(plain))
        times["merged"].append(generate(merged))
    med = {k: statistics.median(v) for k, v in times.items()}
    types = sorted({type(m).__name__ for m in merged.modules() if "Linear" in type(m).__name__})
    result = {"seconds": med, "ratio": med["merged"] / med["unmodified"], "linear_types": types,
              "max_weight_change": changed, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "threads": torch.get_num_threads()}
    print(f"generate() {args.new_tokens} tokens, median of {args.rounds}: unmodified {med['unmodified']:.3f} s, "
          f"merged {med['merged']:.3f} s, merged/unmodified = {result['ratio']:.3f}; linear modules {types}; "
          f"max |merged - base| weight {changed:.2e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate_speed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
