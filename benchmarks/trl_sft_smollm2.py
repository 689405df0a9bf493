"""``trl.SFTTrainer`` on SmolLM2-135M-Instruct (real weights) with a SparseGrad adapter.

    python benchmarks/trl_sft_smollm2.py [--steps 10] [--out benchmarks/results/trl_sft_smollm2.json]

SparseGrad (fixed selection) at the LoRA-rank-8 budget on the MLPs, calibrated on 2 batches;
chatterbot-corpus English conversations as TRL prompt/completion rows (the last assistant turn
is the completion, so the loss covers it only), 64 tokens, batch 4, lr 1e-3, float32 on CPU.
Prints the training losses and the held-out loss (16 held-out conversations) before and after.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)

    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparseft import SparseGradConfig, get_sparse_model
    from sparseft.app.causal_lm import encode_chat, load_chat_splits
    from sparseft.app.resources import smollm2_dir
    from sparseft.hf import SparseGradCallback, move_trl_fused_head

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    splits = load_chat_splits()

    def rows(convs):
        return Dataset.from_list([{"prompt": c[:-1], "completion": c[-1:]} for c in convs])

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    model = get_sparse_model(base, SparseGradConfig(match_lora_rank=8))
    calib = encode_chat(tokenizer, splits["train"][:8], max_length=64)
    model.calibrate([{k: v[i : i + 4] for k, v in calib.items()} for i in (0, 4)], steps=2, show_progress=False)
    config = trl.SFTConfig(output_dir="/tmp/trl_sft_smollm2", max_steps=args.steps, per_device_train_batch_size=4,
                           per_device_eval_batch_size=8, learning_rate=1e-3, lr_scheduler_type="constant",
                           logging_steps=1, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                           max_length=64, disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=rows(splits["train"][: 4 * args.steps]),
                             eval_dataset=rows(splits["test"][:16]), processing_class=tokenizer,
                             callbacks=[SparseGradCallback()])
    move_trl_fused_head(trainer.model)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"trl {trl.__version__}: train losses {[round(x, 4) for x in losses]}")
    print(f"held-out loss (16 conversations): {before:.4f} -> {after:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"trl": trl.__version__, "steps": args.steps, "train_losses": losses,
                                              "eval_loss_before": before, "eval_loss_after": after}, indent=2))


if __name__ == "__main__":
    main()
