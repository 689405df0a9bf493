"""``trl.SFTTrainer`` trains a SparseModel: a tiny random-init LLaMA with SmolLM2's tokenizer and
chat template (converted once from the offline GGUF), on a few chatterbot-corpus Q/A pairs.

TRL (≥ 1.x) patches ``model.forward`` with a fused LM head that expects ``model.base_model`` to be
the backbone; ``sparseft.hf.move_trl_fused_head(trainer.model)`` moves it onto the wrapped model.
Skipped when trl is not installed (``pip install -e .[dev]`` installs it).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.integration  # SmolLM2's tokenizer (converted from the GGUF once)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from sparseft import ConfigError, SparseGradConfig, get_sparse_model  # noqa: E402
from sparseft.app.resources import smollm2_dir  # noqa: E402
from sparseft.hf import SparseGradCallback, move_trl_fused_head, sparse_optimizer  # noqa: E402

QA = [("What is AI?", "Artificial Intelligence is the branch of engineering devoted to machines that think."),
      ("Are you sentient?", "Sort of."), ("Are you sapient?", "Do you think I am?"),
      ("What language are you written in?", "Python."), ("Do you drink?", "My brain does not require any beverages."),
      ("Hello", "Hi there, how are you?")]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir())


def sft_trainer(tokenizer, tmp_path, selection: str = "fixed", **kw):
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]} for q, a in QA]
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id))
    model = get_sparse_model(base, SparseGradConfig(match_lora_rank=2, selection=selection))
    ids = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], return_dict=True, return_tensors="pt")["input_ids"]
           for r in rows[:2]]
    model.calibrate([{"input_ids": i, "labels": i} for i in ids], steps=2, show_progress=False)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=3, learning_rate=3e-2,
                         logging_steps=1, use_cpu=True, report_to="none", save_strategy="no", max_length=64,
                         disable_tqdm=True, seed=0, **kw)
    extra = {"optimizers": (sparse_optimizer(model, args), None)} if selection == "dynamic" else {}
    dataset = datasets.Dataset.from_list(rows)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                             processing_class=tokenizer, callbacks=[SparseGradCallback()], **extra)
    return model, trainer


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_sft_trainer_trains_a_sparse_model(tokenizer, tmp_path, selection):
    model, trainer = sft_trainer(tokenizer, tmp_path, selection)
    assert move_trl_fused_head(trainer.model)
    assert not move_trl_fused_head(trainer.model)  # moved once
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < loss_before - 0.05
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert all(n.endswith((".values", ".delta")) for n in before)  # only the adapters trained
    assert model.save_pretrained(tmp_path / "adapter")["values"] >= sum(layer.k for layer in model.sparse_layers().values())

def test_forgetting_to_move_the_fused_head_is_a_clear_error(tokenizer, tmp_path):
    _, trainer = sft_trainer(tokenizer, tmp_path)
    with pytest.raises(ConfigError, match="move_trl_fused_head"):
        trainer.train()
