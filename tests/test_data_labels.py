"""Data files as users write them: a byte-order mark, empty cells spelt NaN/None, numeric labels
spelt two ways, fractional labels, a misspelt group column. Each is read right or refused with
the fix, and skipped rows are counted aloud."""

from __future__ import annotations

import json

import pytest
from test_bench import tiny  # noqa: F401  (the tiny BERT checkpoint and CSV fixture)

from sparseft import DataError
from sparseft.app.data import load_table


def _csv(tmp_path, lines, name="d.csv", bom=False):
    path = tmp_path / name
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    ds = load_table(_csv(tmp_path, ["text,label", "good,1", "bad,0"], bom=True))
    assert ds.texts == ["good", "bad"] and ds.label_names == ["0", "1"]


def test_missing_labels_are_skipped_and_counted(tmp_path, capsys):
    lines = ["text,label", "a,pos", "b,neg", "c,NaN", "d,nan", "e,None", "f,", ",pos"]
    ds = load_table(_csv(tmp_path, lines))
    assert ds.label_names == ["neg", "pos"] and ds.texts == ["a", "b"]
    assert "skipped 4 with no label (blank, NaN, None) and 1 with no text" in capsys.readouterr().err


def test_numeric_labels_are_one_class_per_value_and_fractions_are_refused(tmp_path):
    ds = load_table(_csv(tmp_path, ["text,label", "a,0", "b,0.0", "c,1", "d,1.0"]))
    assert ds.label_names == ["0", "1"] and ds.labels == [0, 0, 1, 1]
    with pytest.raises(DataError, match="not whole numbers"):
        load_table(_csv(tmp_path, ["text,label"] + [f"t{i},{0.5 * i}" for i in range(8)], name="f.csv"))


def test_a_misspelt_group_column_names_the_columns(tmp_path):
    with pytest.raises(DataError, match="no column 'movie'.*--group-column"):
        load_table(_csv(tmp_path, ["text,label,film", "a,1,x", "b,0,y"]), group_column="movie")


def test_divergence_on_the_last_step_is_an_error_not_a_score(tiny, tmp_path, capsys):  # noqa: F811
    """`--steps 2 --lr 1e30` used to save the adapter and print an accuracy; the last update is
    checked now, the run exits 1 naming the fix, and nothing is saved."""
    from sparseft.app.cli import main

    model_dir, data = tiny
    out = tmp_path / "run"
    code = main(["train", "--model", model_dir, "--data", data, "--steps", "2", "--lr", "1e30", "--batch-size", "8",
                 "--calibration-steps", "2", "--rank", "2", "--no-progress", "--output-dir", str(out)])
    assert code == 1 and "lower --lr" in capsys.readouterr().err
    assert not (out / "adapters").exists()


def test_a_task_name_is_a_data_source_on_the_command_line():
    from sparseft.app.cli import _validate, build_parser

    _validate(build_parser().parse_args(["train", "--data", "trec"]))  # a task by name: accepted
    with pytest.raises(DataError, match="nor a task by name"):
        _validate(build_parser().parse_args(["train", "--data", "no-such-file.csv"]))


def test_predict_splits_the_training_file_as_training_did(tiny, tmp_path, capsys):  # noqa: F811
    """`train --group-column` then `predict --data` on the same file: the run file records the
    column, predict scores the same test split, and another group column is refused."""
    from sparseft.app.cli import main

    model_dir, _ = tiny
    lines = ["text,label,movie"] + [f"the film {i % 7} was {'good' if i % 2 else 'bad'} {i},{i % 2},m{i % 40}" for i in range(160)]
    data = tmp_path / "grouped.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", model_dir, "--data", str(data), "--group-column", "movie", "--steps", "2", "--batch-size", "8",
                 "--calibration-steps", "2", "--rank", "2", "--no-progress", "--output-dir", str(out)]) == 0
    (record,) = json.loads((out / "results.json").read_text())
    run = json.loads((out / "adapters" / "seed-0" / "sparseft_run.json").read_text())
    assert run["data"]["group_column"] == "movie"
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", str(data)]) == 0
    scored = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert scored["accuracy"] == pytest.approx(record["accuracy"])  # the very test split training scored
    assert main(["predict", "--adapter", str(out / "adapters" / "seed-0"), "--data", str(data), "--group-column", "text"]) == 2
    assert "--group-column movie" in capsys.readouterr().err
