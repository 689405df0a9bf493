"""Calibration: bases from streamed Gram matrices, then the fixed support from rotated gradients.

For a group of layers, with G_{s,l} the weight gradient of layer l at step s (m×n),

    P = eigenvectors of Σ_{s,l} G Gᵀ    (m×m),   Q = eigenvectors of Σ_{s,l} Gᵀ G    (n×n),

sorted by eigenvalue, largest first: the HOSVD factors of the two weight modes of the stacked
gradient tensor, without ever stacking it (m²+n² numbers per group instead of steps·layers·m·n).
Gradients are taken with ``backward(inputs=weights)`` and a post-accumulate hook that folds each
one into the Grams and frees it, so at most one layer's gradient is alive at a time.

For fixed selection a second pass over the same batches (same RNG, so the same dropout masks)
scores each layer's rotated entries by ``Σ_s |Pᵀ G Q|`` and keeps the k largest; the scores are
an m×n float32 per layer, so layers are scored in chunks that fit ``max_score_bytes`` (one pass
each). A random support (``support_criterion="random"``, the default) needs no scoring pass, so
calibration is one pass.

Calibration never changes the model: no parameter moves, ``.grad`` and ``requires_grad`` are
restored, train/eval mode is restored, and the torch RNG state is put back as it was.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .update.bank import block_eigenbasis
from .update.support import seeded_scores
from .config import SUPPORT_CRITERIA  # noqa: F401  (re-exported: the criteria support_scores knows)
from .errors import CalibrationError
from .quantized import compute_dtype
from .gradients import LossFn, RngState, gradient_pass, require_dict
from .layer import SparseLinear

# Gradient support criteria: the float32 scores alive at once (layers are scored in chunks of at
# most this, one pass over the calibration batches per chunk): one pass for small models, a few
# for 7B-class MLPs.
DEFAULT_SCORE_BYTES = 4 << 30


@dataclass
class CalibrationReport:
    steps: int
    gram_seconds: float = 0.0
    eigh_seconds: dict[str, float] = field(default_factory=dict)
    support_seconds: float = 0.0
    # per layer: (distinct rows, distinct columns) of the chosen fixed support
    support_spread: dict[str, tuple[int, int]] = field(default_factory=dict)
    # gradient criteria: passes over the batches to score the support, and the largest set of
    # score tensors alive at once (bytes)
    score_passes: int = 0
    peak_score_bytes: int = 0


def calibrate_layers(
    model: nn.Module,
    layers: Mapping[str, SparseLinear],
    bank,
    batches: Iterable[Mapping[str, Any]],
    *,
    steps: int,
    loss_fn: LossFn | None,
    need_bases: bool,
    float64_max: int,
    show_progress: bool = True,
    criterion: str = "abs-sum",
    max_score_bytes: int | None = None,
) -> CalibrationReport:
    """Compute bases (if ``need_bases``) and fixed supports for ``layers`` of ``model``; the
    support is the top-k of ``criterion`` (see :func:`support_scores`). A gradient criterion
    scores the layers in chunks whose float32 score tensors fit ``max_score_bytes`` (one pass
    over the batches per chunk; None: one pass for all layers)."""
    cached = _first_batches(batches, steps)
    report = CalibrationReport(steps=len(cached))
    any_layer = next(iter(layers.values()))
    rng = RngState()
    was_training = model.training
    model.train()
    for layer in layers.values():
        layer.bypass = True
    try:
        if need_bases and any_layer.basis.rotated_parts:  # bases the bank holds, from the gradients' Grams
            _fit_bases(model, layers, bank, cached, loss_fn, rng, float64_max, show_progress, report)
        if any_layer.selection == "fixed":
            _choose_supports(model, layers, cached, loss_fn, rng, criterion, max_score_bytes, show_progress, report)
        else:
            for layer in layers.values():
                layer.calibrated = True
    finally:
        for layer in layers.values():
            layer.bypass = False
        model.train(was_training)
        rng.restore()
    return report


def _first_batches(batches: Iterable[Mapping[str, Any]], steps: int) -> list[Mapping[str, Any]]:
    """The first ``steps`` batches, each checked to be a dict (also when no gradient pass runs)."""
    if not isinstance(batches, Iterable) or isinstance(batches, (Mapping, torch.Tensor, str)):
        raise CalibrationError(
            f"calibrate() takes an iterable of dict batches (a list, a DataLoader), got {type(batches).__name__}."
        )
    cached: list[Mapping[str, Any]] = []
    for batch in batches:
        require_dict(batch)
        cached.append(batch)
        if len(cached) >= steps:
            break
    if not cached:
        raise CalibrationError("calibrate() got no batches: pass an iterable of dict batches (10-30 is typical).")
    return cached


def add_gram_terms(gram: dict[str, torch.Tensor], G: torch.Tensor) -> None:
    """``gram["P"] += G Gᵀ`` and ``gram["Q"] += Gᵀ G`` (the sides present), G in float32. A layer
    of a model split over devices may sit on another device than its group's Gram (the first
    layer's): its product is formed where G is and added on the Gram's device."""
    G = G.float()
    for part, (left, right) in (("P", (G, G.T)), ("Q", (G.T, G))):
        if part not in gram:
            continue
        if G.device == gram[part].device:
            gram[part].addmm_(left, right)
        else:
            gram[part].add_((left @ right).to(gram[part].device))


def _fit_bases(model: nn.Module, layers: Mapping[str, SparseLinear], bank, cached: list, loss_fn: LossFn | None,
               rng: RngState, float64_max: int, show_progress: bool, report: CalibrationReport) -> None:
    """One Gram per rotated side of each group (Σ G Gᵀ, Σ Gᵀ G over layers and batches), then its
    (block-)eigenbasis into ``bank``."""
    t0 = time.perf_counter()
    grams: dict[str, dict[str, torch.Tensor]] = {}
    blocks_of: dict[str, int] = {}
    for layer in layers.values():
        if layer.group not in grams:
            blocks_of[layer.group] = layer.basis.blocks
            dev = layer.base_layer.weight.device
            size = {"P": layer.m, "Q": layer.n}
            grams[layer.group] = {part: torch.zeros(size[part], size[part], device=dev) for part in layer.basis.rotated_parts}

    def accumulate(name: str, layer: SparseLinear, G: torch.Tensor) -> None:
        add_gram_terms(grams[layer.group], G)

    rng.restore()
    gradient_pass(model, layers, cached, loss_fn, accumulate, "calibrate: gradients", show_progress)
    report.gram_seconds = time.perf_counter() - t0
    dtype = compute_dtype(next(iter(layers.values())).base_layer)
    for group, gram in grams.items():  # identical on every rank already
        t1 = time.perf_counter()
        found = {part: block_eigenbasis(g, blocks_of[group], float64_max).to(dtype) for part, g in gram.items()}
        report.eigh_seconds[group] = time.perf_counter() - t1
        bank.set(group, found.get("P"), found.get("Q"))


def _choose_supports(model: nn.Module, layers: Mapping[str, SparseLinear], cached: list, loss_fn: LossFn | None,
                     rng: RngState, criterion: str, max_score_bytes: int | None, show_progress: bool,
                     report: CalibrationReport) -> None:
    """Each fixed support from ``criterion``'s scores: random ones need no gradient pass; gradient
    ones take one pass per chunk of layers, so only that chunk's scores are ever alive."""
    t0 = time.perf_counter()
    if criterion == "random":
        choose_random_supports(layers)
    else:
        per_layer = 2 if criterion == "snr" else 1
        chunks = score_chunks(layers, per_layer, max_score_bytes)
        for chunk in chunks:
            scores = _score_pass(model, chunk, cached, loss_fn, criterion, rng, show_progress)
            for name, layer in chunk.items():
                layer.choose_support(scores.pop(name))
            del scores
        report.score_passes = len(chunks)
        report.peak_score_bytes = max(_score_bytes(chunk, per_layer) for chunk in chunks)
    for name, layer in layers.items():
        report.support_spread[name] = layer.support.touched
    report.support_seconds = time.perf_counter() - t0


