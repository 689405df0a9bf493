"""`benchmarks/gpu.sh`, the one command a lent GPU runs, run here first: its smoke mode
(``GPU_SH_SMOKE=1``) takes every step of it on this CPU at toy sizes, with the payload that
`scripts/gpu_payload.py` writes, so a flag or script that rotted fails here and not in the few
minutes of a GPU loan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_gpu_sh_runs_every_step_and_writes_its_results(tmp_path):
    payload, out = tmp_path / "payload", tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    made = subprocess.run([sys.executable, "scripts/gpu_payload.py", "--out", str(payload)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    run = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**env, "GPU_SH_SMOKE": "1", "GPU_PAYLOAD": str(payload), "OUT": str(out), "PYTHON": sys.executable})
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert "gpu.sh: tests and benchmarks done (status 0)" in run.stdout

    # the device tool brings back at most 8 files, 2 folders down at most: all of them come back
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8 and all(len(f.parts) <= 3 for f in files), files
    log = (out / "gpu.log").read_text()
    assert "skipped" in log and "gpu.sh: tests and benchmarks done (status 0)" in log  # (no CUDA here: collected, every one skipped)
    for step in ("the decoder", "the blocks", "sparseft train", "the CUDA tests (limit "):
        assert f"gpu.sh: {step}" in log, step  # each step's time, to size the next loan's
    decoder = json.loads((out / "decoder_step.json").read_text())
    timed = decoder["tokens"]["2x64"]["methods"]
    assert {"full", "lora-mlp", "shira", "sparse-random", "sparse-random[cache_update=True]", "sparsegrad-dynamic"} <= set(timed)
    assert all(m["median_step_s"] > 0 for m in timed.values())
    block = json.loads((out / "step_time.json").read_text())["step_time"]["bert-base 768x3072"]["64"]["vs_lora"]
    assert {"sparse-random", "sparse-random-triton", "sparsegrad-fixed-1side-triton", "shira"} <= set(block)
    (record,) = json.loads((out / "train" / "results.json").read_text())
    assert (record["method"], record["device"], record["steps"]) == ("sparse-random", "cpu", 3)
    assert 0 < record["accuracy"] <= 1


def test_gpu_quantized_sh_times_the_4bit_decoder_and_runs_its_cuda_tests(tmp_path):
    """The second device call (QLoRA's setting), on this CPU with its bitsandbytes: the decoder with
    NF4 blocks per method, and the 4-bit CUDA tests, run here on the CPU."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "out"
    run = subprocess.run(["bash", "benchmarks/gpu_quantized.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "GPU_SH_SMOKE": "1", "OUT": str(out),
                              "PYTHON": sys.executable})
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    log = (out / "gpu_quantized.log").read_text()
    assert "weights NF4" in log and "2 passed" in log and "gpu_quantized.sh: done (status 0)" in log
    timed = json.loads((out / "decoder_step.json").read_text())["tokens"]["2x64"]["methods"]
    assert set(timed) == {"lora-mlp", "sparse-random", "sparsegrad-onesided"} and all(m["median_step_s"] > 0 for m in timed.values())
    assert all(m["nf4_layers"] == 14 for m in timed.values())  # (2 blocks × 7 linear layers, each adapted one inside its adapter)
    assert sorted(p.name for p in out.iterdir()) == ["decoder_step.json", "gpu_quantized.log"]


def test_the_decoder_benchmark_measures_peak_memory_on_a_cpu_too(tmp_path):
    """``decoder_step.py --cpu-peak``: each method's peak resident bytes from a fresh process, the
    CPU stand-in for CUDA's peak allocated (docs/performance.md)."""
    run = subprocess.run([sys.executable, "benchmarks/decoder_step.py", "--shape", "tiny", "--device", "cpu", "--precision", "bf16",
                          "--tokens", "1x16", "--rounds", "1", "--warmup", "0", "--methods", "lora-mlp,sparse-random", "--cpu-peak",
                          "--out", str(tmp_path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((tmp_path / "decoder_step.json").read_text())["tokens"]["1x16"]["methods"]
    assert set(rows) == {"lora-mlp", "sparse-random"}
    for row in rows.values():
        assert row["peak_kind"].startswith("peak resident") and 0 < row["peak_bytes"] < 2**30


def test_the_decoder_benchmark_counts_each_methods_ops(tmp_path):
    """``decoder_step.py --count-ops``: the aten ops of one step per method, views aside (each a
    kernel launch on a GPU). The default's merges add no index arithmetic: it runs fewer than
    LoRA-MLP's step, whose two small products per layer are launches too."""
    run = subprocess.run([sys.executable, "benchmarks/decoder_step.py", "--shape", "tiny", "--device", "cpu", "--precision", "bf16",
                          "--tokens", "1x16", "--methods", "lora-mlp,sparse-random", "--count-ops", "--out", str(tmp_path)],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ops = json.loads((tmp_path / "decoder_ops.json").read_text())["ops_per_step"]
    assert set(ops) == {"lora-mlp", "sparse-random"} and ops["sparse-random"]["mm"] > 0
    assert sum(ops["sparse-random"].values()) < sum(ops["lora-mlp"].values())
    assert not {"floor_divide", "remainder"} & set(ops["sparse-random"])
