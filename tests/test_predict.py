"""`sparseft train` saves what it trained; `sparseft predict` loads it back to the same accuracy."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from sparseft.app.cli import main
from test_bench import tiny  # noqa: F401  (the tiny checkpoint + CSV fixture)


def _no_model_copies(deepcopy):
    """``deepcopy`` that fails on a whole model: `--save-merged` merges in place, since a copy of
    the model would need its device's memory twice at the end of a run."""
    from peft import PeftModel
    from transformers import PreTrainedModel

    from sparseft import BaseTuner

    def checked(value, *args):
        assert not isinstance(value, (PreTrainedModel, PeftModel, BaseTuner)), "the model was copied"
        return deepcopy(value, *args)

    return checked


@pytest.mark.parametrize("method", ["sparsegrad-fixed", "sparsegrad-dynamic", "lora-mlp", "s2ft", "head"])
def test_saved_run_reloads_to_the_same_accuracy(tiny, tmp_path, capsys, monkeypatch, method):  # noqa: F811
    model_dir, data = tiny
    out = tmp_path / "run"
    monkeypatch.setattr(copy, "deepcopy", _no_model_copies(copy.deepcopy))
    assert main(["train", "--model", model_dir, "--data", data, "--method", method, "--steps", "6", "--batch-size", "8",
                 "--calibration-steps", "2", "--rank", "2", "--lr", "0.01", "--no-progress", "--save-merged",
                 "--output-dir", str(out)]) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert "sparseft predict" in capsys.readouterr().out
    run = record["run"]  # what reproduces the record: settings, versions, revision, time
    assert run["settings"]["method"] == method and run["settings"]["steps"] == 6 and run["settings"]["max_length"] == 64
    assert {"torch", "transformers", "sparseft"} <= set(run["versions"]) and run["timestamp"].endswith("+00:00")
    umask = os.umask(0o022)
    os.umask(umask)
    for folder in (out / "adapters" / "seed-0", out / "merged" / "seed-0"):
        # readable as the umask says (safetensors writes 0600, which would hide runs from a team)
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {
            p.name: oct(0o666 & ~umask) for p in folder.iterdir()}
        capsys.readouterr()
        assert main(["predict", "--adapter", str(folder), "--data", data]) == 0
        scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scored["accuracy"] == pytest.approx(record["accuracy"], abs=1e-9), folder
    # the merged folder is a plain transformers model; predict --save-merged makes the same one after the fact
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged" / "seed-0").state_dict()
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", data, "--save-merged",
                 str(tmp_path / "later")]) == 0
    capsys.readouterr()
    later = AutoModelForSequenceClassification.from_pretrained(tmp_path / "later").state_dict()
    assert later.keys() == merged.keys() and all(torch.equal(later[key], merged[key]) for key in merged)
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--text", "the food was very good",
                 "--text", "bad"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(line["label"] in ("neg", "pos") for line in lines)
    # a wrong column or label set is named before the model loads
    import sparseft.app.train

    monkeypatch.setattr(sparseft.app.train, "load_trained", lambda *a, **k: pytest.fail("the model loaded"))
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", data, "--label-column", "stars"]) == 2
    assert "stars" in capsys.readouterr().err
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--text", "good", "--max-new-tokens", "4"]) == 2
    assert "--max-new-tokens: a classifier run" in capsys.readouterr().err


def test_a_record_names_the_code_that_ran_also_from_a_checkout_with_no_install(monkeypatch):
    """gpu.sh runs the repository's src/ on a machine where sparseft is not installed."""
    import importlib.metadata

    import sparseft
    from sparseft.app.provenance import run_metadata

    real = importlib.metadata.version

    def version(name: str) -> str:
        if name == "sparseft":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    versions = run_metadata()["versions"]
    assert versions["sparseft"] == sparseft.__version__ and versions["torch"] == real("torch")


def test_predict_names_the_fix_for_a_wrong_folder(tmp_path, capsys):
    assert main(["predict", "--adapter", str(tmp_path)]) == 2
    assert "sparseft train" in capsys.readouterr().err


