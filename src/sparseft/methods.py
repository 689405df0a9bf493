"""The method registry: every fine-tuning method the jobs run, by name.

A :class:`Method` says how to set a fresh model up (``build``), what it trains, its default
learning rate per task kind, and whether it needs calibration. ``prepare``, the CLI and the
bench read this registry only; adding a method is one :func:`register_method` call (with its
config and layer elsewhere).

``prepare(name, model, rank=...)`` returns the model to train, the optimizer to use, whether
calibration is needed and the trainable-parameter count. Sparse methods get the budget of LoRA
at ``rank`` on the same layers (k = r·(m+n) per layer) unless ``density`` is given.
"""

from __future__ import annotations

import math

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import MePropConfig, SparseGradConfig
from .errors import ConfigError

if TYPE_CHECKING:  # the registry itself loads no torch: the command line checks names first
    import torch
    from torch import nn

    from .model import SparseModel

# torch-backed helpers, imported when a method is built


def find_heads(model: Any, modules_to_save: Any) -> list[str]:
    from .targets import find_heads as find

    return find(model, modules_to_save)


def find_targets(model: Any, target_modules: Any = None) -> list:
    from .targets import find_targets as find

    return find(model, target_modules)


def get_sparse_model(model: Any, config: Any) -> "SparseModel":
    from .model import get_sparse_model as get

    return get(model, config)

_ATTENTION = re.compile(
    r".*(attention\.self\.(query|key|value)|attention\.output\.dense|self_attn\.(q|k|v|o)_proj|attn\.(c_attn|c_proj)|attention\.(q_lin|k_lin|v_lin|out_lin))"
)


@dataclass(frozen=True)
class Budget:
    """What a method may train: LoRA's count at ``rank`` on the same layers, or ``density``;
    ``support_narrow`` is SparseGrad's narrow-side restriction (see SparseGradConfig)."""

    rank: int = 8
    density: float | None = None
    support_narrow: int | str | None = None
    options: dict = field(default_factory=dict)  # a variant's config overrides: name[key=value;...]

    def sparse_kwargs(self) -> dict:
        budget = {"density": self.density} if self.density is not None else {"density": None, "match_lora_rank": self.rank}
        return {**budget, **self.options}


@dataclass
class Prepared:
    model: nn.Module
    make_optimizer: Callable[[float], torch.optim.Optimizer]
    needs_calibration: bool
    trainable_params: int
    sparse: SparseModel | None = None


@dataclass(frozen=True)
class Method:
    name: str
    trains: str  # one line for tables and --help
    build: Callable[[nn.Module, Budget], Prepared]
    # default learning rate per task kind: the starting point; `sparseft bench` sweeps around it
    lr: Mapping[str, float] = field(default_factory=dict)
    needs_head: bool = False  # only meaningful for models with a task head
    in_default_bench: bool = True  # part of plain `sparseft bench`'s default set (the suite picks its own)
    ablation: bool = False  # a variant for studies: runs by name, not listed in METHODS
    takes_options: bool = False  # variants by name: "sparsegrad-fixed[support_criterion=snr]"
    reselects: bool = False  # a fixed support that `--reselect-every N` may choose again during training

    def default_lr(self, task: str = "classification") -> float:
        """The rate for a task kind or run setting (a column of ``LEARNING_RATES``)."""
        return self.lr.get(task) or _FALLBACK_LR.get(task) or self.lr["classification"]


REGISTRY: dict[str, Method] = {}
# "sparsegrad" is SparseGradConfig()'s method (a fixed random support, the narrow side rotated);
# "sparsegrad-paper" the paper's (both sides rotated, a top-k every step)
ALIASES = {"sparsegrad": "sparsegrad-onesided", "sparsegrad-paper": "sparsegrad-dynamic", "lora": "lora-mlp"}
# The product's default (`sparseft train`, the README's first command): what the study's rule,
# written before its runs, chose with every configuration at its own swept rate: a random support
# with no rotation (docs/benchmark.md, "The swept reading").
DEFAULT_METHOD = "sparse-random"


