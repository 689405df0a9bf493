"""Tiny random-init models of each supported architecture, and batches for them."""

from __future__ import annotations

import copy
import os
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_triton_kernels.py). The
# variable is read when triton is imported, which peft and transformers do: set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

VOCAB = 97


def tiny_bert(num_labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg)


def tiny_roberta(num_labels: int = 2):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        max_position_embeddings=70, num_labels=num_labels, pad_token_id=1)
    return RobertaForSequenceClassification(cfg)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def llama64():
    """A tiny LLaMA 64 wide: bitsandbytes' CPU 4-bit kernel takes blocks of 64 inputs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def load_nf4(checkpoint, device: str = "cpu", compute: torch.dtype = torch.float32):
    """``checkpoint`` loaded as `sparseft train --quantize 4bit` loads it (NF4, double quantization)
    onto ``device``, computing in ``compute``; never repacked for bitsandbytes' CPU inference."""
    import warnings

    from transformers import AutoModelForCausalLM

    from sparseft.quantized import keep_storage_layout, quantization_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map={"": device},
                                                     quantization_config=quantization_config("4bit", compute))
    keep_storage_layout(model)
    return model


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=80)
    return GPT2LMHeadModel(cfg)


def save_tiny_bert_checkpoint(out, max_position_embeddings: int):
    """A 2-layer random BERT classifier checkpoint with the embedded MiniLM tokenizer, for CLI tests."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sparseft.app.resources import default_model_dir

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=max_position_embeddings)).save_pretrained(out)
    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(out)
    return out


ARCHS = {"bert": tiny_bert, "roberta": tiny_roberta, "llama": tiny_llama, "gpt2": tiny_gpt2}


def make_batch(arch: str, seed: int, batch: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if arch in ("bert", "roberta"):
        out["labels"] = torch.randint(0, 2, (batch,), generator=g)
    else:
        out["labels"] = ids.clone()
    return out


def make_batches(arch: str, n: int = 6, start: int = 0) -> list[dict[str, torch.Tensor]]:
    return [make_batch(arch, start + i) for i in range(n)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


def adapted(arch: str, kind: str, seed: int = 0, calibrate: bool = True):
    """A tiny ``arch`` model adapted by ``kind`` (fixed / dynamic / meprop / one-sided SparseGrad
    configs at LoRA rank 2, or s2ft), calibrated on two batches, in eval mode."""
    from sparseft import MePropConfig, S2FTConfig, SparseGradConfig, get_s2ft_model, get_sparse_model

    torch.manual_seed(seed)
    model = ARCHS[arch]().eval()
    if kind == "s2ft":
        return get_s2ft_model(model, S2FTConfig(match_lora_rank=2))
    config = {"fixed": SparseGradConfig(match_lora_rank=2), "dynamic": SparseGradConfig(match_lora_rank=2, selection="dynamic"),
              "meprop": MePropConfig(match_lora_rank=2), "one-sided": SparseGradConfig(match_lora_rank=2, rotation="narrow")}[kind]
    tuner = get_sparse_model(model, config)
    if calibrate:
        tuner.calibrate([make_batch(arch, i) for i in range(2)], steps=2, show_progress=False)
    return tuner


def assert_save_load_merge_round_trip(model, fresh_base, tmp_path):
    """Give ``model``'s fixed values a random update, save it, load it onto ``fresh_base`` and
    check the loaded and the merged model compute what ``model`` does. Returns the loaded model."""
    from sparseft import SparseModel

    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.normal_(0, 0.05)
    batch = make_batch("bert", 9)
    batch.pop("labels")
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    spare = copy.deepcopy(fresh_base)  # from_pretrained adapts the model it is given in place
    loaded = SparseModel.from_pretrained(fresh_base, tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, expected)
    merged = SparseModel.from_pretrained(spare, tmp_path).merge_and_unload()
    torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    return loaded



class OpCounter(TorchDispatchMode):
    """Counts every aten op run inside it, by name (``ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def with_weights(make, weights: dict, dtype: torch.dtype = torch.float32, noise: float = 0.0):
    """``make()`` holding ``weights`` (each floating tensor times 1 + ``noise``·N(0, 1): another base
    of the same architecture), cast to ``dtype``."""
    model = make()
    model.load_state_dict({k: v * (1 + noise * torch.randn_like(v)) if v.is_floating_point() else v for k, v in weights.items()})
    return model.to(dtype)
