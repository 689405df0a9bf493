"""Configuration dataclasses, one per method, in the style of ``peft``'s ``LoraConfig``.

A config says *which* layers are adapted, *how many* entries each may train (the budget), and
*how* the entries are chosen (selection mode, bases). It is plain data: it round-trips through
``to_dict`` / ``from_dict`` into ``adapter_config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

Selection = Literal["fixed", "dynamic"]
ADAPTER_DTYPES = ("float32", "bfloat16", "float16", "float64")
ComputePath = Literal["auto", "activations", "weights"]
SUPPORT_CRITERIA = ("abs-sum", "sum", "snr", "balanced", "random")  # see sparseft.calibration.support_scores
ROTATIONS = ("both", "narrow", "none")  # which sides of a layer are rotated (SparseConfig.rotation; "none": MeProp)


def _registered(module: str, table: str, builtin: tuple[str, ...]) -> tuple[str, ...]:
    """The names a registry knows: its built-ins, plus whatever was registered, which is only
    possible once its module is imported (this module stays free of torch)."""
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, table)) if loaded is not None else builtin
NARROW_COST_SHARE = 0.1  # support_narrow="auto": value-gradient cost / frozen 2Nmn


def run_counts(k: int, width: int, run: int) -> tuple[int, int]:
    """(c, h): a grouped support of ``k`` entries over ``width`` wide rows in runs of ``run``
    gives its first h runs c + 1 directions and the others c (k = c·width + h·run exactly
    when the budget was rounded by :func:`grouped_budget`)."""
    c = k // width
    return c, (k - c * width) // run


def grouped_budget(k: int, width: int, run: int) -> int:
    """The count nearest ``k`` that runs of c or c + 1 directions reach: c·width + h·run, at
    least one direction per wide row (within run/2 entries of k)."""
    k = max(k, width)
    c = k // width
    return c * width + round((k - c * width) / run) * run


@dataclass
class SparseConfig:
    """Shared fields of the sparse-gradient methods (SparseGrad and MeProp).

    Budget, per adapted layer of shape m×n (first match wins): ``k`` entries, else
    ``match_lora_rank`` r giving ``k = r·(m+n)`` (the trainable count of LoRA at rank r on that
    layer), else ``density`` giving ``k = round(density·m·n)``.
    """

    density: float | None = 0.01
    k: int | None = None
    match_lora_rank: int | None = None
    selection: Selection = "fixed"
    # Names (exact module names or suffixes) or one regex matched with re.fullmatch. None: the
    # MLP layers of the architecture, found automatically.
    target_modules: list[str] | str | None = None
    # Modules trained densely and saved with the adapter (a task head). None: "classifier" /
    # "score" heads when the model has them.
    modules_to_save: list[str] | None = None
    # Fixed selection: re-choose a fraction of the support every `reselect_every` optimizer
    # steps (drop the smallest |values|, grow the largest |rotated gradient|). None: never.
    # Grown entries concentrate the support, which wants a lower rate (what it cost on the suite:
    # docs/benchmark.md, study).
    reselect_every: int | None = None
    reselect_fraction: float = 0.1
    # Restrict the support to the leading `support_rows` × `support_cols` block of the rotated
    # space (HOSVD orders directions by energy). None: the whole m×n space.
    support_rows: int | None = None
    support_cols: int | None = None
    # Restrict each layer's *narrow* side (the smaller of m, n: the model width of an MLP layer)
    # to its leading `support_narrow` directions, the wide side free. The fast setting: the
    # value gradient then costs ~N·L·(m+n), LoRA-like for L ≈ 3·rank (docs/performance.md,
    # which also has the accuracy it cost). "auto": per layer, the largest L whose value
    # gradient costs at most NARROW_COST_SHARE of the frozen layer's forward + input gradient
    # (N·L·(m+n) ≤ 0.1·2Nmn: L ≈ 122 at BERT-base 768↔3072, ≈ 597 at LLaMA-7B 4096↔11008).
    # None: no restriction.
    support_narrow: int | str | None = None
    # Fixed selection: how calibration scores each rotated entry from the per-step rotated
    # gradients G̃_s: "abs-sum" Σ|G̃_s|, "sum" |ΣG̃_s|, "snr" |ΣG̃_s|/sqrt(ΣG̃_s²), "balanced"
    # Σ|G̃_s| over the geometric mean of its row's and column's Σ|G̃_s| (energy per row/column), or
    # "random" (no gradient: a seeded random support, for ablations).
    support_criterion: str = "random"
    # Which sides SparseGrad rotates: "narrow" (default): only the layer's narrow side (the model
    # width of an MLP layer) is rotated and the wide side is the identity, e.g. W = W0 + Δ̃ Qᵀ
    # for an up-projection; "both": W = W0 + P Δ̃ Qᵀ, the paper's. The wide side's rotation is
    # the dearest part of the update (N·m·a of the value gradient for m = 4× the width) and its
    # Gram the dearest part of calibration (an m×m eigh); "narrow" skips both, and the suite
    # found no accuracy difference (docs/benchmark.md).
    rotation: str = "narrow"
    # One basis pair per layer *group* (the same role in every block, e.g. all up-projections:
    # the paper's HOSVD of the group's stacked gradients), or False: one pair per layer, from
    # that layer's gradients alone (as many bases to store as layers).
    shared_bases: bool = True
    # Where the bases come from: "gradients" (the paper's: the HOSVD of calibration gradients,
    # one pair per layer group) or "weights" (each layer's own W0 = U S Vᵀ, as SVFT/PiSSA: no
    # calibration pass, one pair per layer, not stored in adapter files; with rotation="both"
    # the support keeps to the leading min(m, n) directions of each side, the span of W0).
    basis_source: str = "gradients"
    # Block-diagonal bases: each rotated side's basis is block-diagonal with this many diagonal
    # blocks, each the eigenbasis of the matching diagonal block of the Gram. Rotating activations
    # then costs N·d²/blocks instead of N·d² (the one-sided default's largest extra cost over
    # LoRA's, docs/performance.md). 1: the whole HOSVD basis (the paper's).
    basis_blocks: int = 1
    # Grouped fixed supports (one-sided rotation only): the wide side's rows (or columns) are
    # taken in runs of `support_group`, and every row of a run trains the same c = k / width
    # rotated directions of the narrow side, chosen per run (at random, or by the run's summed
    # score). The value gradient is then one batched dense product of the run's activations with
    # its c directions (no SDDMM, none of its transposing copies) and only the directions in use
    # are rotated. Runs get c or c + 1 directions, so k is matched to within half a run (exact for
    # r·(m+n) budgets of 4× and 8/3× MLPs at even r). None (default): every entry placed
    # independently. What runs of 16, 32 and 64 cost and buy: docs/benchmark.md ("Grouped
    # supports") and docs/performance.md.
    support_group: int | None = None
    # The support's kind by registered name (sparseft.update.support.register_support). None:
    # `selection`'s own ("fixed", grouped with `support_group`, or "dynamic").
    support: str | None = None
    # How the adapted forward/backward is computed; "auto" picks the cheaper per call.
    compute_path: ComputePath = "auto"
    # Keep each layer's merged weight W0 + ΔW between optimizer steps: one merge per step instead
    # of two per micro-batch (forward and input gradient), and unmerged inference at the frozen
    # model's speed. Costs one m×n tensor in the base dtype per adapted layer (as large as the
    # adapted weights themselves). None: dynamic selection caches (its state is dense anyway),
    # fixed does not, so its memory stays LoRA's; True/False force it.
    cache_update: bool | None = None
    # Eigendecomposition precision: float64 up to this Gram size, float32 above it.
    eigh_float64_max: int = 4096
    # Dtype of the trainable values; None: float32 for half-precision models, else the model's.
    adapter_dtype: str | None = None
    method: str = field(default="sparsegrad", init=False)
    identity_bases: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.validate()

    def _check_types(self) -> None:
        """Wrong types (a string density, a fractional k, a bad regex) are ConfigErrors here,
        not TypeErrors from deep inside the model code later."""
        for name in ("k", "match_lora_rank", "reselect_every", "support_rows", "support_cols", "support_narrow", "eigh_float64_max", "basis_blocks",
                     "support_group"):
            v = getattr(self, name)
            if name == "support_narrow" and v == "auto":
                continue
            required = name in ("eigh_float64_max", "basis_blocks")
            if (v is not None or required) and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                also = "" if required else ' or "auto"' if name == "support_narrow" else " or None"
                raise ConfigError(f"{name}={v!r} must be a whole number (an int){also}.")
        for name in ("density", "reselect_fraction"):
            v = getattr(self, name)
            if (v is not None or name == "reselect_fraction") and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ConfigError(f"{name}={v!r} must be a number (e.g. 0.01).")
        tm = self.target_modules
        if isinstance(tm, str):
            try:
                re.compile(tm)
            except re.error as exc:
                raise ConfigError(f"target_modules={tm!r} is not a valid regular expression ({exc}); pass a list of names instead.") from exc
        elif tm is not None and not (isinstance(tm, (list, tuple)) and all(isinstance(t, str) for t in tm)):
            raise ConfigError(f"target_modules={tm!r} must be None, a list of module names, or one regex string.")
        ms = self.modules_to_save
        if ms is not None and not (isinstance(ms, (list, tuple)) and all(isinstance(t, str) for t in ms)):
            raise ConfigError(f"modules_to_save={ms!r} must be None or a list of module names, e.g. ['classifier'].")
        if self.cache_update is not None and not isinstance(self.cache_update, bool):
            raise ConfigError(f"cache_update={self.cache_update!r} must be True, False or None (dynamic caches, fixed does not).")
        if self.adapter_dtype not in (None, *ADAPTER_DTYPES):
            raise ConfigError(f"adapter_dtype={self.adapter_dtype!r} is not supported; use one of {list(ADAPTER_DTYPES)} or None.")
        if self.eigh_float64_max < 0:
            raise ConfigError("eigh_float64_max must be ≥ 0 (the largest Gram size solved in float64; 0: always float32).")

    def validate(self) -> None:
        self._check_types()
        if self.selection not in ("fixed", "dynamic"):
            raise ConfigError(f"selection={self.selection!r} is not known; use 'fixed' or 'dynamic'.")
        if self.k is None and self.match_lora_rank is None:
            if self.density is None:
                raise ConfigError("No budget given: set density (0, 1], k, or match_lora_rank.")
            if not (0.0 < float(self.density) <= 1.0):
                raise ConfigError(
                    f"density={self.density} must be in (0, 1]: it is the fraction of each layer's "
                    "entries that train (0.01 = 1%)."
                )
        if self.k is not None and int(self.k) < 1:
            raise ConfigError(f"k={self.k} must be a positive number of entries per layer.")
        if self.match_lora_rank is not None and int(self.match_lora_rank) < 1:
            raise ConfigError(f"match_lora_rank={self.match_lora_rank} must be a positive LoRA rank.")
        if self.reselect_every is not None and int(self.reselect_every) < 1:
            raise ConfigError("reselect_every must be a positive number of optimizer steps, or None.")
        if not (0.0 < self.reselect_fraction <= 1.0):
            raise ConfigError("reselect_fraction must be in (0, 1].")
        if int(self.basis_blocks) < 1:
            raise ConfigError(f"basis_blocks={self.basis_blocks} must be a positive number of diagonal blocks (1: whole bases).")
        if self.support_group is not None:
            if int(self.support_group) < 1:
                raise ConfigError(f"support_group={self.support_group} must be a positive number of wide-side rows per run, or None.")
            if self.selection != "fixed" or self.rotation != "narrow" or self.identity_bases:
                raise ConfigError("support_group groups a fixed support of one-sided SparseGrad: use it with "
                                  "selection='fixed' and rotation='narrow' (or leave it None).")
        if self.basis_source not in ("gradients", "weights"):
            raise ConfigError(f"basis_source={self.basis_source!r} is not known; use 'gradients' (calibrated HOSVD) or "
                              "'weights' (each layer's SVD).")
        if not isinstance(self.shared_bases, bool):
            raise ConfigError(f"shared_bases must be True (one basis per layer group) or False (one per layer), got {self.shared_bases!r}.")
        if self.support_criterion not in SUPPORT_CRITERIA:
            raise ConfigError(f"support_criterion={self.support_criterion!r} is not known; use one of {list(SUPPORT_CRITERIA)}.")
        if self.support is not None and (not isinstance(self.support, str) or not self.support):
            raise ConfigError(f"support={self.support!r} must be the name of a registered support (or None).")
        rotations = _registered("sparseft.update.basis", "BASES", ROTATIONS)
        if self.rotation not in rotations:
            raise ConfigError(f"rotation={self.rotation!r} is not known; use one of {list(rotations)}.")
        supports = _registered("sparseft.update.support", "SUPPORTS", ("fixed", "grouped", "dynamic"))
        if self.support is not None and self.support not in supports:
            raise ConfigError(f"support={self.support!r} is not known; use one of {list(supports)} (or register_support() your own).")
        if self.compute_path not in ("auto", "activations", "weights"):
            raise ConfigError("compute_path must be 'auto', 'activations' or 'weights'.")
        for name in ("support_rows", "support_cols", "support_narrow"):
            v = getattr(self, name)
            if v is not None and v != "auto" and int(v) < 1:
                raise ConfigError(f"{name}={v} must be a positive number of leading directions, or None.")

    @property
    def groups_share_bases(self) -> bool:
        """One basis pair per layer group (else per layer: ``shared_bases=False``, or bases from
        each layer's own weights)."""
        return self.shared_bases and self.basis_source == "gradients"

    def block(self, m: int, n: int) -> tuple[int, int]:
        """The leading rows × columns of an m×n layer's rotated space its support may use."""
        rows = min(m, self.support_rows or m)
        cols = min(n, self.support_cols or n)
        if self.basis_source == "weights" and self.rotation == "both":  # thin bases: the span of W0
            rows, cols = min(rows, m, n), min(cols, m, n)
        if self.support_narrow is not None:
            L = self.narrow_directions(m, n)
            if m <= n:
                rows = min(rows, L)
            else:
                cols = min(cols, L)
        return rows, cols

    def narrow_directions(self, m: int, n: int) -> int:
        """L, the leading directions of an m×n layer's narrow side its support may use
        (``support_narrow``; "auto": the cost budget, see the field's comment)."""
        if self.support_narrow == "auto":
            return max(1, int(NARROW_COST_SHARE * 2 * m * n / (m + n)))
        return int(self.support_narrow)

    def run_rows(self, m: int, n: int) -> int | None:
        """Wide rows per run of an m×n layer's grouped support (``support_group``, shortened to
        divide the wide side), or None: ungrouped (no ``support_group``, or a support restricted
        on its wide side)."""
        if self.support_group is None:
            return None
        rows, cols = self.block(m, n)
        wide = max(m, n)
        return math.gcd(wide, int(self.support_group)) if (rows if m > n else cols) == wide else None

    def budget(self, m: int, n: int) -> int:
        """Entries trainable in one m×n layer under this config."""
        rows, cols = self.block(m, n)
        if self.k is not None:
            k = int(self.k)
        elif self.match_lora_rank is not None:
            k = int(self.match_lora_rank) * (m + n)
        else:
            k = max(1, round(float(self.density) * m * n))
        run = self.run_rows(m, n)
        if run is not None and k <= rows * cols:  # c or c + 1 directions for every row of the wide side
            k = grouped_budget(k, max(m, n), run)
        if k > rows * cols:
            raise ConfigError(
                f"k={k} is larger than the {rows}×{cols} = {rows * cols} entries this layer can "
                f"train (layer {m}×{n}); lower k / match_lora_rank / density or widen the support."
            )
        return k

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"An adapter config must be a JSON object (a dict), got {type(data).__name__}.")
        method = data.get("method", "sparsegrad")
        target = CONFIG_CLASSES.get(method) if isinstance(method, str) else None
        if target is None:
            raise ConfigError(f"Unknown method {method!r} in adapter config; known: {sorted(CONFIG_CLASSES)}.")
        names = {f.name for f in dataclasses.fields(target) if f.init}
        unknown = set(data) - names - {"method", "identity_bases"}
        if unknown:
            raise ConfigError(f"Unknown config keys {sorted(unknown)} for method {method!r}.")
        kwargs = {k: v for k, v in data.items() if k in names}
        # Adapters saved before `rotation` existed were trained with both sides rotated: reading
        # them with today's one-sided default would silently compute another model.
        if "rotation" in names and "rotation" not in data:
            kwargs["rotation"] = target.rotation if target is MePropConfig else "both"
        if target is MePropConfig and kwargs.get("rotation") == "both":
            kwargs["rotation"] = "none"  # MeProp files before "none" existed: P = Q = I read as "both"
        return target(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass
class SparseGradConfig(SparseConfig):
    """SparseGrad (Chekalina et al., 2024): train k entries of each MLP layer in the basis
    ``W̃ = Pᵀ W Q`` found by HOSVD of calibration gradients."""

    def __post_init__(self) -> None:
        self.method = "sparsegrad"
        self.identity_bases = False
        super().__post_init__()
        if self.rotation == "none":
            raise ConfigError("rotation='none' (identity bases) is MeProp: use MePropConfig, or rotation 'narrow' or 'both'.")


@dataclass
class MePropConfig(SparseConfig):
    """MeProp-style baseline: the same machinery with identity bases (P = Q = I), i.e. top-k of
    the ordinary weight gradient. Dynamic selection by default, as in MeProp."""

    selection: Selection = "dynamic"
    rotation: str = "none"

    def __post_init__(self) -> None:
        self.method = "meprop"
        self.identity_bases = True
        super().__post_init__()
        if self.rotation != "none" or self.basis_blocks != 1:
            raise ConfigError("MeProp rotates nothing (identity bases): leave rotation and basis_blocks at their defaults.")


CONFIG_CLASSES: dict[str, type[SparseConfig]] = {"sparsegrad": SparseGradConfig, "meprop": MePropConfig}