def register_method(method: Method, aliases: Sequence[str] = ()) -> Method:
    """Make ``method`` known to ``prepare``, ``sparseft train --method`` and ``sparseft bench``."""
    REGISTRY[method.name] = method
    for alias in aliases:
        ALIASES[alias] = method.name
    return method


def _listed() -> tuple[str, ...]:
    return tuple(name for name, m in REGISTRY.items() if not m.ablation)


class _Names(Sequence):
    """The registered method names but ablations, in registration order (a live view of REGISTRY)."""

    def __getitem__(self, i):  # type: ignore[override]
        return _listed()[i]

    def __len__(self) -> int:
        return len(_listed())

    def __iter__(self) -> Iterator[str]:
        return iter(_listed())

    def __contains__(self, name: object) -> bool:
        return name in _listed()

    def __repr__(self) -> str:
        return repr(_listed())


METHODS: Sequence[str] = _Names()


class _DefaultLR(Mapping):
    """{method: default lr} for one task kind (a live view of REGISTRY)."""

    def __init__(self, task: str) -> None:
        self.task = task

    def __getitem__(self, name: str) -> float:
        return variant_lr(name, self.task)

    def __iter__(self) -> Iterator[str]:
        return iter(_listed())

    def __len__(self) -> int:
        return len(_listed())


DEFAULT_LR: Mapping[str, float] = _DefaultLR("classification")


def default_lrs(task: str) -> Mapping[str, float]:
    return _DefaultLR(task)


def bench_methods(task: str = "classification") -> tuple[str, ...]:
    """The methods plain ``sparseft bench`` runs by default for a task kind."""
    return tuple(m for m, spec in REGISTRY.items() if spec.in_default_bench and not (spec.needs_head and task == "causal-lm"))


def _value(text: str):
    """A variant option's value: int, float, bool, None or the string itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


_FIXED_SPARSEGRAD = {False: "sparsegrad-fixed", True: "sparsegrad-random"}


def parse_method(method: str) -> tuple[str, dict]:
    """("sparsegrad-fixed", {"support_criterion": "snr"}) from "sparsegrad[support_criterion=snr]"."""
    name, _, rest = method.strip().partition("[")
    options: dict = {}
    if rest:
        if not rest.endswith("]"):
            raise ConfigError(f"Method {method!r}: a variant is written name[key=value;key=value].")
        for item in filter(None, (p.strip() for p in rest[:-1].split(";"))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"Method {method!r}: option {item!r} is not key=value.")
            options[key.strip()] = _value(value)
    name = ALIASES.get(name.strip(), name.strip())
    if name in _FIXED_SPARSEGRAD.values() and "support_criterion" in options:
        # the name says the kind of support: a gradient criterion is sparsegrad-fixed, "random" sparsegrad-random
        name = _FIXED_SPARSEGRAD[options["support_criterion"] == "random"]
    if name not in REGISTRY:
        ablations = [n for n, m in REGISTRY.items() if m.ablation]
        raise ConfigError(f"Unknown method {method!r}; choose from {', '.join(_listed())} (or {', '.join(ALIASES)}; "
                          f"ablations: {', '.join(ablations)}).")
    if set(options) - set(TRAINING_OPTIONS) and not REGISTRY[name].takes_options:
        raise ConfigError(f"Method {name!r} takes no config [options]; variants are for the sparse methods (SparseGrad, "
                          f"MeProp); every method takes the training options {', '.join(TRAINING_OPTIONS)}.")
    return name, options


# Variant options that set the training loop, not the method's config: the study varies them per
# method inside one suite run ("sparsegrad[calibration_steps=40]", "sparsegrad[warmup_fraction=0.2]").
# ``lr`` is the variant's own default rate (a sweep's centre), for a variant whose kind of support
# wants another rate than its method's ("meprop-fixed[support_criterion=random;lr=0.009]").
TRAINING_OPTIONS = ("calibration_steps", "warmup_fraction", "lr")


def training_options(method: str) -> dict:
    """The training-loop settings a variant overrides, checked: {"calibration_steps": 40}."""
    options = {k: v for k, v in parse_method(method)[1].items() if k in TRAINING_OPTIONS}
    steps = options.get("calibration_steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"Method {method!r}: calibration_steps must be a positive whole number of batches, got {steps!r}.")
    warmup = options.get("warmup_fraction")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or not 0 <= warmup < 1):
        raise ConfigError(f"Method {method!r}: warmup_fraction must be a fraction of the steps in [0, 1), got {warmup!r}.")
    lr = options.get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf):
        raise ConfigError(f"Method {method!r}: lr must be a positive, finite learning rate, got {lr!r}.")
    return options


def variant_lr(method: str, task: str = "classification") -> float:
    """A method's default rate for a task kind or run setting; a variant's own ``lr`` option first."""
    return training_options(method).get("lr") or method_spec(method).default_lr(task)


def canonical(method: str) -> str:
    """The registered name (aliases resolved), with a variant's options in a fixed order."""
    name, options = parse_method(method)
    if not options:
        return name
    return f"{name}[{';'.join(f'{k}={v}' for k, v in sorted(options.items()))}]"


