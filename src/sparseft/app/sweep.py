"""The learning-rate sweep's rule, one for `sparseft bench` and the suite: rates on a grid of
factors around a method's default (``methods.LEARNING_RATES``), the best by validation score,
and whether it sits at an end of the grid (then the grid grows past it, a ×3 step at a time, up
to ``max_extend`` times)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

SWEEP_FACTORS = (1 / 3, 1.0, 3.0)  # the grid around each default rate (grown past an edge: step_past)


def rate_at(centre: float, factor: float) -> float:
    """``centre × factor`` to three significant digits (so rates read and compare cleanly)."""
    return float(f"{centre * factor:.3g}")


def rate_grid(centre: float, factors: Iterable[float]) -> list[float]:
    return [rate_at(centre, f) for f in sorted(factors)]


def choose_rate(scores: Mapping[float, float], centre: float, higher_is_better: bool = True) -> tuple[float | None, str | None]:
    """(the rate of the best finite score, "low"/"high" when it is the lowest/highest rate tried,
    else None). Ties go to the rate nearest ``centre``; no finite score: (None, None). A grid of
    one rate counts as "high" (the suite extends it upwards)."""
    rates = sorted(scores)
    ok = [(r, s) for r, s in scores.items() if s is not None and math.isfinite(s)]
    if not ok:
        return None, None
    sign = 1 if higher_is_better else -1
    best = max(ok, key=lambda rs: (sign * rs[1], -abs(math.log(rs[0] / centre))))[0]
    if len(rates) == 1:
        return best, "high"
    return best, "low" if best == rates[0] else "high" if best == rates[-1] else None


def step_past(grid: Iterable[float], edge: str) -> float:
    """The next value of a grid of factors or rates past its ``edge`` ("low"/"high"): one more
    ×3 step, so an extended grid keeps its spacing."""
    values = sorted(grid)
    return values[0] / 3 if edge == "low" else values[-1] * 3


__all__ = ["SWEEP_FACTORS", "choose_rate", "rate_at", "rate_grid", "step_past"]
