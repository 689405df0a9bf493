"""Paired comparisons with confidence intervals: what the benchmark suite reports per method.

Every method of a suite run is scored on the same test rows with the same seeds (same data
order, same head initialisation), so methods are compared *paired*: per seed s and test row i,
``d[s, i] = correct_method[s, i] - correct_reference[s, i]`` and the difference in accuracy is
the mean of d. Its 95% interval comes from a bootstrap that resamples test rows (one draw shared
by all seeds, since the rows are shared) and seeds, independently per task; the pooled difference
is the mean of the per-task differences, and its interval resamples every task at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def _draws(d: np.ndarray, rng: np.random.Generator, B: int) -> np.ndarray:
    """B bootstrap replicates of mean(d) for d of shape (seeds, rows)."""
    S, n = d.shape
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=B)  # resampled rows, as counts
    per_seed = weights @ d.T.astype(np.float64) / n  # (B, S)
    seeds = rng.integers(0, S, size=(B, S)) if S > 1 else np.zeros((B, 1), dtype=int)
    return np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)


def paired_difference(
    method: Mapping[str, Sequence[np.ndarray]] | Sequence[np.ndarray],
    reference: Mapping[str, Sequence[np.ndarray]] | Sequence[np.ndarray],
    *,
    B: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """Mean paired accuracy difference ``method - reference`` with a bootstrap interval.

    Each argument is, per task, a list over seeds of 0/1 correctness vectors over the same test
    rows (a plain list is one task). Several tasks are pooled by averaging the per-task
    differences. Returns ``{"mean", "ci_low", "ci_high"}`` in accuracy units (fractions)."""
    if not isinstance(method, Mapping):
        method, reference = {"task": method}, {"task": reference}  # type: ignore[dict-item]
    if set(method) != set(reference):
        raise ValueError(f"method and reference cover different tasks: {sorted(method)} vs {sorted(reference)}")
    rng = np.random.default_rng(seed)
    means, draws = [], []
    for task in sorted(method):
        a = np.asarray(method[task], dtype=np.int8)
        b = np.asarray(reference[task], dtype=np.int8)
        if a.shape != b.shape or a.ndim != 2:
            raise ValueError(f"task {task!r}: need equal (seeds, rows) shapes, got {a.shape} and {b.shape}")
        d = a - b
        means.append(float(d.mean()))
        draws.append(_draws(d, rng, B))
    pooled = np.mean(draws, axis=0)
    tail = (1.0 - level) / 2
    return {"mean": float(np.mean(means)), "ci_low": float(np.quantile(pooled, tail)), "ci_high": float(np.quantile(pooled, 1 - tail))}


__all__ = ["paired_difference"]
