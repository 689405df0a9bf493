"""`sparseft bench`: the sweep selects on validation only, the summary/table are right, and the
command runs end to end on a tiny model (one subprocess per method); `sparseft train` takes
every method."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from sparseft.app import bench
from sparseft.app.cli import main
from sparseft.methods import METHODS

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "actor", "scene", "the", "a", "was", "very"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT classifier checkpoint with its tokenizer, and a CSV of 160 labelled rows."""
    root = tmp_path_factory.mktemp("tiny")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model_dir = root / "model"
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(160):
        label = i % 2
        mood = rng.choice(WORDS[:3] if label else WORDS[3:6])
        lines.append(f"the {rng.choice(WORDS[6:10])} was very {mood} {i},{'pos' if label else 'neg'}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return str(model_dir), str(root / "data.csv")


def fake_task(spec):
    """Validation favours lr=2, test favours lr=3: selection must follow validation."""
    score = {"validation": {1.0: 0.5, 2.0: 0.9, 3.0: 0.7}, "test": {1.0: 0.6, 2.0: 0.7, 3.0: 0.99}}[spec["eval_split"]][spec["lr"]]
    return {"method": spec["method"], "seed": spec["seed"], "lr": spec["lr"], "accuracy": score + spec["seed"] / 100,
            "trainable_params": 10, "state_bytes": 80, "peak_rss_bytes": 1, "step_time_s": 0.1, "eval_split": spec["eval_split"]}


def test_sweep_selects_on_validation_never_test(capsys, monkeypatch):
    monkeypatch.setitem(bench.TASKS, "fake", bench.Task("accuracy", True, fake_task))
    bench.worker({"task": "fake", "base": {"method": "head"}, "rates": [1.0, 2.0, 3.0], "sweep_seed": 0, "sweep_rows": 64,
                  "seeds": [0, 1], "test_rows": None})
    records = [json.loads(line[len(bench.RECORD_PREFIX):]) for line in capsys.readouterr().out.splitlines()]
    sweep = [r for r in records if r["phase"] == "sweep"]
    final = [r for r in records if r["phase"] == "final"]
    assert [r["eval_split"] for r in sweep] == ["validation"] * 3 and [r["lr"] for r in sweep] == [1.0, 2.0, 3.0]
    assert [r["eval_split"] for r in final] == ["test", "test"] and {r["lr"] for r in final} == {2.0}
    assert [r["seed"] for r in final] == [0, 1]


def test_lower_is_better_task_and_diverged_rates(capsys, monkeypatch):
    def loss_task(spec):
        if spec["lr"] == 3.0:
            raise FloatingPointError("Training loss became nan")
        return {"method": spec["method"], "seed": spec["seed"], "lr": spec["lr"], "eval_loss": spec["lr"]}

    monkeypatch.setitem(bench.TASKS, "loss", bench.Task("eval_loss", False, loss_task))
    bench.worker({"task": "loss", "base": {"method": "full"}, "rates": [2.0, 1.0, 3.0], "sweep_seed": 0, "sweep_rows": None,
                  "seeds": [0], "test_rows": None})
    records = [json.loads(line[len(bench.RECORD_PREFIX):]) for line in capsys.readouterr().out.splitlines()]
    assert records[2]["error"] and records[-1]["phase"] == "final" and records[-1]["lr"] == 1.0


def _grow(capsys, monkeypatch, validation, max_extend):
    """The bench's sweep on a fake task scoring ``validation(lr)``, grid 1, 3, 9: (the sweep's
    rates in the order they ran, the final records)."""
    def task(spec):
        score = validation(spec["lr"]) if spec["eval_split"] == "validation" else 0.5
        return {"method": spec["method"], "seed": spec["seed"], "lr": spec["lr"], "accuracy": score}

    monkeypatch.setitem(bench.TASKS, "grow", bench.Task("accuracy", True, task))
    bench.worker({"task": "grow", "base": {"method": "full"}, "rates": [1.0, 3.0, 9.0], "sweep_seed": 0, "sweep_rows": None,
                  "seeds": [0, 1], "test_rows": None, "max_extend": max_extend})
    records = [json.loads(line[len(bench.RECORD_PREFIX):]) for line in capsys.readouterr().out.splitlines()]
    return [r["lr"] for r in records if r["phase"] == "sweep"], [r for r in records if r["phase"] == "final"]


@pytest.mark.parametrize("validation, max_extend, tried, chosen, edge", [
    (lambda lr: lr, 2, [1.0, 3.0, 9.0, 27.0, 81.0], 81.0, True),          # still rising after two steps: at the edge
    (lambda lr: -abs(lr - 27.0), 2, [1.0, 3.0, 9.0, 27.0, 81.0], 27.0, False),  # peak found past the first grid
    (lambda lr: -lr, 2, [1.0, 3.0, 9.0, 0.333, 0.111], 0.111, True),       # grows downwards, rates to 3 digits
    (lambda lr: -abs(lr - 3.0), 2, [1.0, 3.0, 9.0], 3.0, False),           # interior at once: nothing added
    (lambda lr: lr, 0, [1.0, 3.0, 9.0], 9.0, True),                        # --max-extend 0: the plain grid
])
def test_sweep_grows_past_an_edge(capsys, monkeypatch, validation, max_extend, tried, chosen, edge):
    """While the best validation rate is at an end of the grid the grid grows a ×3 step past it
    (up to max_extend times); the finals train the chosen rate and say whether it is still at an end."""
    swept, finals = _grow(capsys, monkeypatch, validation, max_extend)
    assert swept == tried
    assert [r["lr"] for r in finals] == [chosen, chosen] and all(r["lr_at_grid_edge"] is edge for r in finals)
    assert finals[0]["swept_rates"] == sorted(tried)


def test_the_table_marks_a_rate_at_the_edge():
    rec = {"method": "full", "seed": 0, "lr": 9e-3, "accuracy": 0.8, "trainable_params": 1, "state_bytes": 4, "peak_rss_bytes": 1,
           "step_time_s": 0.1, "calibration_s": 0.0}
    at_edge = bench.markdown_table(bench.summarize([rec | {"lr_at_grid_edge": True}], "classification"), "classification")
    inside = bench.markdown_table(bench.summarize([rec | {"lr_at_grid_edge": False}], "classification"), "classification")
    assert "(edge)" in at_edge and bench.EDGE_NOTE in at_edge
    assert "(edge)" not in inside and bench.EDGE_NOTE not in inside


def test_summary_mean_std_and_ratio_to_full():
    recs = []
    for method, accs, step in (("full", [0.8, 0.9], 1.0), ("s2ft", [0.7, 0.7], 0.25)):
        for seed, acc in enumerate(accs):
            recs.append({"method": method, "seed": seed, "lr": 1e-3, "accuracy": acc, "trainable_params": 100 if method == "full" else 7,
                         "state_bytes": 400, "peak_rss_bytes": 2**20 * (seed + 1), "step_time_s": step, "calibration_s": 0.0})
    rows = bench.summarize(recs, "classification")
    assert [r["method"] for r in rows] == ["full", "s2ft"]
    assert rows[0]["accuracy_mean"] == pytest.approx(0.85) and rows[0]["accuracy_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert rows[1]["step_time_vs_full"] == pytest.approx(0.25) and rows[1]["peak_rss_bytes"] == 2 * 2**20
    table = [line for line in bench.markdown_table(rows, "classification").splitlines() if line.startswith("|")]
    assert len(table) == 4 and "mean ± std (n=2)" in table[0] and "0.8500 ± 0.0707 |" in table[2] and "0.25×" in table[3]


@pytest.mark.slow
def test_bench_end_to_end(tiny, tmp_path, capsys):
    model_dir, data = tiny
    out = tmp_path / "bench"
    code = main(["bench", "--model", model_dir, "--data", data, "--methods", "head,s2ft", "--steps", "3", "--seeds", "2",
                 "--batch-size", "8", "--jobs", "2", "--max-extend", "1", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    sweep = json.loads((out / "sweep.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert {r["eval_split"] for r in sweep} == {"validation"} and {r["eval_split"] for r in results} == {"test"}
    assert len(results) == 4
    for method in ("head", "s2ft"):  # 3 rates, and one more where the best was at an end (--max-extend 1)
        rates = sorted(r["lr"] for r in sweep if r["method"] == method)
        final = next(r for r in results if r["method"] == method)
        assert final["swept_rates"] == rates and len(rates) in (3, 4) and final["lr"] in rates
        assert all(2.9 < b / a < 3.1 for a, b in zip(rates, rates[1:]))  # a grown grid keeps its ×3 spacing
        assert final["lr_at_grid_edge"] == (final["lr"] in (rates[0], rates[-1]))
    # two workers ran at once; the files list runs in method order whichever finished first
    assert [(r["method"], r["seed"]) for r in results] == [("head", 0), ("head", 1), ("s2ft", 0), ("s2ft", 1)]
    for r in results:
        for key in ("method", "seed", "lr", "accuracy", "trainable_params", "state_bytes", "peak_rss_bytes", "step_time_s"):
            assert key in r
        assert r["peak_rss_bytes"] > 0 and r["state_bytes"] > 0
    by_method = {r["method"]: r for r in results}
    assert by_method["s2ft"]["trainable_params"] > by_method["head"]["trainable_params"]
    assert (out / "accuracy_vs_params.png").stat().st_size > 0 and (out / "loss_curves.png").stat().st_size > 0
    assert sum(line.startswith("|") for line in (out / "benchmark.md").read_text().splitlines()) == 4
    assert "s2ft" in capsys.readouterr().out


@pytest.mark.parametrize("method", METHODS)
def test_train_accepts_every_method(tiny, tmp_path, method):
    model_dir, data = tiny
    out = tmp_path / method
    assert main(["train", "--model", model_dir, "--data", data, "--method", method, "--steps", "2", "--batch-size", "8",
                 "--calibration-steps", "2", "--rank", "2", "--no-progress", "--output-dir", str(out)]) == 0
    (record,) = json.loads((out / "results.json").read_text())
    assert record["method"] == method and 0.0 <= record["accuracy"] <= 1.0
    # what SparseGrad holds besides its trainable state is reported, not hidden
    detail = record["state_detail"]
    assert (detail["bases_bytes"] > 0) == method.startswith("sparsegrad")
    assert (detail["support_index_bytes"] > 0) == (method in ("sparsegrad-fixed", "sparsegrad-random", "sparsegrad-onesided", "sparse-random"))


def test_eval_subsets_are_a_fixed_random_sample():
    rows = bench.sample_rows(1000, 100)
    assert rows == bench.sample_rows(1000, 100) and rows == sorted(rows) and len(set(rows)) == 100
    assert rows != list(range(100)) and max(rows) > 500  # not the head of a (possibly label-sorted) file


def test_support_narrow_restricts_the_narrow_side_only(tiny, tmp_path):
    """`support_narrow=L` keeps each layer's support in the leading L directions of its narrow
    side (rows of a wide layer, columns of a tall one), the wide side free; `--support-narrow`
    reaches it from the command line."""
    from sparseft import SparseGradConfig
    from sparseft.errors import ConfigError
    from sparseft.methods import prepare

    config = SparseGradConfig(match_lora_rank=1, support_narrow=4)
    assert config.block(64, 32) == (64, 4) and config.block(32, 64) == (4, 64) and config.block(3, 64) == (3, 64)
    with pytest.raises(ConfigError, match="support_narrow"):
        SparseGradConfig(match_lora_rank=1, support_narrow=0)
    with pytest.raises(ConfigError, match="auto"):
        SparseGradConfig(match_lora_rank=1, support_narrow="fast")
    # "auto": the cost budget N·L·(m+n) ≤ 0.1·2Nmn, per layer shape
    auto = SparseGradConfig(match_lora_rank=1, support_narrow="auto")
    assert auto.block(3072, 768) == (3072, 122) and auto.block(768, 3072) == (122, 3072)
    assert auto.block(11008, 4096) == (11008, 597) and auto.block(1536, 384) == (1536, 61)
    model = BertForSequenceClassification.from_pretrained(tiny[0])
    prepared = prepare("sparsegrad-fixed", model, rank=1, support_narrow=4)
    ids = torch.randint(5, 19, (8, 12))
    prepared.sparse.calibrate([{"input_ids": ids, "labels": torch.randint(0, 2, (8,))}] * 2, steps=2, show_progress=False)
    for layer in prepared.sparse.sparse_layers().values():
        narrow, wide = (layer.rows, layer.cols) if layer.m <= layer.n else (layer.cols, layer.rows)
        assert int(narrow.max()) < 4 and int(wide.max()) >= 4
    out = tmp_path / "narrow"
    assert main(["train", "--model", tiny[0], "--data", tiny[1], "--method", "sparsegrad-fixed", "--support-narrow", "4", "--rank", "1",
                 "--steps", "2", "--batch-size", "8", "--calibration-steps", "2", "--no-progress", "--output-dir", str(out)]) == 0


@pytest.mark.slow
def test_quick_bench_says_smoke_run_at_80_columns(tiny, tmp_path, capsys, monkeypatch):
    """`sparseft bench --quick`: the table, benchmark.md and the plots' titles say it is a smoke
    run (no "± 0.0000 (n=1)" shown as a result); the table fits 80 columns with whole method names."""
    model_dir, data = tiny
    monkeypatch.setenv("COLUMNS", "80")
    out = tmp_path / "quick"
    assert main(["bench", "--quick", "--model", model_dir, "--data", data, "--methods", "sparsegrad-dynamic",
                 "--batch-size", "8", "--jobs", "1", "--threads", "1", "--no-progress", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    table = printed.split("results:")[0]
    assert "SMOKE RUN" in table and "±" not in table and "0.0000" not in table
    assert max(len(line) for line in table.splitlines()) <= 80 and "…" not in table
    assert any(line.startswith("sparsegrad-dynamic ") for line in table.splitlines())
    md = (out / "benchmark.md").read_text()
    assert "Smoke run" in md and "±" not in md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["smoke"] is True and summary["settings"]["threads"] == 1
    dynamic = next(r for r in summary["methods"] if r["method"] == "sparsegrad-dynamic")
    assert dynamic["state_with_bases_bytes"] > dynamic["state_bytes"]  # the bases are counted


def test_train_chooses_and_records_its_threads(tiny, tmp_path, capsys):
    model_dir, data = tiny
    before = torch.get_num_threads()
    try:
        assert main(["train", "--model", model_dir, "--data", data, "--method", "head", "--steps", "1", "--batch-size", "8",
                     "--no-save", "--no-progress", "--output-dir", str(tmp_path)]) == 0
        (record,) = json.loads((tmp_path / "results.json").read_text())
        chosen = record["run"]["settings"]["threads"]
        assert 1 <= chosen <= 4 and torch.get_num_threads() == chosen
        assert f"torch threads: {chosen} (" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_the_cli_offers_the_task_kinds_the_bench_runs():
    from sparseft.app.cli import TASK_KINDS

    assert set(TASK_KINDS) == set(bench.TASKS)


def test_workers_are_quiet_about_what_the_user_cannot_fix():
    """Every worker process (``init_worker``) drops peft's deprecated-name FutureWarning and the
    unchecked-sparse-tensor warning SHiRA triggers, which otherwise printed once per run of a
    bench; other warnings still show."""
    import warnings

    from sparseft.app.runner import quiet_dependencies

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependencies()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("Sparse invariant checks are implicitly disabled. Memory errors ...", UserWarning)
        warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else"]


def test_the_bench_sweeps_the_grid_it_is_given(tiny, monkeypatch, capsys):
    """--grid sets the plain bench's factors around each default rate, as it does the suite's."""
    from sparseft.app.cli import main

    class Ran(Exception):
        pass

    def run_bench(settings):
        raise Ran(settings.rates("full"), settings.rates("lora-mlp"))

    monkeypatch.setattr(bench, "run_bench", run_bench)
    model, data = tiny
    with pytest.raises(Ran) as ran:
        main(["bench", "--model", model, "--data", data, "--grid", "0.5,1,2", "--no-progress"])
    full, lora = bench.DEFAULT_LR["full"], bench.DEFAULT_LR["lora-mlp"]
    assert ran.value.args == ([full / 2, full, full * 2], [lora / 2, lora, lora * 2])
    assert "lr sweep ×0.5, 1, 2" in capsys.readouterr().err


def test_reuse_takes_finished_runs_and_trains_the_rest(tiny, tmp_path, capsys):
    """--reuse: a cut-off or finished bench's runs are taken as they are (same settings, same
    key), only what is missing trains; other settings are an error that names them."""
    model_dir, data = tiny
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["bench", "--model", model_dir, "--data", data, "--methods", "head", "--steps", "2", "--batch-size", "8",
              "--max-extend", "0", "--no-progress"]
    assert main([*common, "--seeds", "1", "--output-dir", str(first)]) == 0
    capsys.readouterr()
    assert main([*common, "--seeds", "2", "--reuse", str(first), "--output-dir", str(second)]) == 0
    err = capsys.readouterr().err
    assert "--reuse: 4 finished run(s) taken" in err
    trained = [line for line in err.splitlines() if line.startswith("[bench")]
    assert len(trained) == 1 and "final lr=" in trained[0] and "seed=1" in trained[0]  # only the new seed trained
    before = {(r["phase"], r["lr"], r["seed"]): r for r in json.loads((first / "sweep.json").read_text())
              + json.loads((first / "results.json").read_text())}
    after = json.loads((second / "sweep.json").read_text()) + json.loads((second / "results.json").read_text())
    assert len(after) == 5
    for r in after:
        if (r["phase"], r["lr"], r["seed"]) in before:
            assert r["accuracy"] == before[r["phase"], r["lr"], r["seed"]]["accuracy"]
            assert r["step_time_s"] == before[r["phase"], r["lr"], r["seed"]]["step_time_s"]  # taken, not trained again
    assert len((second / "records.jsonl").read_text().splitlines()) == 5
    assert main([*common, "--steps", "3", "--reuse", str(first), "--output-dir", str(tmp_path / "third")]) == 2
    assert "steps: 2 there, 3 here" in capsys.readouterr().err
