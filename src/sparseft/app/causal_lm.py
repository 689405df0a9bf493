"""Instruction tuning of a causal LM: chat data, answer-only loss, perplexity, generations, one run.

Data are conversations (lists of ``{"role", "content"}`` messages ending with an assistant turn):
the embedded chatterbot-corpus English Q/A pairs, or the user's JSONL of ``{"prompt",
"response"}`` or ``{"messages": [...]}`` rows. Each conversation is rendered with the model's chat
template; the loss covers only the assistant tokens (labels are -100 on the system prompt, the
user turns and the template's role markers), so the held-out loss is the answer negative
log-likelihood per answer token and ``perplexity = exp(eval_loss)``.

The split is fixed and group-disjoint: a conversation is held out by a hash of its first user
message, so the same question (chatterbot has several answers to some) never sits on both sides.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..gradients import move_batch
from .data import read_jsonl
from ..errors import DataError
from ..methods import DEFAULT_METHOD, canonical, default_lrs, method_spec, prepare
from .placement import Placement, placement_of, resolve
from ..fingerprint import backbone_fingerprint, quantized_weights
from .train import RunRecord, fit, load_causal_lm, run_identity, save_run

Conversation = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
# Learning rates for short instruction-tuning runs of a small LLaMA (SmolLM2-135M, batch 16): the
# registry's "causal-lm" rates.
DEFAULT_LR = default_lrs("causal-lm")


# ----------------------------------------------------------------------------- data
def chatterbot_conversations(directory: str | Path | None = None) -> list[Conversation]:
    """chatterbot-corpus English: each ``conversations`` entry [q, a, q, a, ...] becomes
    alternating user/assistant turns (a trailing unanswered line is dropped)."""
    import yaml

    from .resources import chatterbot_english_dir

    root = Path(directory) if directory is not None else chatterbot_english_dir()
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(f"No chatterbot *.yml files in {root}: reinstall chatterbot-corpus==1.3.3 (pip install --no-deps).")
    out: list[Conversation] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for lines in doc.get("conversations", []) or []:
            texts = [str(x).strip() for x in lines if x is not None]
            texts = texts[: len(texts) // 2 * 2]
            if texts and all(texts):
                out.append([{"role": ROLES[1 + i % 2], "content": t} for i, t in enumerate(texts)])
    return out


def _conversation_of(row: dict, where: str) -> Conversation:
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
        out = []
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: message {j} must be {{'role': one of {list(ROLES)}, 'content': a string}}, got {m!r:.80}."
                )
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer (role 'assistant') to train on.")
        if len(out) < 2:
            raise DataError(f"{where}: the assistant's answer needs a user message before it to answer.")
        return out
    if "prompt" in row and "response" in row:
        prompt, response = row["prompt"], row["response"]
        if not isinstance(prompt, str) or not isinstance(response, str) or not prompt.strip() or not response.strip():
            raise DataError(f"{where}: 'prompt' and 'response' must be non-empty strings.")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    raise DataError(
        f"{where}: each line needs {{'prompt': ..., 'response': ...}} or {{'messages': [{{'role': ..., "
        f"'content': ...}}, ...]}}; this one has keys {sorted(row)}."
    )


def load_chat_jsonl(path: str | Path) -> list[Conversation]:
    """The user's chat data: JSONL (optionally .gz/.bz2), one conversation per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"No data file at {path}.")
    if not path.name.removesuffix(".gz").removesuffix(".bz2").endswith((".jsonl", ".json")):
        raise DataError(f"{path}: causal-LM data must be JSONL (.jsonl, optionally .gz/.bz2) with prompt/response or messages.")
    out = [_conversation_of(row, f"{path}: line {i}") for i, row in read_jsonl(path)]
    if len(out) < 10:
        raise DataError(f"{path} has {len(out)} conversation(s); at least a few dozen are needed (some are held out).")
    return out


