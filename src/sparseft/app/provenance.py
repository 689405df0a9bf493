"""What a results record needs to be reproduced (``run_metadata``), shared by ``sparseft train``,
``bench`` and the suite."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def run_metadata(args: argparse.Namespace | None = None, **resolved: Any) -> dict[str, Any]:
    """What a results record needs to be reproduced: the settings, library versions, the git
    revision of the code when it is a checkout, and a UTC timestamp."""
    import datetime
    import importlib.metadata
    import subprocess

    from .. import __version__

    versions = {"sparseft": __version__}  # (the code that ran, also from a checkout's src/ with no install: gpu.sh)
    for package in ("torch", "transformers", "peft", "safetensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git = None
    settings = {k: v for k, v in vars(args).items() if k != "func" and not callable(v)} if args is not None else {}
    return {"settings": {**settings, **resolved}, "versions": versions, "git_revision": git,
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
