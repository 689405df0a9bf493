"""SparseModel inside the stock ``transformers.Trainer``, on a tiny random-init LLaMA.

Each Trainer feature the issue names is shown by a comparison that fails when the feature is
broken: accumulation = one large batch, checkpointing = no checkpointing, resume = uninterrupted
run, clipping = the expected update norm, schedulers = the expected learning rates.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from sparseft import SparseAdamW, SparseGradConfig, get_sparse_model
from sparseft.hf import SparseGradCallback, sparse_optimizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB, LENGTH = 96, 12


def tiny_llama(seed: int = 0, tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def dataset(n: int = 24, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Sequences with structure (token t+1 = token t + 1 mod 16 offset), all full length."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        start = int(torch.randint(0, VOCAB - LENGTH, (1,), generator=gen))
        ids = torch.arange(start, start + LENGTH)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": ids.clone()})
    return rows


def calibration_batches(data):
    return [{k: torch.stack([r[k] for r in data[i : i + 4]]) for k in data[0]} for i in range(0, 16, 4)]


def sparse_llama(selection: str = "fixed", tied: bool = False, calibrate: bool = True, rotation: str = "both"):
    model = get_sparse_model(tiny_llama(tied=tied), SparseGradConfig(selection=selection, density=0.05, rotation=rotation))
    if calibrate:
        model.calibrate(calibration_batches(dataset()), steps=4, show_progress=False)
    return model


def args(tmp_path, **kw) -> TrainingArguments:
    defaults = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    defaults.update(kw)
    return TrainingArguments(**defaults)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def train(model, tmp_path, dynamic: bool = False, resume=None, **kw) -> Trainer:
    a = args(tmp_path, **kw)
    extra = {"optimizers": (sparse_optimizer(model, a), None)} if dynamic else {}
    trainer = Trainer(model=model, args=a, train_dataset=dataset(), callbacks=[SparseGradCallback()], **extra)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def test_fixed_selection_trains_with_the_stock_optimizer(tmp_path):
    model = sparse_llama("fixed")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable(model)
    trainer = train(model, tmp_path, max_steps=8)
    assert type(trainer.optimizer.optimizer) is torch.optim.AdamW
    after = trainable(model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    # optimizer state is O(k): one moment pair per trained entry
    k = {p.numel() for p in model.parameters() if p.requires_grad}
    assert all(s["exp_avg"].numel() in k for s in trainer.optimizer.optimizer.state.values())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_gradient_accumulation_equals_the_large_batch(tmp_path, selection):
    dynamic = selection == "dynamic"
    big = sparse_llama(selection)
    train(big, tmp_path / "big", dynamic, per_device_train_batch_size=4)
    small = sparse_llama(selection)
    train(small, tmp_path / "small", dynamic, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    assert_same(trainable(big), trainable(small), atol=1e-5)
    if dynamic:  # still sparse: at most steps·k entries of each delta moved
        for layer in small.sparse_layers().values():
            assert 0 < int((layer.delta != 0).sum()) <= 4 * layer.k


def test_gradient_clipping_bounds_the_update(tmp_path):
    model = sparse_llama("fixed")
    before = trainable(model)
    trainer = train(model, tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, max_grad_norm=1e-3)
    grad_norm = next(h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h)
    assert grad_norm > 1e-2  # clipping was active
    after = trainable(model)
    step = torch.sqrt(sum(((after[n] - before[n]) ** 2).sum() for n in before))
    assert step == pytest.approx(1e-3, rel=1e-3)  # SGD step of lr·(clipped gradient)


class _LrLog(TrainerCallback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def test_lr_scheduler_drives_sparse_adamw(tmp_path):
    model = sparse_llama("dynamic")
    a = args(tmp_path, max_steps=6, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=2)
    optimizer = sparse_optimizer(model, a)
    log = _LrLog()
    trainer = Trainer(model=model, args=a, train_dataset=dataset(), optimizers=(optimizer, None), callbacks=[log])
    trainer.train()
    assert isinstance(optimizer, SparseAdamW)
    expected = [0.0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3]  # warm-up 2 steps, then linear decay to 0
    assert log.lrs == pytest.approx(expected)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_bf16_autocast_keeps_float32_adapter(tmp_path):
    model = sparse_llama("fixed")
    seen: list[torch.dtype] = []
    layer = next(iter(model.sparse_layers().values()))
    handle = layer.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype) if mod.training else None)
    before = trainable(model)
    trainer = train(model, tmp_path, bf16=True)
    handle.remove()
    assert torch.bfloat16 in seen  # the adapted layers ran under bf16 autocast
    assert all(p.dtype == torch.float32 for p in trainable(model).values())
    assert all(not torch.equal(before[n], p) for n, p in trainable(model).items())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, selection):
    dynamic = selection == "dynamic"
    plain = sparse_llama(selection)
    train(plain, tmp_path / "plain", dynamic)
    ckpt = sparse_llama(selection)
    train(ckpt, tmp_path / "ckpt", dynamic, gradient_checkpointing=True)
    assert ckpt.base_model.model.layers[0].gradient_checkpointing
    before = trainable(sparse_llama(selection))
    assert any(not torch.equal(before[n], p) for n, p in trainable(plain).items())
    assert_same(trainable(plain), trainable(ckpt), atol=1e-5)


@pytest.mark.parametrize("selection", ["fixed", "dynamic"])
def test_save_steps_and_resume_reproduce_the_uninterrupted_run(tmp_path, selection):
    dynamic = selection == "dynamic"
    full = sparse_llama(selection, tied=True)
    train(full, tmp_path / "run", dynamic, max_steps=6, save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    # a fresh model, *not* calibrated: bases, support and values all come from the checkpoint
    resumed = sparse_llama(selection, tied=True, calibrate=False)
    train(resumed, tmp_path / "resumed", dynamic, max_steps=6, save_strategy="steps", save_steps=3, resume=str(checkpoint))
    assert_same(trainable(full), trainable(resumed), atol=1e-6)
    # and the tied LM head is still the embedding after loading
    assert resumed.base_model.lm_head.weight is resumed.base_model.model.embed_tokens.weight


@pytest.mark.parametrize("selection,rotation", [("fixed", "both"), ("dynamic", "both"), ("fixed", "narrow")])
def test_state_dict_loads_onto_an_uncalibrated_model(selection, rotation):
    source = sparse_llama(selection, tied=True, rotation=rotation)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    state = source.state_dict()
    assert "base_model.lm_head.weight" not in state  # the tied alias is not stored twice
    assert any(k.startswith("bases.g") for k in state)
    target = sparse_llama(selection, tied=True, calibrate=False, rotation=rotation)
    assert not target.is_calibrated
    target.load_state_dict(state)  # strict
    assert target.is_calibrated
    ids = torch.arange(LENGTH).unsqueeze(0)
    source.eval(), target.eval()
    torch.testing.assert_close(source(input_ids=ids).logits, target(input_ids=ids).logits)


def test_sparse_adamw_state_keeps_integer_indices_through_save_and_load(tmp_path):
    p = torch.nn.Parameter(torch.zeros(2**13, 2**12))  # 2**25 entries: indices above 2**24
    p._sparseft_k = 4
    opt = SparseAdamW([p], lr=1e-3)
    p.grad = torch.zeros_like(p)
    p.grad.view(-1)[[3, 2**24 + 1, 2**25 - 1, 2**25 - 3]] = 1.0
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    q = torch.nn.Parameter(p.detach().clone())
    q._sparseft_k = 4
    fresh = SparseAdamW([q], lr=1e-3)
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert fresh.state[q]["index"].dtype == torch.long
    assert torch.equal(fresh.state[q]["index"], opt.state[p]["index"])


def test_trained_adapter_is_small_and_loads_onto_a_fresh_base(tmp_path):
    from sparseft import SparseModel

    model = sparse_llama("fixed", tied=True)
    train(model, tmp_path / "run")
    sizes = model.save_pretrained(tmp_path / "adapter")
    model_bytes = sum(p.numel() * p.element_size() for p in tiny_llama(tied=True).parameters())
    # O(k) values (+ the basis columns they use), not a copy of the model
    assert sizes["values"] == sum(layer.k for layer in model.sparse_layers().values())
    assert sizes["adapter_bytes"] < model_bytes
    loaded = SparseModel.from_pretrained(tiny_llama(tied=True), tmp_path / "adapter")
    ids = torch.arange(LENGTH).unsqueeze(0)
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    merged = loaded.merge_and_unload()
    assert type(merged) is LlamaForCausalLM
    torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    out = merged.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
