"""The study's rule for the default (benchmarks/choose_default.py) on constructed suite folders
whose answer is known: the best, "within reach", the cost order, and the swept rates."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rule():
    spec = importlib.util.spec_from_file_location("choose_default", ROOT / "benchmarks" / "choose_default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _suite(folder: Path, regime: str, runs: dict[str, dict[float, list[float]]], chosen: dict[str, float]) -> Path:
    """A suite folder: ``runs[method][lr]`` = validation accuracy per seed on two tasks (the same
    values on both, shifted by the task); suite.json holds ``chosen[method]`` as each task's rate."""
    folder.mkdir()
    (folder / "suite_settings.json").write_text(json.dumps({"regime": regime}))
    lines, rows = [], []
    for method, by_rate in runs.items():
        for lr, vals in by_rate.items():
            for task, shift in (("a", 0.0), ("b", 0.1)):
                for seed, v in enumerate(vals):
                    lines.append(json.dumps({"task": task, "method": method, "lr": lr, "seed": seed, "regime": regime,
                                             "val_accuracy": v + shift, "test_accuracy": v, "step_time_s": 0.1,
                                             "calibration_s": 0.0}))
        rows += [{"task": task, "method": method, "lr": chosen.get(method, next(iter(by_rate)))} for task in ("a", "b")]
    (folder / "records.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "suite.json").write_text(json.dumps(rows))
    return folder


def test_the_rule_picks_the_cheapest_within_reach_in_every_regime(tmp_path, rule, capsys) -> None:
    peft = _suite(tmp_path / "peft", "peft", {  # each at its peft centre rate
        # the default: best in peft; identity x random a hair below with noise (within reach); calibrated far below
        "sparsegrad": {9e-3: [0.80, 0.82, 0.81]},
        "meprop-fixed[support_criterion=random;lr=0.009]": {9e-3: [0.81, 0.80, 0.80]},
        "meprop-fixed[support_criterion=sum]": {3e-3: [0.70, 0.71, 0.70]},
    }, {})
    paper = _suite(tmp_path / "paper", "paper", {
        # at the centre (3e-4) the random supports are below the calibrated one; at 9e-4 they lead
        "sparsegrad": {3e-4: [0.70, 0.70, 0.70], 9e-4: [0.76, 0.77, 0.76]},
        "meprop-fixed[support_criterion=random]": {3e-4: [0.70, 0.70, 0.70], 9e-4: [0.77, 0.76, 0.76]},
        "meprop-fixed[support_criterion=sum]": {3e-4: [0.72, 0.72, 0.72], 9e-4: [0.74, 0.74, 0.74]},
    }, {"sparsegrad": 9e-4, "meprop-fixed[support_criterion=random]": 9e-4, "meprop-fixed[support_criterion=sum]": 3e-4})

    regime, runs = rule.load(peft, seeds=3)
    lines, reach, mean = rule.regime_table(regime, runs)
    assert reach == {("sparsegrad-onesided", ""): True, ("meprop-fixed", "support_criterion=random"): True,
                     ("meprop-fixed", "support_criterion=sum"): False}
    assert "best: `sparsegrad-onesided[]`" in lines[0]

    # at the centre rates nothing is within reach in both regimes; at the swept rates the cheapest class is
    for argv, expected in (
        ([], "chosen by the rule: none"),
        (["--swept"], "chosen by the rule: `meprop-fixed[support_criterion=random]` (identity × random, cost class a)"),
    ):
        sys_argv, sys.argv = sys.argv, ["choose_default.py", *argv, "--seeds", "3", "--suite", str(peft), "--suite", str(paper)]
        try:
            rule.main()
        finally:
            sys.argv = sys_argv
        out = capsys.readouterr().out
        assert expected in out, out
    assert "rate per task" in out and "0.0009, 0.0009" in out
