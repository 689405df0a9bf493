"""Find the MLP linear layers of a model and group them by role and shape.

A *group* is the set of layers that play the same role in every block (``intermediate.dense``
of each BERT layer, ``mlp.down_proj`` of each LLaMA layer) and share a shape; one basis pair
(P, Q) is calibrated per group. GPT-2's ``Conv1D`` stores its weight transposed (in×out); it is
handled everywhere through :func:`weight_of`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TargetError
from .quantized import check_supported, is_quantized

try:  # transformers' GPT-2 style layer: y = x @ W + b with W of shape (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # transformers not installed (the hf extra): plain nn.Linear layers only
    Conv1D = ()  # type: ignore[assignment]

# Known MLP layers per architecture family; names are matched as suffixes of module names.
_MLP_PATTERNS: tuple[str, ...] = (
    r"(?:^|.*\.)layer\.\d+\.intermediate\.dense",  # BERT, RoBERTa, ELECTRA, ...
    r"(?:^|.*\.)layer\.\d+\.output\.dense",  # their MLP output (not attention.output.dense)
    r"(?:^|.*\.)mlp\.(?:gate_proj|up_proj|down_proj)",  # LLaMA, Mistral, Qwen, Gemma, SmolLM
    r"(?:^|.*\.)mlp\.(?:c_fc|c_proj)",  # GPT-2 (Conv1D)
    r"(?:^|.*\.)mlp\.(?:fc1|fc2|dense_h_to_4h|dense_4h_to_h)",  # Phi, GPT-NeoX, ...
    r"(?:^|.*\.)(?:ffn|feed_forward)\.(?:\w+)",  # DistilBERT-like, T5-like
)
_MLP_REGEX = re.compile("|".join(f"(?:{p})" for p in _MLP_PATTERNS))


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """True for Conv1D, whose weight is stored (in, out)."""
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an (out=m, in=n) matrix, a view for Conv1D."""
    return module.weight.t() if is_transposed(module) else module.weight


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) = (m, n) of an adaptable layer, whatever its weight's storage (a 4-bit weight is
    packed into a k×1 byte tensor)."""
    if is_quantized(module):
        return int(module.out_features), int(module.in_features)
    m, n = weight_of(module).shape
    return int(m), int(n)


def store_weight(module: nn.Module, transposed: bool) -> bool:
    """Store the layer's weight (same values, same shape) so that ``weight_of(module)`` is
    row-major (``transposed=False``) or its transpose is (``True``); returns whether its storage
    changed. The parameter object stays the same (optimizers, hooks and ties are unaffected)."""
    p = module.weight
    flip = transposed != is_transposed(module)  # whether the view to make contiguous is p.t()
    wanted = p.data.t() if flip else p.data
    if wanted.is_contiguous():
        return False
    packed = wanted.contiguous()
    p.data = packed.t() if flip else packed
    return True


def pack_weight(module: nn.Module) -> None:
    """Store the layer's weight parameter contiguous again (as the model gave it)."""
    p = module.weight
    if not p.data.is_contiguous():
        p.data = p.data.contiguous()


@dataclass(frozen=True)
class Target:
    name: str  # module name inside the model
    group: str  # "<name pattern>:<m>x<n>"
    m: int  # out features
    n: int  # in features


def _group_of(name: str, m: int, n: int) -> str:
    # Layers that differ only by their block index share a role.
    role = re.sub(r"\.\d+\.", ".*.", name)
    return f"{role}:{m}x{n}"


def _matches(name: str, target_modules: list[str] | str) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def find_targets(model: nn.Module, target_modules: list[str] | str | None = None, shared: bool = True) -> list[Target]:
    """The adaptable layers of ``model``: its MLP layers, or those ``target_modules`` names.
    ``shared``: layers of one role share a group (one basis pair); False: each its own group."""
    found: list[Target] = []
    for name, module in model.named_modules():
        if not name:
            continue
        wanted = _matches(name, target_modules) if target_modules is not None else bool(_MLP_REGEX.fullmatch(name))
        if not wanted:
            continue
        check_supported(name, module)
        if not is_adaptable(module):
            if target_modules is not None and not any(True for _ in module.children()):
                raise TargetError(
                    f"target_modules selects {name!r}, a {type(module).__name__}; only nn.Linear and "
                    "transformers Conv1D layers can be adapted. Narrow target_modules."
                )
            continue
        m, n = layer_shape(module)
        group = _group_of(name, m, n) if shared else f"{name}:{m}x{n}"
        found.append(Target(name=name, group=group, m=int(m), n=int(n)))
    if not found:
        linear = [n for n, mod in model.named_modules() if is_adaptable(mod)][:8]
        how = f"target_modules={target_modules!r} matched" if target_modules is not None else "no known MLP layer pattern matched"
        raise TargetError(
            f"No MLP layer found in {type(model).__name__}: {how} no nn.Linear/Conv1D layer. "
            f"Pass target_modules= with names or a regex; some linear layers of this model: {linear}."
        )
    return found


def group_targets(targets: list[Target]) -> dict[str, list[Target]]:
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.group, []).append(t)
    return groups


def find_heads(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Module names trained densely: those named, or a task head called classifier/score."""
    names = dict(model.named_modules())
    if modules_to_save is not None:
        out = []
        for wanted in modules_to_save:
            hits = [n for n in names if n == wanted or n.endswith("." + wanted)]
            if not hits:
                raise TargetError(
                    f"modules_to_save names {wanted!r}, which is not a module of {type(model).__name__}."
                )
            out.extend(hits)
        return sorted(set(out))
    return sorted(n for n in names if n.split(".")[-1] in ("classifier", "score") and "." not in n)
