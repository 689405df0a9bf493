"""`sparseft train` saves what it trained; `sparseft predict` loads it back to the same accuracy."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSequenceClassification

from sparseft.app.cli import main
from test_bench import tiny  # noqa: F401  (the tiny checkpoint + CSV fixture)


@pytest.mark.parametrize("method", ["sparsegrad-fixed", "sparsegrad-dynamic", "lora-mlp", "s2ft", "head"])
def test_saved_run_reloads_to_the_same_accuracy(tiny, tmp_path, capsys, method):  # noqa: F811
    model_dir, data = tiny
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", data, "--method", method, "--steps", "6", "--batch-size", "8",
                 "--calibration-steps", "2", "--rank", "2", "--lr", "0.01", "--no-progress", "--save-merged",
                 "--output-dir", str(out)]) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert "sparseft predict" in capsys.readouterr().out
    for folder in (out / "adapters" / "seed-0", out / "merged" / "seed-0"):
        capsys.readouterr()
        assert main(["predict", "--adapter", str(folder), "--data", data]) == 0
        scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert scored["accuracy"] == pytest.approx(record["accuracy"], abs=1e-9), folder
    # the merged folder is a plain transformers model
    assert AutoModelForSequenceClassification.from_pretrained(out / "merged" / "seed-0") is not None
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--text", "the food was very good",
                 "--text", "bad"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(line["label"] in ("neg", "pos") for line in lines)


def test_predict_names_the_fix_for_a_wrong_folder(tmp_path, capsys):
    assert main(["predict", "--adapter", str(tmp_path)]) == 2
    assert "sparseft train" in capsys.readouterr().err
