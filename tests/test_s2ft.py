"""S2FT: exact equality with the base model before training and after merge, only the chosen
slices move, budgets match LoRA, gradient selection, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from sparseft.errors import AdapterMismatchError, ConfigError, NotCalibratedError
from sparseft.s2ft import S2FTConfig, S2FTLinear, find_mlp_blocks, get_s2ft_model
from sparseft.targets import weight_of


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=48, max_position_embeddings=32, num_labels=2, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=32, num_labels=2, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2ForSequenceClassification(cfg).eval()


BUILDERS = {"bert": bert, "llama": llama, "gpt2": gpt2}


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1, 100, (4, 10), generator=g), "attention_mask": torch.ones(4, 10, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=g)}


def train_step(model, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    model(**batch(2)).loss.backward()
    opt.step()
    model.eval()
    return opt


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_blocks_pair_in_and_out(arch):
    blocks = find_mlp_blocks(BUILDERS[arch]())
    assert len(blocks) == 2
    ins = {t.name.rsplit(".", 1)[-1] for b in blocks for t in b.inputs}
    outs = {t.name.rsplit(".", 1)[-1] for b in blocks for t in b.outputs}
    assert (ins, outs) == {"bert": ({"dense"}, {"dense"}), "llama": ({"gate_proj", "up_proj"}, {"down_proj"}),
                           "gpt2": ({"c_fc"}, {"c_proj"})}[arch]
    assert all(b.intermediate == {"bert": 64, "llama": 48, "gpt2": 128}[arch] for b in blocks)
    if arch == "bert":  # the MLP's output.dense, never attention.output.dense
        assert all(".intermediate." in t.name for b in blocks for t in b.inputs)
        assert all(".attention." not in t.name for b in blocks for t in b.outputs)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_equal_before_training_then_merge_equals_trained(arch):
    base = BUILDERS[arch]()
    with torch.no_grad():
        ref = base(**batch()).logits.clone()
    s2 = get_s2ft_model(base, S2FTConfig(match_lora_rank=2))
    with torch.no_grad():
        torch.testing.assert_close(s2(**batch()).logits, ref, rtol=0, atol=0)
    train_step(s2)
    with torch.no_grad():
        trained = s2(**batch()).logits.clone()
    assert not torch.allclose(trained, ref)
    merged = s2.merge_and_unload()
    assert type(merged) is type(BUILDERS[arch]())
    assert not any(isinstance(m, S2FTLinear) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch()).logits, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_only_chosen_slices_change(arch):
    model = BUILDERS[arch]()
    before = {n: weight_of(m).detach().clone() for n, m in model.named_modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2}
    all_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s2 = get_s2ft_model(model, S2FTConfig(match_lora_rank=2, seed=3))
    layers = s2.s2ft_layers()
    channels = {n: layer.channels.clone() for n, layer in layers.items()}
    train_step(s2)
    merged = s2.merge_and_unload()
    for name, layer_channels in channels.items():
        W = weight_of(merged.get_submodule(name))
        changed = (W != before[name])
        mask = torch.zeros_like(changed)
        if layers[name].axis == "rows":
            mask[layer_channels] = True
        else:
            mask[:, layer_channels] = True
        assert changed[mask].any()
        assert not changed[~mask].any(), f"{name} changed outside its slice"
    for name, p in merged.named_parameters():
        if name.split(".")[0] in ("classifier", "score") or any(name.startswith(n + ".") for n in channels):
            continue
        assert torch.equal(p, all_before[name]), f"{name} should be frozen"


def test_budget_matches_lora_rank():
    from peft import LoraConfig, get_peft_model

    for rank in (1, 2, 4):
        s2 = get_s2ft_model(llama(), S2FTConfig(match_lora_rank=rank))
        lora = get_peft_model(llama(), LoraConfig(r=rank, target_modules=["gate_proj", "up_proj", "down_proj"], modules_to_save=["score"]))
        ours, lora_count = s2.get_nb_trainable_parameters()[0], lora.get_nb_trainable_parameters()[0]
        per_channel = 3 * 32  # two rows of width 32 and one column of height 32
        assert abs(ours - lora_count) <= 2 * per_channel / 2  # |S| is rounded: within half a channel per block
    # MiniLM-sized block (h=384, I=1536) at r=8: 40 channels, exactly LoRA's count
    cfg = BertConfig(vocab_size=10, hidden_size=384, num_hidden_layers=1, num_attention_heads=2, intermediate_size=1536, num_labels=2)
    s2 = get_s2ft_model(BertForSequenceClassification(cfg), S2FTConfig(match_lora_rank=8))
    assert [len(c) for c in s2.channels().values()] == [40]
    head = 384 * 2 + 2
    assert s2.get_nb_trainable_parameters()[0] - head == 8 * 2 * (384 + 1536)


def test_density_and_random_seed():
    a = get_s2ft_model(bert(), S2FTConfig(match_lora_rank=None, density=0.25, seed=0)).channels()
    b = get_s2ft_model(bert(), S2FTConfig(match_lora_rank=None, density=0.25, seed=0)).channels()
    c = get_s2ft_model(bert(), S2FTConfig(match_lora_rank=None, density=0.25, seed=1)).channels()
    assert a == b and a != c
    assert all(len(v) == 16 for v in a.values())
    assert len(set(map(tuple, a.values()))) == 2  # blocks draw different channels


def test_trainable_parameters_are_small_slices():
    s2 = get_s2ft_model(bert(), S2FTConfig(match_lora_rank=2))
    trainable = {n: p for n, p in s2.named_parameters() if p.requires_grad}
    assert all(n.endswith(".delta") or ".classifier." in n for n in trainable)
    assert s2.get_nb_trainable_parameters()[0] == sum(p.numel() for p in trainable.values())
    opt = train_step(s2)
    state = sum(v.numel() for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    assert state == 2 * s2.get_nb_trainable_parameters()[0]


def test_gradient_selection_picks_largest_gradient_channels():
    model = bert()
    s2 = get_s2ft_model(model, S2FTConfig(match_lora_rank=None, density=0.125, selection="gradient"))
    s2.train()
    with pytest.raises(NotCalibratedError):
        s2(**batch())
    # reference: per-channel squared gradient norms of the plain model
    ref = bert()
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(**batch(5)).loss.backward()
    layer0 = ref.bert.encoder.layer[0]
    score = layer0.intermediate.dense.weight.grad.pow(2).sum(1) + layer0.output.dense.weight.grad.pow(2).sum(0)
    expected = torch.topk(score, 8).indices.sort().values.tolist()
    rng = torch.get_rng_state()
    chosen = s2.calibrate([batch(5)], steps=1, loss_fn=lambda out, b: out.loss + 0 * torch.rand(()))  # draws from the RNG
    assert torch.equal(torch.get_rng_state(), rng)  # the RNG is put back
    assert s2.training  # and the mode
    assert chosen["bert.encoder.layer.0"] == expected
    assert all(p.grad is None for p in s2.parameters())
    assert all(not p.requires_grad for n, p in s2.named_parameters() if "base_layer" in n)
    train_step(s2)


def test_save_and_load_round_trip(tmp_path):
    s2 = get_s2ft_model(gpt2(), S2FTConfig(match_lora_rank=2, seed=4))
    train_step(s2)
    with torch.no_grad():
        want = s2(**batch()).logits
    s2.save_pretrained(tmp_path)
    loaded = type(s2).from_pretrained(gpt2(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, want)
    with pytest.raises(AdapterMismatchError):
        type(s2).from_pretrained(bert(), tmp_path)


def test_bad_config_is_explained():
    with pytest.raises(ConfigError, match="budget"):
        S2FTConfig(match_lora_rank=None, density=None)
    with pytest.raises(ConfigError, match="density"):
        S2FTConfig(match_lora_rank=None, density=1.5)
    with pytest.raises(ConfigError, match="selection"):
        S2FTConfig(selection="magnitude")
    with pytest.raises(ConfigError, match="channels"):
        get_s2ft_model(bert(), S2FTConfig(match_lora_rank=64))
    s2 = get_s2ft_model(bert())
    with pytest.raises(ConfigError, match="already"):
        get_s2ft_model(s2.base_model)


def test_an_adapter_loads_onto_its_base_held_in_another_precision(tmp_path):
    """Trained on a bf16 copy of the base, loaded onto the float32 one: the fingerprint's hash
    differs by rounding, the samples agree to bf16's precision; a base with 1% noise is refused."""
    from conftest import with_weights

    torch.manual_seed(0)
    weights = gpt2().state_dict()

    def base(dtype=torch.float32, noise=0.0):
        return with_weights(gpt2, weights, dtype, noise)

    s2 = get_s2ft_model(base(torch.bfloat16), S2FTConfig(match_lora_rank=2, seed=4))
    s2.save_pretrained(tmp_path)
    type(s2).from_pretrained(base(), tmp_path)
    with pytest.raises(AdapterMismatchError, match="other base weights"):
        type(s2).from_pretrained(base(noise=0.01), tmp_path)
