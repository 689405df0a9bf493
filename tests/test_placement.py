"""`--device` / `--precision`: resolved once, printed at the start, recorded in every result, and
the run trains and evaluates there (on this CPU: fp32, and bf16 / fp16 autocast). A GPU is not
here: what is checked is the plumbing and its errors; `benchmarks/gpu.sh` runs a CUDA job."""

from __future__ import annotations

import json

import pytest
import torch
from test_bench import tiny  # noqa: F401  (the tiny BERT checkpoint and CSV fixture)

from sparseft import ConfigError
from sparseft.app.cli import main
from sparseft.app.placement import Placement, resolve


def test_auto_is_this_machine_and_bad_choices_name_the_fix():
    auto = resolve()
    assert auto == (Placement("cuda:0", "bf16" if torch.cuda.is_bf16_supported() else "fp32") if torch.cuda.is_available()
                    else Placement("cpu", "fp32"))
    assert resolve("cpu", "bf16") == Placement("cpu", "bf16")
    for device, precision, message in (("tpu", "auto", "--device 'tpu' is not known"), ("cuda:x", "auto", "is not known"),
                                       ("cpu", "fp8", "--precision 'fp8'")):
        with pytest.raises(ConfigError, match=message):
            resolve(device, precision)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            resolve("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_a_device_this_torch_lacks_is_refused_before_the_heavy_imports():
    """The device is checked as soon as torch is imported: the error came after 5.9 s of
    importing transformers, peft and the app (1.4 s now)."""
    import subprocess
    import sys

    probe = ("import sys; from sparseft.app.cli import main; rc = main(['train', '--device', 'cuda', '--no-save']); "
             "print(rc, 'transformers' in sys.modules, 'sparseft.app.train' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], (done.stdout, done.stderr)
    assert "sees no CUDA device; use --device cpu" in done.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_train_runs_where_it_is_told_and_says_so(tiny, tmp_path, capsys, precision):  # noqa: F811
    model_dir, data = tiny
    out = tmp_path / precision
    assert main(["train", "--model", model_dir, "--data", data, "--steps", "3", "--batch-size", "8", "--calibration-steps", "2",
                 "--rank", "2", "--no-progress", "--device", "cpu", "--precision", precision, "--output-dir", str(out)]) == 0
    assert f"device: cpu (CPU), {precision}" in capsys.readouterr().err
    (record,) = json.loads((out / "results.json").read_text())
    assert (record["device"], record["precision"]) == ("cpu", precision)
    assert 0.0 <= record["accuracy"] <= 1.0 and all(loss == loss for _, loss in record["loss_curve"])
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", data, "--device", "cpu",
                 "--precision", precision]) == 0
    printed = capsys.readouterr()
    assert f"device: cpu (CPU), {precision}" in printed.err and json.loads(printed.out)["rows"] > 0


def test_autocast_reaches_the_sparse_update():
    """Under bf16 the adapted layers' products run in bf16 (autocast), the trained values stay float32."""
    from conftest import ARCHS, make_batches
    from sparseft import SparseGradConfig, get_sparse_model
    from sparseft.update import SparseDelta

    model = get_sparse_model(ARCHS["bert"](), SparseGradConfig(match_lora_rank=2))
    model.calibrate(make_batches("bert", 2), steps=2, show_progress=False)
    seen = []
    forward = SparseDelta.forward

    def spy(self, x, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, x, *args, **kwargs)

    SparseDelta.forward = spy
    try:
        with Placement("cpu", "bf16").autocast():
            loss = model(**make_batches("bert", 1)[0]).loss
        loss.backward()
    finally:
        SparseDelta.forward = forward
    assert seen and all(seen)
    assert all(layer.param.dtype == torch.float32 and layer.param.grad is not None for layer in model.sparse_layers().values())


def test_a_half_precision_checkpoint_trains_with_float32_weights(tiny, tmp_path, capsys):  # noqa: F811
    """A `.half()` checkpoint (what users load on GPUs) used to train into NaN within two steps
    on the CPU; the jobs now load it with float32 weights, and the run and `predict` stay finite."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir, data = tiny
    half = tmp_path / "half"
    AutoModelForSequenceClassification.from_pretrained(model_dir).half().save_pretrained(half)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(half)
    out = tmp_path / "run"
    assert main(["train", "--model", str(half), "--data", data, "--steps", "5", "--batch-size", "8", "--calibration-steps", "2",
                 "--rank", "2", "--no-progress", "--device", "cpu", "--output-dir", str(out)]) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert all(loss == loss and abs(loss) < 1e3 for _, loss in record["loss_curve"])
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--text", "a great movie", "--device", "cpu"]) == 0
    probability = json.loads(capsys.readouterr().out.splitlines()[-1])["probability"]
    assert 0.0 <= probability <= 1.0