def without_lr(method: str) -> tuple[str, str]:
    """(name, its other options as "k=v;k=v"): what a run computes at a given rate, since a
    variant's ``lr`` option only sets where its rate starts."""
    name, options = parse_method(method)
    return name, ";".join(f"{k}={v}" for k, v in sorted(options.items()) if k != "lr")


def method_spec(method: str) -> Method:
    """The registry entry of a method name or variant."""
    return REGISTRY[parse_method(method)[0]]


def split_methods(text: str) -> list[str]:
    """A comma list of methods, commas inside a variant's [...] kept."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            out.append(current.strip())
            current = ""
        else:
            current += ch
    out.append(current.strip())
    return [m for m in out if m]


REGIMES = ("peft", "paper")
# methods prepared the same in either regime (every parameter trains): a run of one is the same
# run in both, so the suite may reuse it across regimes
REGIME_FREE = frozenset({"full"})


def prepare(method: str, model: nn.Module, rank: int = 8, density: float | None = None,
            support_narrow: int | str | None = None, regime: str = "peft") -> Prepared:
    """Set ``model`` up for ``method``; the model is modified in place or wrapped.

    ``regime="peft"``: only the method's parameters and the task head train (what PEFT users
    run). ``regime="paper"``: the SparseGrad paper's GLUE protocol, where only the MLP treatment
    differs between methods: attention, embeddings, LayerNorms and the head train fully for every
    method, and the MLP layers' own weights stay frozen except for what the method trains.
    ``support_narrow`` (SparseGrad only): see :class:`sparseft.config.SparseGradConfig`."""
    if regime not in REGIMES:
        raise ConfigError(f"regime={regime!r} is not known; use 'peft' (adapters and head train) or 'paper' (all but the MLPs train).")
    name, options = parse_method(method)
    training_options(method)  # checked here, applied by the training loop
    options = {k: v for k, v in options.items() if k not in TRAINING_OPTIONS}
    mlp = {id(p) for t in find_targets(model) for p in model.get_submodule(t.name).parameters()}
    prepared = REGISTRY[name].build(model, Budget(rank, density, support_narrow, options))
    if regime == "paper" and name not in REGIME_FREE:
        _train_all_but_mlp(prepared.model, mlp)
        prepared.trainable_params = _trainable_count(prepared)
    return prepared


def _train_all_but_mlp(model: nn.Module, mlp: set[int]) -> None:
    """Unfreeze every parameter but the MLP layers' base weights (peft's frozen copy of a
    ``modules_to_save`` head stays frozen: it is not used in the forward)."""
    for name, p in model.named_parameters():
        if id(p) not in mlp and ".original_module." not in name:
            p.requires_grad_(True)


def _trainable_count(prepared: Prepared) -> int:
    """Trainable entries: the method's own count for its adapted layers plus every other trainable tensor."""
    model = prepared.model
    get = getattr(model, "adapted_layers", None)
    adapters = {id(p) for layer in get().values() for p in layer.adapter_parameters()} if get else set()
    own = sum(layer.trainable_count() for layer in get().values()) if get else 0
    return own + sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapters)


