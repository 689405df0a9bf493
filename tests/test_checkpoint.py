"""Training checkpoints: resuming equals an uninterrupted run; SIGKILL mid-save leaves the previous
checkpoint loadable; mismatches are clear errors; the file holds safetensors + JSON only."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_bert_checkpoint
import torch
from transformers import BertConfig, BertForSequenceClassification, get_linear_schedule_with_warmup

from sparseft import AdapterMismatchError, MePropConfig, SparseAdamW, SparseGradConfig, get_sparse_model
from sparseft.app.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed: int = 0, dropout: float = 0.1):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


def data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 64, (4, 10), generator=gen), "labels": torch.randint(0, 2, (4,), generator=gen)}
            for _ in range(n)]


def setup(method: str, calibrate: bool):
    config = {"fixed": SparseGradConfig(density=0.05), "dynamic": SparseGradConfig(density=0.05, selection="dynamic"),
              "meprop": MePropConfig(density=0.05)}[method]
    model = get_sparse_model(tiny(), config)
    if calibrate:
        model.calibrate(data(3, seed=1), show_progress=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2) if method == "fixed" else SparseAdamW(params, lr=1e-2)
    return model, opt, get_linear_schedule_with_warmup(opt, 2, 8)


def run(model, opt, sched, start: int, stop: int, ckpt: Path | None = None, every: int = 0) -> None:
    model.train()
    for step, batch in enumerate(data(8, seed=2)[start:stop], start + 1):
        # consumes every RNG a real loop may use: dropout (torch), python, numpy
        loss = model(**batch).loss * (1 + 0 * random.random() + 0 * np.random.rand())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if every and step % every == 0:
            save_checkpoint(ckpt, model, opt, sched, step, extra={"note": "test"})


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["fixed", "dynamic", "meprop"])
def test_resume_equals_uninterrupted(method: str, tmp_path: Path) -> None:
    model, opt, sched = setup(method, calibrate=True)
    run(model, opt, sched, 0, 8, tmp_path, every=3)  # saves at steps 3 and 6
    full = trained(model)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-00000003.safetensors", "checkpoint-00000006.safetensors"]

    # a new process would start from other RNG states and an uncalibrated model
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    model2, opt2, sched2 = setup(method, calibrate=False)
    info = load_checkpoint(tmp_path / "checkpoint-00000003.safetensors", model2, opt2, sched2)
    assert info["step"] == 3 and info["extra"] == {"note": "test"}
    run(model2, opt2, sched2, info["step"], 8)
    resumed = trained(model2)
    diff = max(float((full[k] - resumed[k]).abs().max()) for k in full)
    print(f"{method}: max |uninterrupted - resumed| = {diff}")
    assert all(torch.equal(full[k], resumed[k]) for k in full), diff
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_latest_pointer_and_keep(tmp_path: Path) -> None:
    model, opt, sched = setup("fixed", calibrate=True)
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, opt, sched, step, keep=2)
    assert latest_checkpoint(tmp_path).name == "checkpoint-00000003.safetensors"
    assert len(checkpoints(tmp_path)) == 2
    assert load_checkpoint(tmp_path, setup("fixed", calibrate=False)[0])["step"] == 3


def test_checkpoint_is_safetensors_and_json_only(tmp_path: Path) -> None:
    model, opt, sched = setup("dynamic", calibrate=True)
    run(model, opt, sched, 0, 2)
    path = save_checkpoint(tmp_path, model, opt, sched, 2)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])  # plain JSON, then raw tensor bytes
    meta = json.loads(header["__metadata__"]["sparseft"])
    assert meta["kind"] == "checkpoint" and meta["optimizer"]["class"] == "SparseAdamW"
    assert any(k.startswith("bases.") for k in header) and any(k.startswith("optim.") for k in header)
    assert b"\x80\x04" not in path.read_bytes()[:16]  # not a pickle


def test_mismatches_are_clear_errors(tmp_path: Path) -> None:
    model, opt, sched = setup("fixed", calibrate=True)
    path = save_checkpoint(tmp_path, model, opt, sched, 1)
    other_weights = get_sparse_model(tiny(seed=5), SparseGradConfig(density=0.05))
    with pytest.raises(AdapterMismatchError, match="another base model"):
        load_checkpoint(path, other_weights)
    other_budget = get_sparse_model(tiny(), SparseGradConfig(density=0.1))
    with pytest.raises(AdapterMismatchError, match="trainable parameters"):
        load_checkpoint(path, other_budget)
    m, _, _ = setup("fixed", calibrate=False)
    with pytest.raises(AdapterMismatchError, match="not SparseAdamW"):
        load_checkpoint(path, m, SparseAdamW([p for p in m.parameters() if p.requires_grad]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterMismatchError, match="No checkpoint"):
        load_checkpoint(tmp_path / "empty", m)


CHILD = r"""
import os, sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint import setup, run
from sparseft.app.checkpoint import save_checkpoint
out = sys.argv[1]
model, opt, sched = setup("fixed", calibrate=True)
run(model, opt, sched, 0, 2)
save_checkpoint(out, model, opt, sched, 2)
print("saved 2", flush=True)
run(model, opt, sched, 2, 3)
os.environ["SPARSEFT_CHECKPOINT_PAUSE_BEFORE_RENAME"] = "120"
save_checkpoint(out, model, opt, sched, 3)
print("saved 3", flush=True)
"""


@pytest.mark.slow
def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the new file is fully written and waits to be renamed
            temps = list(out.glob(".checkpoint-00000003.safetensors.*.tmp")) if out.exists() else []
            if temps and temps[0].stat().st_size > 0:
                break
            assert child.poll() is None, child.stderr.read()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the child never reached the save of step 3")
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert "saved 3" not in child.stdout.read()
    assert latest_checkpoint(out).name == "checkpoint-00000002.safetensors"
    assert [p.name for p in checkpoints(out)] == ["checkpoint-00000002.safetensors"]  # the .tmp is ignored
    model, opt, sched = setup("fixed", calibrate=False)
    assert load_checkpoint(out, model, opt, sched)["step"] == 2
    assert model.is_calibrated


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer random BERT (dropout 0.1) with the embedded MiniLM tokenizer, for the CLI."""
    return save_tiny_bert_checkpoint(tmp_path_factory.mktemp("tinybert"), max_position_embeddings=32)


