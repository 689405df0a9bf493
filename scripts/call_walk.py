"""Walk what ``app/train.py:run_classification`` calls inside the package, for a short real run.

    python scripts/call_walk.py [--src src] [--model DIR] [--method sparsegrad]

Traces every call into a function of the package (sys.setprofile), keeps each function's first
call (the loop's repeats add nothing), and prints:

- stays: maximal runs of consecutive first calls in one file (the files the walk moves through);
- re-entries: for each file, how many separate stays it has;
- climbs: calls from a module into one that imports it (directly or not): control going back up
  the layering (a lower module calling into a higher one), counted per (caller, callee) call;

with the run on MiniLM: 2 steps, 1 calibration batch, 64 test rows of Rotten Tomatoes.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="src")
    ap.add_argument("--method", default="sparsegrad")
    args = ap.parse_args()
    src = Path(args.src).resolve()
    sys.path.insert(0, str(src))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from import_graph import imports, modules

    import torch

    from sparseft.app.data import rotten_tomatoes, split_dataset
    from sparseft.app.resources import default_model_dir
    from sparseft.app.train import RunSettings, run_classification

    torch.set_num_threads(1)
    mods = modules(src, "sparseft")
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    below: dict[str, set[str]] = {}  # module -> every module it imports, directly or not

    def reach(m: str) -> set[str]:
        if m not in below:
            below[m] = set()
            for d in graph[m]:
                below[m] |= {d} | reach(d)
        return below[m]

    by_file = {str(p.resolve()): name for name, p in mods.items()}
    splits = split_dataset(rotten_tomatoes())
    splits = {k: v.subset(list(range(64))) for k, v in splits.items()}
    settings = RunSettings(model_dir=str(default_model_dir()), method=args.method, steps=2, calibration_steps=1,
                           batch_size=8, show_progress=False)
    seen: set = set()
    walk: list[str] = []
    climbs: Counter = Counter()

    def caller_module(frame) -> str | None:
        f = frame.f_back
        while f is not None:
            m = by_file.get(f.f_code.co_filename)
            if m is not None:
                return m
            f = f.f_back
        return None

    def profile(frame, event, arg) -> None:
        if event != "call":
            return
        module = by_file.get(frame.f_code.co_filename)
        if module is None or frame.f_code in seen:
            return
        seen.add(frame.f_code)
        walk.append(module)
        caller = caller_module(frame)
        if caller is not None and caller != module and caller in reach(module):
            climbs[(caller, module)] += 1

    sys.setprofile(profile)
    try:
        run_classification(settings, splits)
    finally:
        sys.setprofile(None)
    stays = [m for i, m in enumerate(walk) if i == 0 or walk[i - 1] != m]
    entries = Counter(stays)
    short = lambda m: m.removeprefix("sparseft.")  # noqa: E731
    print(f"{len(walk)} functions first called; {len(stays)} stays in {len(entries)} files; "
          f"{sum(climbs.values())} climbs ({len(climbs)} distinct caller -> callee)")
    print("re-entries per file: " + ", ".join(f"{short(m)} {n}" for m, n in entries.most_common()))
    for (a, b), n in climbs.most_common():
        print(f"  climb {short(a)} -> {short(b)}: {n}")


if __name__ == "__main__":
    main()