# ----------------------------------------------------------------------------- builders
def _adamw(model: nn.Module) -> Callable[[float], torch.optim.Optimizer]:
    """torch's AdamW over what trains, fused where everything is on a GPU (``optim.fused_on_gpu``)."""
    import torch

    from .optim import fused_on_gpu

    def make(lr: float) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused_on_gpu(params))

    return make


def _sparse_adamw(model: nn.Module) -> Callable[[float], torch.optim.Optimizer]:
    from .optim import SparseAdamW

    return lambda lr: SparseAdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _full(model: nn.Module, budget: Budget) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    return Prepared(model, _adamw(model), False, _count(model))


def _head(model: nn.Module, budget: Budget) -> Prepared:
    heads = find_heads(model, None)
    if not heads:
        raise ConfigError("Method 'head' needs a task head named classifier/score in the model.")
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == h or name.startswith(h + ".") for h in heads))
    return Prepared(model, _adamw(model), False, _count(model))


def _peft(model: nn.Module, peft_config) -> Prepared:
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    return Prepared(peft_model, _adamw(peft_model), False, int(trainable))


def _lora(targets: Callable[[nn.Module], list[str]]) -> Callable[[nn.Module, Budget], Prepared]:
    def build(model: nn.Module, budget: Budget) -> Prepared:
        from peft import LoraConfig

        r = budget.rank
        heads = find_heads(model, None)
        return _peft(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets(model),
                                       modules_to_save=heads or None))

    return build


def _mlp_names(model: nn.Module) -> list[str]:
    return [t.name for t in find_targets(model)]


def _attention_names(model: nn.Module) -> list[str]:
    from torch import nn

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _ATTENTION.fullmatch(n)]
    if not names:
        raise ConfigError(f"No attention projections found in {type(model).__name__} for lora-attn.")
    return names


def _mlp_budget(model: nn.Module, rank: int) -> tuple[list[str], float]:
    """The MLP layers and the fraction of their entries LoRA at ``rank`` trains (r·Σ(m+n) / Σ m·n)."""
    targets = find_targets(model)
    return [t.name for t in targets], rank * sum(t.m + t.n for t in targets) / sum(t.m * t.n for t in targets)


def _shira(model: nn.Module, budget: Budget) -> Prepared:
    """peft's SHiRA: a random fixed sparse support in the original basis, r·(m+n) entries per layer."""
    from peft import ShiraConfig

    if budget.density is not None:
        raise ConfigError("shira's budget is LoRA's at --rank (r·(m+n) entries per layer); --density does not apply.")
    heads = find_heads(model, None)
    return _peft(model, ShiraConfig(r=budget.rank, target_modules=_mlp_names(model), modules_to_save=heads or None, random_seed=0))


def _supertuning(model: nn.Module, budget: Budget) -> Prepared:
    """peft's Super-Tuning: a magnitude-chosen sparse support of the same size as LoRA's budget."""
    from peft import SupertuningConfig

    names, fraction = _mlp_budget(model, budget.rank)
    fraction = budget.density if budget.density is not None else fraction
    heads = find_heads(model, None)
    return _peft(model, SupertuningConfig(sparsity=1.0 - fraction, target_modules=names, modules_to_save=heads or None))


def _s2ft(model: nn.Module, budget: Budget) -> Prepared:
    from .s2ft import S2FTConfig, get_s2ft_model

    s2 = get_s2ft_model(model, S2FTConfig(match_lora_rank=budget.rank if budget.density is None else None, density=budget.density))
    return Prepared(s2, _adamw(s2), False, s2.get_nb_trainable_parameters()[0])


