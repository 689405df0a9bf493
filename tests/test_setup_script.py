"""scripts/setup.sh stops before pip when the disk cannot hold a first install, naming the fix
(a full disk otherwise fails pip half-way with a bare OSError, as CI once did)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"


def test_a_disk_too_small_stops_set_up_before_anything_is_written(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SETUP, tmp_path / "scripts" / "setup.sh")
    env = {**os.environ, "PYTHON": sys.executable, "SPARSEFT_SETUP_MIN_FREE_GIB": str(10**9)}
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1
    assert "GiB free on the disk holding" in out.stderr and "pip cache purge" in out.stderr
    assert not (tmp_path / ".venv").exists()
