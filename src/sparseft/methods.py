"""The fine-tuning methods the jobs run, by name, each set up on a fresh model.

``prepare(name, model, rank=...)`` returns the model to train, the optimizer to use, whether
calibration is needed and the trainable-parameter count. Sparse methods get the budget of LoRA
at ``rank`` on the same layers (k = r·(m+n) per layer) unless ``density`` is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import MePropConfig, SparseGradConfig
from .errors import ConfigError
from .model import SparseModel, get_sparse_model
from .optim import SparseAdamW
from .targets import find_heads, find_targets

METHODS = ("full", "head", "lora-mlp", "lora-attn", "meprop", "sparsegrad-fixed", "sparsegrad-dynamic", "s2ft")
ALIASES = {"sparsegrad": "sparsegrad-fixed", "lora": "lora-mlp"}
# Starting points; override with --lr, or let `sparseft bench` sweep them on validation data.
# sparsegrad-fixed's 1e-3 was the best of two validation points on the embedded task (docs/sparsegrad.md).
DEFAULT_LR = {
    "full": 5e-5,
    "head": 1e-3,
    "lora-mlp": 5e-4,
    "lora-attn": 5e-4,
    "meprop": 2e-4,
    "sparsegrad-fixed": 1e-3,
    "sparsegrad-dynamic": 3e-4,
    "s2ft": 2e-4,
}

_ATTENTION = re.compile(
    r".*(attention\.self\.(query|key|value)|attention\.output\.dense|self_attn\.(q|k|v|o)_proj|attn\.(c_attn|c_proj)|attention\.(q_lin|k_lin|v_lin|out_lin))"
)


def canonical(method: str) -> str:
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise ConfigError(f"Unknown method {method!r}; choose from {', '.join(METHODS)} (or 'sparsegrad').")
    return name


@dataclass
class Prepared:
    model: nn.Module
    make_optimizer: Callable[[float], torch.optim.Optimizer]
    needs_calibration: bool
    trainable_params: int
    sparse: SparseModel | None = None


def _adamw(model: nn.Module) -> Callable[[float], torch.optim.Optimizer]:
    return lambda lr: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def _lora(model: nn.Module, targets: list[str], rank: int, heads: list[str]) -> Prepared:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, modules_to_save=heads or None)
    peft_model = get_peft_model(model, config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return Prepared(peft_model, _adamw(peft_model), False, int(trainable))


def prepare(method: str, model: nn.Module, rank: int = 8, density: float | None = None,
            support_narrow: int | None = None) -> Prepared:
    """Set ``model`` up for ``method``; the model is modified in place or wrapped.
    ``support_narrow`` (SparseGrad only): see :class:`sparseft.config.SparseGradConfig`."""
    method = canonical(method)
    heads = find_heads(model, None)
    budget = {"density": density} if density is not None else {"density": None, "match_lora_rank": rank}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Prepared(model, _adamw(model), False, sum(p.numel() for p in model.parameters()))
    if method == "head":
        if not heads:
            raise ConfigError("Method 'head' needs a task head named classifier/score in the model.")
        for name, p in model.named_parameters():
            p.requires_grad_(any(name == h or name.startswith(h + ".") for h in heads))
        return Prepared(model, _adamw(model), False, sum(p.numel() for p in model.parameters() if p.requires_grad))
    if method == "lora-mlp":
        return _lora(model, [t.name for t in find_targets(model)], rank, heads)
    if method == "lora-attn":
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _ATTENTION.fullmatch(n)]
        if not names:
            raise ConfigError(f"No attention projections found in {type(model).__name__} for lora-attn.")
        return _lora(model, names, rank, heads)
    if method == "s2ft":
        from .s2ft import S2FTConfig, get_s2ft_model

        s2 = get_s2ft_model(model, S2FTConfig(match_lora_rank=rank if density is None else None, density=density))
        return Prepared(s2, _adamw(s2), False, s2.get_nb_trainable_parameters()[0])
    if method == "meprop":
        sparse = get_sparse_model(model, MePropConfig(selection="dynamic", **budget))
        make = lambda lr: SparseAdamW([p for p in sparse.parameters() if p.requires_grad], lr=lr)  # noqa: E731
        return Prepared(sparse, make, False, sparse.get_nb_trainable_parameters()[0], sparse)
    selection = "fixed" if method == "sparsegrad-fixed" else "dynamic"
    sparse = get_sparse_model(model, SparseGradConfig(selection=selection, support_narrow=support_narrow, **budget))
    if selection == "fixed":
        make = _adamw(sparse)
    else:
        make = lambda lr: SparseAdamW([p for p in sparse.parameters() if p.requires_grad], lr=lr)  # noqa: E731
    return Prepared(sparse, make, True, sparse.get_nb_trainable_parameters()[0], sparse)