def _score_bytes(layers: Mapping[str, SparseLinear], per_layer: int) -> int:
    """Bytes of ``per_layer`` float32 block-sized score tensors for each of ``layers``."""
    return sum(4 * per_layer * layer.block[0] * layer.block[1] for layer in layers.values())


def score_chunks(layers: Mapping[str, SparseLinear], per_layer: int, budget: int | None) -> list[dict[str, SparseLinear]]:
    """The layers in consecutive chunks whose ``per_layer`` score tensors each fit ``budget``
    bytes (a layer larger than the budget goes alone); None: all in one chunk, one pass."""
    chunks: list[dict[str, SparseLinear]] = [{}]
    for name, layer in layers.items():
        if budget is not None and chunks[-1] and _score_bytes({**chunks[-1], name: layer}, per_layer) > budget:
            chunks.append({})
        chunks[-1][name] = layer
    return chunks


def _score_pass(model: nn.Module, layers: Mapping[str, SparseLinear], batches: list[Mapping[str, Any]],
                loss_fn: LossFn | None, criterion: str, rng: RngState, show_progress: bool) -> dict[str, torch.Tensor]:
    """One pass over ``batches`` (the bases' RNG state, so the same dropout masks), scoring the
    rotated gradients of ``layers`` by ``criterion``; only their weight gradients are computed."""
    sums = {name: [torch.zeros(layer.block, device=layer.base_layer.weight.device) for _ in range(2 if criterion == "snr" else 1)]
            for name, layer in layers.items()}

    def score(name: str, layer: SparseLinear, G: torch.Tensor) -> None:
        R = _rotated_block(layer, G)
        first = sums[name][0]
        if criterion in ("abs-sum", "balanced"):
            first.add_(R.abs())
        else:
            first.add_(R)
            if criterion == "snr":
                sums[name][1].add_(R * R)

    rng.restore()
    gradient_pass(model, layers, batches, loss_fn, score, "calibrate: support", show_progress)
    out = {}
    for name in list(sums):
        parts = sums.pop(name)
        out[name] = support_scores(criterion, parts[0], parts[1] if len(parts) > 1 else parts[0])
        del parts
    return out