def split_conversations(convs: list[Conversation], held_out: float = 0.15, salt: str = "sparseft-chat",
                        held_name: str = "test") -> dict[str, list[Conversation]]:
    """Fixed, group-disjoint split into train / ``held_name`` by a hash of the first user message."""
    parts: dict[str, list[Conversation]] = {"train": [], held_name: []}
    for conv in convs:
        first = next((m["content"] for m in conv if m["role"] == "user"), conv[0]["content"])
        u = int(hashlib.sha256(f"{salt}:{first.strip().lower()}".encode()).hexdigest()[:12], 16) / 16**12
        parts[held_name if u < held_out else "train"].append(conv)
    for name, rows in parts.items():
        if not rows:
            raise DataError(f"The {name} split is empty ({len(convs)} conversations): use more data.")
    return parts


def load_chat_splits(data: str | Path | None = None) -> dict[str, list[Conversation]]:
    """Train/test conversations: the user's JSONL, or chatterbot-corpus English by default."""
    return split_conversations(load_chat_jsonl(data) if data else chatterbot_conversations())


def carve_validation(splits: dict[str, list[Conversation]], share: float = 0.1) -> dict[str, list[Conversation]]:
    """train / validation / test: about ``share`` of train held out for choosing learning rates,
    group-disjoint like the test part (chatterbot repeats a question with several answers; a
    random carve of 189 put 139 questions on both sides)."""
    carved = split_conversations(splits["train"], held_out=share, salt="sparseft-chat-validation", held_name="validation")
    return carved | {"test": splits["test"]}