BAD = [
    (["train", "--steps", "-5"], "--steps -5 is negative"),
    (["train", "--method", "nope"], "Unknown method 'nope'"),
    (["train", "--density", "3"], "--density 3.0 must be in"),
    (["train", "--resume", "/nonexistent/run"], "no such directory"),
    (["train", "--data", "/nonexistent.csv"], "no such file"),
    (["bench", "--methods", "lora-mlp,nope"], "Unknown method 'nope'"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_arguments_fail_before_anything_heavy_loads(argv, message):
    """Each bad argument exits 2 with a message naming it, and no torch/transformers/data was
    loaded to find out (that is what makes it answer at once)."""
    import subprocess
    import sys

    code = ("import sys; from sparseft.app.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY' if {'torch', 'transformers'} & set(sys.modules) else 'LIGHT'); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stdout.strip() == "LIGHT"


def test_malformed_model_config_is_named(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{not json")
    assert main(["train", "--model", str(tmp_path)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err


def test_help_and_version_load_no_torch():
    import subprocess
    import sys

    code = ("import sys; from sparseft.app.cli import build_parser, main; build_parser(); main(['train', '--steps', '-1']); "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.parametrize("method", ["sparse-random", "lora-mlp", "full"])
def test_a_merged_model_keeps_its_checkpoints_half_precision(tiny, tmp_path, capsys, method):  # noqa: F811
    """A bf16 checkpoint trains with float32 weights; its merged model is stored in bf16 again, as
    the checkpoint it replaces (W0 + ΔW formed in float32, rounded once), by `train` and by
    `predict --save-merged` alike, and a float32 checkpoint's stays float32 (the test above)."""
    import shutil

    model_dir, data = tiny
    half = tmp_path / "bf16"
    shutil.copytree(model_dir, half)
    AutoModelForSequenceClassification.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(half)
    out = tmp_path / "run"
    assert main(["train", "--model", str(half), "--data", data, "--method", method, "--steps", "4", "--batch-size", "8",
                 "--lr", "0.05", "--no-progress", "--save-merged", "--output-dir", str(out)]) == 0
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", data, "--save-merged",
                 str(tmp_path / "later")]) == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    merged = load_file(out / "merged" / "seed-0" / "model.safetensors")
    later = load_file(tmp_path / "later" / "model.safetensors")
    base = load_file(half / "model.safetensors")
    assert json.loads((out / "merged" / "seed-0" / "config.json").read_text())["dtype"] == "bfloat16"
    assert merged.keys() == later.keys() and all(torch.equal(merged[k], later[k]) for k in merged)
    assert all(t.dtype == torch.bfloat16 for t in merged.values() if t.is_floating_point())
    # the update survives the rounding: the MLP weights moved off the checkpoint's
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(merged[name], base[name])
    # and the trained model, float32, is what was rounded: loaded back it scores as the merged model
    assert main(["predict", "--adapter", str(out / "merged" / "seed-0"), "--data", data]) == 0
    assert "accuracy" in capsys.readouterr().out
    # --merged-dtype fp32 keeps the float32 merge, which rounds to the bf16 one
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", data, "--save-merged",
                 str(tmp_path / "wide"), "--merged-dtype", "fp32"]) == 0
    wide = load_file(tmp_path / "wide" / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in wide.values() if t.is_floating_point())
    assert all(torch.equal(wide[k].to(merged[k].dtype), merged[k]) for k in merged)
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--merged-dtype", "fp32"]) == 2
    assert "add --save-merged" in capsys.readouterr().err
    if method == "sparse-random":  # and from `train`: the same run again, merged in float32
        assert main(["train", "--model", str(half), "--data", data, "--method", method, "--steps", "4", "--batch-size", "8",
                     "--lr", "0.05", "--no-progress", "--save-merged", "--merged-dtype", "fp32", "--no-save",
                     "--output-dir", str(tmp_path / "run32")]) == 0
        again = load_file(tmp_path / "run32" / "merged" / "seed-0" / "model.safetensors")
        assert again.keys() == wide.keys() and all(torch.equal(again[k], wide[k]) for k in wide)


def test_a_merged_model_that_passes_its_checkpoints_fp16_range_is_saved_in_float32(tiny, tmp_path, capsys):  # noqa: F811
    """fp16 holds ±65504: a merged weight past it would be saved as inf with exit 0. It is saved
    in float32 instead, with a note; within the range, fp16 as the checkpoint."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sparseft.app.train import save_trained

    model_dir, _ = tiny
    half = tmp_path / "fp16"
    shutil.copytree(model_dir, half)
    AutoModelForSequenceClassification.from_pretrained(model_dir).half().save_pretrained(half)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    for peak, dtype, says in ((6e4, torch.float16, ""), (7e4, torch.float32, "saved in float32")):
        model = AutoModelForSequenceClassification.from_pretrained(half, dtype=torch.float32)
        with torch.no_grad():
            model.get_parameter(name)[0, 0] = peak
        out = tmp_path / f"merged-{peak:g}"
        save_trained(model, tokenizer, {"model_dir": str(half)}, None, str(out))
        saved = load_file(out / "model.safetensors")
        assert saved[name].dtype == dtype and bool(torch.isfinite(saved[name]).all())
        assert says in capsys.readouterr().err