def _sparse_prepared(sparse: SparseModel) -> Prepared:
    """AdamW for fixed supports (O(k) state anyway), SparseAdamW for dynamic ones; calibration
    unless nothing needs it (MeProp's identity bases with dynamic selection; bases from the
    weights with a random or dynamic support)."""
    fixed = sparse.sparse_config.selection == "fixed"
    return Prepared(sparse, _adamw(sparse) if fixed else _sparse_adamw(sparse), not sparse.is_calibrated,
                    sparse.get_nb_trainable_parameters()[0], sparse)


def _meprop(model: nn.Module, budget: Budget) -> Prepared:
    try:
        config = MePropConfig(**{"selection": "dynamic", **budget.sparse_kwargs()})
    except TypeError as exc:
        raise ConfigError(f"{exc}: variant options are MePropConfig fields.") from exc
    return _sparse_prepared(get_sparse_model(model, config))


def _sparsegrad(selection: str, config_class: type = SparseGradConfig, **fixed) -> Callable[[nn.Module, Budget], Prepared]:
    def build(model: nn.Module, budget: Budget) -> Prepared:
        kwargs = {"selection": selection, "support_narrow": budget.support_narrow, **fixed, **budget.sparse_kwargs()}
        try:
            config = config_class(**kwargs)
        except TypeError as exc:  # an option that is no config field
            raise ConfigError(f"{exc}: variant options are {config_class.__name__} fields.") from exc
        return _sparse_prepared(get_sparse_model(model, config))

    return build


# Default learning rates, the one table: each method's starting rate per run setting, which the
# sweeps centre on.
#   classification  `sparseft train` (MiniLM, Rotten Tomatoes, 400 steps of 16)
#   causal-lm       short instruction tuning of a small LLaMA (SmolLM2-135M, batch 16): the rates the
#                   decoder bench's sweep chose (25 steps, 2026-12-07; docs/llm.md); sparsegrad-fixed,
#                   sparsegrad-random, meprop-fixed and supertuning, not swept, take their kin's 9e-3
#   suite-peft      the suite's peft regime (80 steps of 16): the rates its first runs chose
#   suite-paper     the suite's paper regime, where attention, embeddings and head train too
# Where they came from: docs/benchmark.md and docs/sparsegrad.md.


def _rate_table(text: str) -> dict[str, dict[str, float]]:
    """{method: {setting: rate}} from a whitespace-aligned table with a header row."""
    (_, *settings), *rows = (line.split() for line in text.strip().splitlines())
    return {name: dict(zip(settings, map(float, rates))) for name, *rates in rows}


LEARNING_RATES: dict[str, dict[str, float]] = _rate_table("""
    method                classification  causal-lm  suite-peft  suite-paper
    full                  5e-5            1.8e-4     4.5e-4      4.5e-4
    head                  1e-3            1e-4       1e-3        3e-4
    lora-mlp              5e-4            3e-3       1.5e-3      3e-4
    lora-attn             5e-4            9e-3       5e-4        3e-4
    meprop                2e-4            1e-3       2e-4        3e-4
    sparsegrad-fixed      1e-3            9e-3       3e-3        3e-4
    sparsegrad-dynamic    3e-4            1e-3       2.7e-3      3e-4
    s2ft                  2e-4            9e-3       2e-4        3e-4
    sparsegrad-random     3e-3            9e-3       9e-3        3e-4
    sparsegrad-onesided   3e-3            9e-3       9e-3        3e-4
    sparse-random         3e-3            9e-3       9e-3        3e-4
    meprop-fixed          1e-3            9e-3       3e-3        3e-4
    shira                 3e-3            9e-3       9e-3        3e-4
    supertuning           1e-3            9e-3       9e-3        3e-4
""")
# A method registered without a rate for a setting: the paper regime's common centre, else its
# classification rate.
_FALLBACK_LR = {"suite-paper": 3e-4}

register_method(Method("full", "every parameter", _full, LEARNING_RATES["full"]))
register_method(Method("head", "the task head only", _head, LEARNING_RATES["head"], needs_head=True))
register_method(Method("lora-mlp", "LoRA (peft) on the MLP layers", _lora(_mlp_names),
                       LEARNING_RATES["lora-mlp"]), aliases=["lora"])