def _render(tokenizer, messages: Conversation, generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages: Conversation, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of the templated conversation and labels: the ids on assistant tokens (the
    answer and its end-of-turn marker), -100 elsewhere; right-truncated to ``max_length``."""
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1])
        if full[: len(prefix)] != prefix or prefix[: len(ids)] != ids:
            raise DataError(
                "The chat template does not render a conversation as a prefix of its continuation, so "
                "answer tokens cannot be told apart; use a model whose template appends turns."
            )
        labels += [-100] * (len(prefix) - len(ids)) + full[len(prefix) :]
        ids = full
    return ids[:max_length], labels[:max_length]


def encode_chat(tokenizer, convs: list[Conversation], max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors (input_ids, attention_mask, labels); conversations whose answer is cut
    away entirely by ``max_length`` are dropped."""
    if tokenizer.chat_template is None:
        raise DataError("This tokenizer has no chat template; instruction tuning needs one (an -Instruct/-Chat model).")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [encode_conversation(tokenizer, c, max_length) for c in convs]
    rows = [(i, lab) for i, lab in rows if any(x != -100 for x in lab)]
    if not rows:
        raise DataError(f"No answer token is left within --max-length {max_length}: raise --max-length.")
    width = max(len(i) for i, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        input_ids[r, : len(i)] = torch.tensor(i)
        labels[r, : len(lab)] = torch.tensor(lab)
        mask[r, : len(i)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer_loss(model: torch.nn.Module, data: dict[str, torch.Tensor], batch_size: int = 16,
                placement: Placement | None = None) -> float:
    """Mean negative log-likelihood per answer token (labels ≠ -100) over ``data``, on the
    model's device (in ``placement``'s precision; the loss itself in float32)."""
    placement = placement or placement_of(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    n = data["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        batch = {k: v[start : start + batch_size] for k, v in data.items()}
        width = max(1, int(batch["attention_mask"].sum(1).max()))
        batch = move_batch({k: v[:, :width] for k, v in batch.items()}, device)
        with placement.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        target = batch["labels"][:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((target != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def generate_answers(model, tokenizer, convs: list[Conversation], max_new_tokens: int = 32,
                     placement: Placement | None = None) -> list[str]:
    """Greedy (deterministic) answers to the last user turn of each conversation."""
    placement = placement or placement_of(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    for conv in convs:
        prompt = conv[:-1] if conv[-1]["role"] == "assistant" else conv
        ids = torch.tensor([_render(tokenizer, prompt, generation_prompt=True)], device=device)
        with placement.autocast():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


# ----------------------------------------------------------------------------- one run
@dataclass
class CausalLMSettings:
    """One instruction-tuning run. ``model_dir`` None: the cached SmolLM2-135M-Instruct."""

    method: str = DEFAULT_METHOD
    lr: float | None = None
    steps: int = 100  # `sparseft train --task causal-lm`'s default (cli.TRAIN_DEFAULTS): longer memorises chatterbot
    seed: int = 0
    rank: int = 8
    density: float | None = None
    support_narrow: int | str | None = None  # SparseGrad: leading directions of each layer's narrow side
    quantize: str | None = None  # the base's linear layers loaded quantized: "4bit" or "8bit" (bitsandbytes)
    model_dir: str | None = None
    batch_size: int = 16  # the command line's --batch-size default, which every measured decoder run used
    max_length: int = 128
    calibration_steps: int = 10
    warmup_fraction: float = 0.06
    eval_examples: int | None = 200  # held-out conversations scored (None: all)
    eval_split: str = "test"  # which of ``splits`` is scored: the bench's sweep scores "validation"
    eval_batch_size: int = 16
    generations: int = 3  # held-out prompts answered before/after
    max_new_tokens: int = 32
    show_progress: bool = True
    device: str = "auto"  # app.placement: auto, cpu, cuda, cuda:N
    precision: str = "auto"  # auto, fp32, bf16, fp16 (autocast)
    loss_every: int = 10
    reselect_every: int | None = None  # fixed-selection SparseGrad: re-choose 10% of the support every N steps
    checkpoint_dir: str | None = None  # save a training checkpoint here every `checkpoint_every` steps
    checkpoint_every: int = 0
    resume_dir: str | None = None  # continue from the latest checkpoint there (if any)
    save_dir: str | None = None  # save what was trained here (adapter, or the model for full)
    save_merged_dir: str | None = None  # and a plain merged model here
    merged_dtype: str = "auto"  # its dtype: auto (the checkpoint's), fp32, bf16, fp16
    data: dict[str, Any] | None = None  # where the conversations came from: kept with what is saved


@dataclass(kw_only=True)
class CausalLMResult(RunRecord):
    eval_loss: float
    perplexity: float
    eval_loss_before: float
    perplexity_before: float
    eval_examples: int
    task: str = "causal-lm"
    eval_split: str = "test"
    generations: list[dict[str, str]] = field(default_factory=list)


def run_causal_lm(
    settings: CausalLMSettings, splits: dict[str, list[Conversation]] | None = None, tokenizer=None
) -> dict[str, Any]:
    """Instruction-tune with ``settings.method``; returns the results-contract record (a dict)
    with held-out ``eval_loss``/``perplexity`` after training and ``*_before``, trainable params,
    state bytes, peak RSS, median step time, and greedy generations before/after."""
    from transformers import AutoTokenizer

    from .resources import smollm2_dir

    t_start = time.perf_counter()
    method = canonical(settings.method)
    lr = settings.lr if settings.lr is not None else DEFAULT_LR[method]
    model_dir = settings.model_dir or str(smollm2_dir())
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    splits = splits or load_chat_splits()
    scored = splits[settings.eval_split]
    held = scored[: settings.eval_examples] if settings.eval_examples else scored
    train = encode_chat(tokenizer, splits["train"], settings.max_length)
    evaluation = encode_chat(tokenizer, held, settings.max_length)
    shown: list[Conversation] = []  # held-out conversations to answer, one per distinct prompt
    for conv in held:
        if len(shown) < settings.generations and conv[-2]["content"] not in {c[-2]["content"] for c in shown}:
            shown.append(conv)

    placement = resolve(settings.device, settings.precision)
    model = placement.move(load_causal_lm(model_dir, settings.seed, settings.quantize, placement))
    base, skipped = backbone_fingerprint(model), quantized_weights(model)
    loss_before = answer_loss(model, evaluation, settings.eval_batch_size, placement)
    before = generate_answers(model, tokenizer, shown, settings.max_new_tokens, placement) if shown else []
    prepared = prepare(method, model, rank=settings.rank, density=settings.density, support_narrow=settings.support_narrow)
    model = prepared.model

    loop = fit(prepared, train, lr=lr, method=method, steps=settings.steps, seed=settings.seed,
               batch_size=settings.batch_size, calibration_steps=settings.calibration_steps,
               warmup_fraction=settings.warmup_fraction, loss_every=settings.loss_every,
               show_progress=settings.show_progress, placement=placement,
               reselect_every=settings.reselect_every if method_spec(method).reselects else None,
               resume_dir=settings.resume_dir, checkpoint_dir=settings.checkpoint_dir,
               checkpoint_every=settings.checkpoint_every, identity=run_identity(settings, method, train, base))
    loss_after = answer_loss(model, evaluation, settings.eval_batch_size, placement)
    after = generate_answers(model, tokenizer, shown, settings.max_new_tokens, placement) if shown else []
    save_run(model, tokenizer, settings, base, model_dir, skipped, task="causal-lm", method=method, eval_loss=loss_after,
             eval_examples=int(evaluation["input_ids"].shape[0]))  # (last: a merged save uses the model up)
    generations = [
        {"prompt": c[-2]["content"] if len(c) > 1 else "", "reference": c[-1]["content"], "before": b, "after": a}
        for c, b, a in zip(shown, before, after)
    ]
    return CausalLMResult(
        method=method,
        seed=settings.seed,
        lr=lr,
        eval_loss=loss_after,
        perplexity=math.exp(loss_after),
        eval_loss_before=loss_before,
        perplexity_before=math.exp(loss_before),
        steps=settings.steps,
        eval_examples=int(evaluation["input_ids"].shape[0]),
        eval_split=settings.eval_split,
        generations=generations,
        **loop.record(prepared, t_start),
    ).to_dict()


# ----------------------------------------------------------------------------- memory at scale
def sparsegrad_memory(hidden: int, intermediate: int, layers: int, rank: int = 8, model_bytes: int = 2,
                      rotation: str = "narrow") -> dict[str, int]:
    """Bytes SparseGrad needs on a LLaMA-shaped model (MLP gate/up: hidden→intermediate, down:
    intermediate→hidden), with the budget of LoRA at ``rank`` (k = r·(m+n) per layer).

    - ``gram_bytes``: calibration Grams, float32, all three groups at once: 3·H²·4 with the
      default ``rotation="narrow"`` (each group rotates its H side only), 3·(I² + H²)·4 with "both".
    - ``bases_bytes``: the rotated sides' bases in the model dtype: 3·H² (or 3·(I² + H²)) numbers.
    - ``fixed_state_bytes``: fixed selection: values + gradient + AdamW moments (float32, 16 B per
      entry) and the support index (``support_index_bytes``: an int32 position per entry, and
      the distinct rows R and columns C, int64, at most H + I of them per layer).
    - ``dynamic_state_bytes``: dynamic selection: the dense float32 delta and its gradient per
      layer (8 B per weight) plus SparseAdamW state for 8·k entries (32 B each).
    - ``lora_state_bytes``: LoRA at ``rank`` on the same layers (float32 params, grads, AdamW).
    - ``support_scores_bytes``: a gradient support criterion scores a float32 m×n per layer (in
      chunks of ``calibrate(max_score_bytes=...)``; the default random support scores nothing).
    """
    mn = hidden * intermediate
    n_layers = 3 * layers
    k = rank * (hidden + intermediate)
    basis_numbers = 3 * (hidden**2 if rotation == "narrow" else intermediate**2 + hidden**2)
    return {
        "k_per_layer": k,
        "gram_bytes": basis_numbers * 4,
        "bases_bytes": basis_numbers * model_bytes,
        "support_index_bytes": n_layers * (4 * k + 8 * (hidden + intermediate)),
        "fixed_state_bytes": n_layers * (16 * k + 4 * k + 8 * (hidden + intermediate)),
        "dynamic_state_bytes": n_layers * (mn * 8 + 8 * k * 32),
        "lora_state_bytes": n_layers * k * 16,
        "support_scores_bytes": n_layers * mn * 4,
        "mlp_weight_bytes": n_layers * mn * model_bytes,
    }


__all__ = [
    "CausalLMSettings",
    "answer_loss",
    "carve_validation",
    "chatterbot_conversations",
    "encode_chat",
    "encode_conversation",
    "generate_answers",
    "load_chat_jsonl",
    "load_chat_splits",
    "run_causal_lm",
    "sparsegrad_memory",
    "split_conversations",
]