def support_scores(criterion: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Score of each rotated entry from the per-step rotated gradients G̃_s summed over steps:

    - ``abs-sum``: Σ_s |G̃_s| (``first`` holds it): large however the sign varies;
    - ``sum``: |Σ_s G̃_s|: large where the steps agree (the update a full step would make);
    - ``snr``: |Σ_s G̃_s| / sqrt(Σ_s G̃_s²): agreement relative to the noise, scale-free;
    - ``balanced``: Σ_s |G̃_s| divided by the geometric mean of its row's and column's totals
      (energy per row/column), so that the top k spread over many rows and columns instead of
      filling the few leading ones (a concentrated support makes a low-rank update);
    - ``random``: no gradient (handled by the caller; SHiRA-like supports for ablations).
    """
    if criterion == "abs-sum":
        return first
    if criterion == "balanced":
        rows, cols = first.sum(1, keepdim=True), first.sum(0, keepdim=True)
        return first / (rows * cols).sqrt().clamp(min=1e-30)
    if criterion == "sum":
        return first.abs()
    if criterion == "snr":
        return first.abs() / second.sqrt().clamp(min=1e-30)  # an entry with no gradient scores 0
    raise ValueError(f"unknown support criterion {criterion!r}")


def random_support_seed(index: int) -> int:
    """The seed of the ``index``-th layer's random support: the same on every rank."""
    return 1_000_003 * (index + 1)


def choose_random_supports(layers: Mapping[str, SparseLinear], score_bytes: int = DEFAULT_SCORE_BYTES) -> None:
    """Each layer's seeded random support (no gradient pass): the ``index``-th layer's seed is
    ``random_support_seed(index)`` (``choose_seeded_supports``)."""
    choose_seeded_supports([(layer, random_support_seed(i)) for i, layer in enumerate(layers.values())], score_bytes)


def choose_seeded_supports(seeded: list[tuple[SparseLinear, int]], score_bytes: int = DEFAULT_SCORE_BYTES) -> None:
    """Each layer's support: the top-k of ``seeded_scores(block, seed)``. The top-k runs on the CPU,
    where the scores are drawn, whatever device the layer is on: random scores often tie at the
    k-th value (docs/performance.md), topk breaks ties as its device's implementation does, and
    the adapter file stores the seed, so a support chosen on a GPU might not be rebuilt on a CPU,
    and the adapter would not load there. The top-k of one block runs on one core, so layers are
    chosen side by side on torch's threads, with at most ``score_bytes`` of scores at once."""
    def choose(layer: SparseLinear, seed: int) -> None:
        layer.choose_support(seeded_scores(layer.block, seed), seed)

    block_bytes = max((4 * layer.block[0] * layer.block[1] for layer, _ in seeded), default=1)
    workers = max(1, min(torch.get_num_threads(), score_bytes // block_bytes))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(choose, *zip(*seeded)))  # (list: a worker's error is raised here)


def _rotated_block(layer: SparseLinear, G: torch.Tensor) -> torch.Tensor:
    """The allowed block of the layer's rotated gradient P_bᵀ G Q_b (float32)."""
    rows, cols = layer.block
    return layer.basis.rotate(G, slice(0, rows), slice(0, cols))


def rotated_gradient_scores(
    model: nn.Module,
    layers: Mapping[str, SparseLinear],
    bank,
    batches: list[Mapping[str, Any]],
    loss_fn: LossFn | None,
    show_progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Σ |rotated gradient|, mean rotated gradient) over ``batches`` at the current (adapted)
    weights, per layer block."""
    sums: dict[str, list[torch.Tensor]] = {}

    def score(name: str, layer: SparseLinear, G: torch.Tensor) -> None:
        R = _rotated_block(layer, G)
        if name in sums:
            sums[name][0].add_(R.abs())
            sums[name][1].add_(R)
        else:
            sums[name] = [R.abs(), R.clone()]

    rng = RngState()
    try:
        gradient_pass(model, layers, batches, loss_fn, score, "reselect", show_progress)
    finally:
        rng.restore()
    for _, signed in sums.values():  # gradients were reduced over ranks as they came
        signed /= max(1, len(batches))
    return {n: s[0] for n, s in sums.items()}, {n: s[1] for n, s in sums.items()}


__all__ = ["DEFAULT_SCORE_BYTES", "score_chunks", "CalibrationReport", "calibrate_layers", "rotated_gradient_scores"]