register_method(Method("lora-attn", "LoRA (peft) on the attention projections", _lora(_attention_names),
                       LEARNING_RATES["lora-attn"]))
register_method(Method("meprop", "top-k of the plain MLP gradient each step", _meprop,
                       LEARNING_RATES["meprop"], takes_options=True))
# The paper's two-sided rotation (W = W0 + P Δ̃ Qᵀ) is pinned for the methods named after its
# variants; the library default (and `sparsegrad`) rotates one side (sparsegrad-onesided below).
register_method(Method("sparsegrad-fixed", "k rotated MLP entries of largest calibration gradient",
                       _sparsegrad("fixed", support_criterion="abs-sum", rotation="both"), LEARNING_RATES["sparsegrad-fixed"],
                       in_default_bench=False, takes_options=True, reselects=True))
register_method(Method("sparsegrad-dynamic", "top-k rotated MLP entries each step", _sparsegrad("dynamic", rotation="both"),
                       LEARNING_RATES["sparsegrad-dynamic"], takes_options=True))
register_method(Method("s2ft", "|S| MLP channels (rows/columns) per block", _s2ft,
                       LEARNING_RATES["s2ft"]))
# A fixed random support in the rotated basis. The two-by-two of what each half buys, basis
# (rotated / identity) × support (calibrated / random): rotated + random is this, rotated +
# calibrated sparsegrad-fixed, identity + calibrated meprop-fixed, identity + random SHiRA. Its
# classification rate is for the 400-step default run (the suite's choices: docs/benchmark.md).
register_method(Method("sparsegrad-random", "k rotated MLP entries at random, both sides rotated",
                       _sparsegrad("fixed", support_criterion="random", rotation="both"), LEARNING_RATES["sparsegrad-random"],
                       in_default_bench=False, takes_options=True, reselects=True))
# The default SparseGrad (SparseGradConfig()): the random support with only each layer's narrow
# side rotated: as accurate as sparsegrad-random on the suite in both regimes, at a shorter step
# (docs/benchmark.md, "One side rotated"; docs/performance.md).
register_method(Method("sparsegrad-onesided", "k MLP entries at random, the narrow side rotated (SparseGradConfig())",
                       _sparsegrad("fixed", support_criterion="random", rotation="narrow"), LEARNING_RATES["sparsegrad-onesided"],
                       takes_options=True, reselects=True), aliases=["sparsegrad"])
# The product's default: the same k random entries with no rotation at all, in sparseft's own form
# (the study's identity × random cell exactly as it ran: MePropConfig, fixed, random), no
# calibration pass; peft's SHiRA trains the same kind of support through peft.
register_method(Method("sparse-random", "k MLP entries at random, no rotation, no calibration pass (the default)",
                       _sparsegrad("fixed", MePropConfig, support_criterion="random"), LEARNING_RATES["sparse-random"],
                       takes_options=True))
register_method(Method("meprop-fixed", "k MLP entries of largest calibration gradient, no rotation (ablation)",
                       _sparsegrad("fixed", MePropConfig, support_criterion="abs-sum"), LEARNING_RATES["meprop-fixed"],
                       in_default_bench=False, ablation=True, takes_options=True))
# peft's own sparse adapters at the same budget, through peft exactly as LoRA is.
register_method(Method("shira", "peft SHiRA: r·(m+n) random MLP entries, original basis", _shira,
                       LEARNING_RATES["shira"]))
register_method(Method("supertuning", "peft Super-Tuning: magnitude-chosen MLP entries", _supertuning,
                       LEARNING_RATES["supertuning"], in_default_bench=False))


__all__ = ["ALIASES", "Budget", "DEFAULT_LR", "DEFAULT_METHOD", "METHODS", "Method", "Prepared", "REGIMES", "REGISTRY", "TRAINING_OPTIONS", "bench_methods", "canonical", "method_spec", "parse_method", "split_methods", "training_options", "default_lrs", "variant_lr", "without_lr",
           "prepare", "register_method"]