@pytest.mark.parametrize("method", ["sparsegrad-fixed", "sparsegrad-dynamic"])
def test_cli_resume_equals_uninterrupted(tiny_checkpoint: Path, tmp_path: Path, method: str) -> None:
    """`sparseft train --checkpoint-every 3`, then a run that lost everything after step 3 and
    continues with `--resume`: the same step-6 weights, loss curve and accuracy."""
    import shutil

    from safetensors.torch import load_file

    from sparseft.app.cli import main

    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} movie number {i} of {i * 7},{i % 2}\n" for i in range(160)))
    base = ["train", "--model", str(tiny_checkpoint), "--data", str(data), "--steps", "6", "--calibration-steps", "2",
            "--batch-size", "8", "--max-length", "16", "--no-progress", "--method", method, "--checkpoint-every", "3"]
    assert main(base + ["--output-dir", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / "checkpoints" / "seed-0"
    crashed = tmp_path / "b" / "checkpoints" / "seed-0"
    crashed.mkdir(parents=True)
    shutil.copy(saved / "checkpoint-00000003.safetensors", crashed)  # only step 3 survived
    shutil.copy(saved / "checkpoint-00000006.safetensors", tmp_path / "final-a.safetensors")
    before = (crashed / "checkpoint-00000003.safetensors").stat().st_mtime_ns
    assert main(base + ["--output-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b")]) == 0
    # it resumed (no calibration, step 3 not redone) rather than silently starting over
    assert (crashed / "checkpoint-00000003.safetensors").stat().st_mtime_ns == before
    a = load_file(tmp_path / "final-a.safetensors")
    b = load_file(crashed / "checkpoint-00000006.safetensors")
    params = [k for k in a if k.startswith("param.")]
    assert params and all(torch.equal(a[k], b[k]) for k in params)
    ra = json.loads((tmp_path / "a" / "results.json").read_text())[0]
    rb = json.loads((tmp_path / "b" / "results.json").read_text())[0]
    assert (ra["accuracy"], ra["loss_curve"], ra["final_loss"]) == (rb["accuracy"], rb["loss_curve"], rb["final_loss"])
    assert ra["calibration_s"] > 0 and rb["calibration_s"] == 0
