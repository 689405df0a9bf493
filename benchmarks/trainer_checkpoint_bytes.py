"""Bytes of one stock-``transformers.Trainer`` checkpoint of a SparseGrad model on SmolLM2-135M.

    python benchmarks/trainer_checkpoint_bytes.py [--selection fixed] [--out benchmarks/results/x.json]

SmolLM2-135M-Instruct (real weights, the offline GGUF converted by ``smollm2_dir()``), SparseGrad
at the LoRA-rank-8 budget on the MLPs, calibrated on 2 batches, then ``Trainer.train()`` for
``--steps`` steps on chatterbot-corpus Q/A conversations (answer-only labels, 64 tokens, batch 2)
with ``save_steps = --steps``: prints every file of the one checkpoint folder with its size in
bytes. Run it with the library before and after the adapter-only checkpoint change (e.g. with
``PYTHONPATH`` pointing at an export of the old ``src``) to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--selection", default="fixed", choices=["fixed", "dynamic"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import sparseft
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from sparseft import SparseGradConfig, get_sparse_model
    from sparseft.app.causal_lm import encode_chat, load_chat_splits
    from sparseft.app.resources import smollm2_dir
    from sparseft.hf import SparseGradCallback, sparse_optimizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    data = encode_chat(tokenizer, load_chat_splits()["train"][:64], max_length=64)
    rows = [{k: v[i] for k, v in data.items()} for i in range(len(data["input_ids"]))]
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    model = get_sparse_model(base, SparseGradConfig(match_lora_rank=8, selection=args.selection))
    model.calibrate([{k: v[i : i + 2] for k, v in data.items()} for i in (0, 2)], steps=2, show_progress=False)

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=2, max_steps=args.steps,
                                  save_strategy="steps", save_steps=args.steps, learning_rate=1e-3, use_cpu=True,
                                  report_to="none", disable_tqdm=True, logging_steps=1, seed=0)
        extra = {"optimizers": (sparse_optimizer(model, targs), None)} if args.selection == "dynamic" else {}
        trainer = Trainer(model=model, args=targs, train_dataset=rows, callbacks=[SparseGradCallback()], **extra)
        trainer.train()
        folder = Path(tmp) / f"checkpoint-{args.steps}"
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
        adapter = model.save_pretrained(Path(tmp) / "adapter")
    total = sum(files.values())
    print(f"sparseft {sparseft.__file__}")
    print(f"checkpoint-{args.steps} ({args.selection} selection):")
    for name, size in files.items():
        print(f"  {name:28s} {size:>13,d} bytes")
    print(f"  {'total':28s} {total:>13,d} bytes")
    print(f"save_pretrained adapter: {adapter}")
    record = {"selection": args.selection, "steps": args.steps, "files": files, "total_bytes": total,
              "save_pretrained": adapter, "sparseft": str(Path(sparseft.__file__).parent),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
