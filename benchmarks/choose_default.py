"""The study's rule for the default (docs/benchmark.md, "Which basis earns its cost"), applied to
suite records: validation accuracy only, each configuration at its one centre rate, or (``--swept``)
at the rate its suite sweep chose per task (suite.json's ``lr``).

    python benchmarks/choose_default.py [--swept] --suite runs/study4-peft [--suite runs/study4-paper] [--seeds 2]

Per regime: the best configuration (highest mean validation accuracy over the (task, seed)
cells), every other's paired difference to it (mean, 95% t-interval over the cells), "within
reach" when the interval's upper end is ≥ 0. The default is the first configuration, cheapest
cost class first (then the higher pooled mean), within reach in every regime given. Prints a
markdown table per regime and the choice; test accuracy is printed for the record only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from sparseft.app.suite import SuiteSettings
from sparseft.methods import canonical, without_lr

# two-sided 95% Student t quantiles by degrees of freedom (no scipy here)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201,
       12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131}

# (basis, support) of each configuration, by method and config options (the rate option aside);
# cost classes: a = nothing beyond the sparse update, b = one-time bases and a rotation per step,
# c = a gradient scoring pass for the support, d = a top-k of the whole gradient every step
CELLS = {
    ("meprop-fixed", "support_criterion=random"): ("identity", "random", "a"),
    ("s2ft", ""): ("S2FT channels", "random rows/columns", "a"),
    ("sparsegrad-onesided", "basis_source=weights"): ("weight SVD", "random", "b"),
    ("sparsegrad-onesided", ""): ("gradient HOSVD", "random (the default)", "b"),
    ("meprop-fixed", "support_criterion=sum"): ("identity", "calibrated |ΣG̃|", "c"),
    ("sparsegrad-fixed", "rotation=narrow;support_criterion=sum"): ("gradient HOSVD", "calibrated |ΣG̃|", "c"),
    ("sparsegrad-fixed", "basis_source=weights;rotation=narrow;support_criterion=sum"): ("weight SVD", "calibrated |ΣG̃|", "c"),
    ("meprop", ""): ("identity", "dynamic top-k", "d"),
    ("sparsegrad-dynamic", "rotation=narrow"): ("gradient HOSVD", "dynamic top-k", "d"),
    ("sparsegrad-dynamic", "basis_source=weights;rotation=narrow"): ("weight SVD", "dynamic top-k", "d"),
}
REFERENCES = {("lora-mlp", ""): "LoRA-MLP (reference)", ("shira", ""): "peft SHiRA (reference)",
              ("sparsegrad-dynamic", ""): "two-sided gradient × dynamic (the paper's; reference)"}


cell_key = without_lr  # a configuration is its method and options, whatever rate it ran at


def load(folder: Path, seeds: int, swept: bool = False) -> tuple[str, dict[tuple[str, str], dict[tuple[str, int], dict]]]:
    """(regime, {configuration: {(task, seed): record}}) at each configuration's centre rate, or
    with ``swept`` at the rate the suite chose for it on that task."""
    settings = json.loads((folder / "suite_settings.json").read_text())
    regime = settings["regime"]
    centre = SuiteSettings(regime=regime).centre
    chosen = {(row["task"], cell_key(row["method"])): row["lr"] for row in json.loads((folder / "suite.json").read_text())
              if row["task"] != "pooled" and row.get("lr") is not None} if swept else {}
    runs: dict = {}
    for line in (folder / "records.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("regime") != regime or r["seed"] >= seeds or "val_accuracy" not in r:
            continue
        key = cell_key(r["method"])
        if key not in CELLS and key not in REFERENCES:
            continue
        rate = chosen.get((r["task"], key)) if swept else centre(canonical(r["method"]))
        if rate is None or not math.isclose(r["lr"], rate, rel_tol=1e-6):
            continue
        runs.setdefault(key, {})[(r["task"], r["seed"])] = r
    return regime, runs


def interval(diffs: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, -math.inf, math.inf
    half = T95.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def regime_table(regime: str, runs: dict, swept: bool = False) -> tuple[list[str], dict[tuple[str, str], bool], dict[tuple[str, str], float]]:
    cells = sorted({c for r in runs.values() for c in r})
    tasks = sorted({t for t, _ in cells})
    complete = {k: v for k, v in runs.items() if set(v) == set(cells)}
    mean = {k: statistics.fmean(r["val_accuracy"] for r in v.values()) * 100 for k, v in complete.items()}
    best = max((k for k in complete if k in CELLS), key=mean.get)
    reach, lines = {}, [f"**{regime} regime** ({len(tasks)} tasks × {len(cells) // max(len(tasks), 1)} seeds; "
                        f"validation %, each at {'its swept rate per task' if swept else 'its centre rate'}; "
                        f"best: `{best[0]}[{best[1]}]`)", "",
                        "| basis | support | cost | " + " | ".join(tasks) + " | mean val % | Δ vs best, 95% t-interval | within reach |"
                        " mean test % | step s | calibration s |" + (" rate per task |" if swept else ""),
                        "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|---|" + ("---|" if swept else "")]
    order = sorted(complete, key=lambda k: (CELLS.get(k, ("", "", "z"))[2], -mean[k]))
    for k in order:
        v = complete[k]
        basis, support, cost = CELLS.get(k, (REFERENCES.get(k, k[0]), "", "—"))
        per_task = [statistics.fmean(v[(t, s)]["val_accuracy"] for (t, s) in cells if t == task) * 100 for task in tasks]
        d, lo, hi = interval([(v[c]["val_accuracy"] - complete[best][c]["val_accuracy"]) * 100 for c in cells])
        reach[k] = hi >= 0 if k in CELLS else False
        test = statistics.fmean(r["test_accuracy"] for r in v.values()) * 100
        step = statistics.median(r["step_time_s"] for r in v.values())
        calib = statistics.median(r["calibration_s"] for r in v.values())
        lines.append(f"| {basis} | {support} | {cost} | " + " | ".join(f"{a:.2f}" for a in per_task)
                     + f" | {mean[k]:.2f} | {d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {'yes' if reach[k] else ('—' if k not in CELLS else 'no')}"
                     f" | {test:.2f} | {step:.3f} | {calib:.1f} |"
                     + (" " + ", ".join(f"{v[(t, 0)]['lr']:g}" for t in tasks) + " |" if swept else ""))
    missing = sorted(set(CELLS) - set(complete))
    if missing:
        lines += ["", "Not complete in this regime (left out): " + ", ".join(f"`{n}[{o}]`" for n, o in missing)]
    return lines, reach, mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", action="append", required=True, type=Path, help="a suite output folder (one per regime)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--swept", action="store_true", help="each configuration at its suite-chosen rate per task")
    args = ap.parse_args()
    reach_all, pooled = None, {}
    for folder in args.suite:
        regime, runs = load(folder, args.seeds, args.swept)
        lines, reach, mean = regime_table(regime, runs, args.swept)
        print("\n".join(lines), "\n")
        reach_all = reach if reach_all is None else {k: reach_all.get(k, False) and ok for k, ok in reach.items()}
        for k, m in mean.items():
            pooled.setdefault(k, []).append(m)
    candidates = [k for k, ok in (reach_all or {}).items() if ok]
    if not candidates:
        print("chosen by the rule: none: no configuration is within reach of the best in every regime given")
        return
    chosen = min(candidates, key=lambda k: (CELLS[k][2], -statistics.fmean(pooled[k])))
    basis, support, cost = CELLS[chosen]
    print(f"chosen by the rule: `{chosen[0]}[{chosen[1]}]` ({basis} × {support}, cost class {cost}); "
          f"within reach in every regime given: {', '.join(f'`{n}[{o}]`' for n, o in candidates)}")


if __name__ == "__main__":
    main()
