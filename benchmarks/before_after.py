"""One benchmark, two source trees, alternating: step-time ratios to LoRA before and after a change.

    python benchmarks/before_after.py --before /tmp/before --after . [--repeats 2] -- model_step.py --model minilm ...
    python benchmarks/before_after.py --before /tmp/before --after . -- step_time.py --shapes bert --steps-only ...

Runs ``<tree>/benchmarks/<script> <args> --out DIR`` with ``PYTHONPATH=<tree>/src`` for the
trees in turn (before, after, before, after, ...), so both see the same machine load, and prints
each method's ratio to LoRA per run and its median per tree (model_step.py: ``vs_lora_mlp``;
step_time.py: ``vs_lora`` per shape and N). The ratios come from within each run (methods
interleaved round by round), so drift between runs cancels.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def ratios(script: str, out: Path) -> dict[str, float]:
    if script.startswith("model_step"):
        doc = json.loads(next(out.glob("model_step_*.json")).read_text())
        return {m: r["vs_lora_mlp"] for m, r in doc["methods"].items()}
    doc = json.loads((out / "step_time.json").read_text())
    return {f"{shape} N={n} {m}": v for shape, by_n in doc["step_time"].items() for n, res in by_n.items()
            for m, v in res["vs_lora"].items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", default=".")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS...")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    script, rest = command[0], command[1:]
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    got: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for label, tree in trees.items():
                out = Path(tmp) / f"{label}-{i}"
                env = dict(os.environ, PYTHONPATH=str(tree / "src"))
                print(f"[{label} {i + 1}/{args.repeats}] {script} {' '.join(rest)}", flush=True)
                subprocess.run([sys.executable, str(tree / "benchmarks" / script), *rest, "--out", str(out)],
                               env=env, cwd=tree, check=True, stdout=subprocess.DEVNULL)
                got[label].append(ratios(script, out))
    keys = [k for k in got["after"][0] if all(k in run for runs in got.values() for run in runs)]
    width = max(map(len, keys))
    print(f"\n{'ratio to LoRA':{width}s}  " + "  ".join(f"{label:>{8 * args.repeats + 8}s}" for label in trees))
    for key in keys:
        cells = []
        for label in trees:
            values = [run[key] for run in got[label]]
            cells.append(" ".join(f"{v:7.3f}" for v in values) + f"  med {statistics.median(values):5.3f}")
        print(f"{key:{width}s}  " + "   ".join(cells))


if __name__ == "__main__":
    main()
