"""Size and fidelity of `export_lora` on SmolLM2-135M-Instruct (real weights, offline).

    python benchmarks/export_smollm2.py --steps 4 --ranks 8,32,128

SparseGrad-fixed at LoRA r=8's budget on gate/up/down, calibrated on 2 batches and trained a few
AdamW steps on chatterbot Q/A; then `save_pretrained` (sparseft's own adapter), `export_lora` at
full rank and truncated, each export loaded by `peft.PeftModel.from_pretrained` onto a fresh base
and compared with the SparseModel's logits on held-out conversations. Writes
benchmarks/results/export_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

torch.set_num_threads(1)

from peft import PeftModel  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from sparseft import SparseGradConfig, get_sparse_model  # noqa: E402
from sparseft.app.causal_lm import encode_chat, load_causal_lm, load_chat_splits  # noqa: E402
from sparseft.app.data import batches  # noqa: E402
from sparseft.app.resources import smollm2_dir  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ranks", default="8,32,128")
    parser.add_argument("--support-narrow", type=int, help="SparseGradConfig.support_narrow: the update then has rank "
                        "at most this, so an export at that rank is exact (what a vLLM user trains with)")
    parser.add_argument("--out", default="benchmarks/results/export_smollm2.json")
    args = parser.parse_args()

    model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = load_chat_splits()
    train = encode_chat(tokenizer, splits["train"][:64], 64)
    held = encode_chat(tokenizer, splits["test"][:8], 64)
    probe = {k: v for k, v in held.items() if k in ("input_ids", "attention_mask")}

    tuner = get_sparse_model(load_causal_lm(model_dir), SparseGradConfig(selection="fixed", match_lora_rank=8,
                                                                         support_narrow=args.support_narrow))
    tuner.calibrate(batches(train, 4, seed=0, steps=2), steps=2, show_progress=False)
    opt = torch.optim.AdamW([p for p in tuner.parameters() if p.requires_grad], lr=1e-3)
    tuner.train()
    for batch in batches(train, 4, seed=1, steps=args.steps):
        tuner(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    tuner.eval()
    with torch.no_grad():
        ref = tuner(**probe).logits
        base_logits = None
        with tuner.disable_adapter():
            base_logits = tuner(**probe).logits
    update_size = (ref - base_logits).abs().max().item()
    result: dict = {"model": "SmolLM2-135M-Instruct", "trainable": sum(p.numel() for p in tuner.parameters() if p.requires_grad),
                    "steps": args.steps, "max_logit_change_from_base": update_size, "exports": []}
    with tempfile.TemporaryDirectory() as tmp:
        own = Path(tmp) / "sparseft"
        tuner.save_pretrained(own)
        result["sparseft_adapter_bytes"] = folder_bytes(own)
        for rank in [None, *[int(r) for r in args.ranks.split(",")]]:
            out = Path(tmp) / f"lora-{rank}"
            errors = tuner.export_lora(out, rank=rank)
            cfg = json.loads((out / "adapter_config.json").read_text())
            peft_model = PeftModel.from_pretrained(load_causal_lm(model_dir), out).eval()
            with torch.no_grad():
                got = peft_model(**probe).logits
            ranks = list(cfg.get("rank_pattern", {}).values()) or [cfg["r"]]
            row = {"rank": rank or "exact", "bytes": folder_bytes(out), "layer_ranks_min_mean_max":
                   [min(ranks), statistics.fmean(ranks), max(ranks)],
                   "rel_error_mean": statistics.fmean(errors.values()), "rel_error_max": max(errors.values()),
                   "max_abs_logit_diff": (got - ref).abs().max().item()}
            result["exports"].append(row)
            print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"sparseft adapter {result['sparseft_adapter_bytes']:,} bytes; trainable {result['trainable']:,}; "
          f"max |logit change| from base {update_size:.4f}")
    print("| export | bytes | layer ranks (min / mean / max) | rel. error mean / max | max abs logit diff vs SparseModel |")
    print("|---|---:|---|---|---:|")
    for r in result["exports"]:
        lo, mean, hi = r["layer_ranks_min_mean_max"]
        print(f"| rank={r['rank']} | {r['bytes']:,} | {lo} / {mean:.0f} / {hi} | {r['rel_error_mean']:.4f} / "
              f"{r['rel_error_max']:.4f} | {r['max_abs_logit_diff']:.2e} |")


if __name__ == "__main__":
    main()
