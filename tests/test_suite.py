"""The benchmark suite's protocol pieces: regimes, the sweep's edge rule, the summary contract."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_batch, tiny_bert
from sparseft.app.suite import REFERENCE, SuiteSettings, _choose, summarize
from sparseft.app.sweep import rate_at as _rate
from sparseft.errors import ConfigError
from sparseft.methods import prepare
from sparseft.targets import find_targets

MLP_METHODS = ["lora-mlp", "sparsegrad-fixed", "sparsegrad-dynamic", "meprop", "s2ft", "shira", "supertuning"]


def _split(model: torch.nn.Module):
    """Parameter ids of the MLP base weights, and of attention/embeddings/LayerNorms."""
    mlp = {id(p) for t in find_targets(model) for p in model.get_submodule(t.name).parameters()}
    rest = {id(p) for n, p in model.named_parameters() if id(p) not in mlp and "classifier" not in n}
    return mlp, rest


@pytest.mark.parametrize("method", MLP_METHODS)
def test_regimes_train_what_they_say(method: str) -> None:
    """peft: nothing of attention/embeddings/LayerNorms trains; paper: all of it does; the MLP
    base weights never do (only the method's own entries)."""
    counts = {}
    for regime in ("peft", "paper"):
        torch.manual_seed(0)
        model = tiny_bert()
        mlp, rest = _split(model)
        prepared = prepare(method, model, rank=2, regime=regime)
        trainable = {id(p) for p in prepared.model.parameters() if p.requires_grad}
        assert not trainable & mlp
        if regime == "peft":
            assert not trainable & rest
        else:
            assert rest <= trainable
        counts[regime] = prepared.trainable_params
    model = tiny_bert()
    mlp, rest = _split(model)
    rest_count = sum(p.numel() for p in model.parameters() if id(p) in rest)
    assert counts["paper"] - counts["peft"] == rest_count  # same MLP budget, plus the rest of the model


def test_paper_regime_updates_attention_and_mlp_entries() -> None:
    torch.manual_seed(0)
    model = tiny_bert()
    prepared = prepare("sparsegrad-fixed", model, rank=2, regime="paper")
    prepared.sparse.calibrate([make_batch("bert", i) for i in range(2)], steps=2, show_progress=False)
    query = prepared.model.base_model.bert.encoder.layer[0].attention.self.query.weight
    before = query.detach().clone()
    opt = prepared.make_optimizer(1e-2)
    prepared.model(**make_batch("bert", 5)).loss.backward()
    opt.step()
    assert not torch.equal(query, before)
    assert any(float(layer.values.abs().sum()) > 0 for layer in prepared.sparse.sparse_layers().values())


def test_unknown_regime_is_refused() -> None:
    with pytest.raises(ConfigError, match="regime"):
        prepare("lora-mlp", tiny_bert(), regime="glue")


def test_sweep_edge_rule() -> None:
    centre = 1e-3
    runs = {_rate(centre, f): {"val_accuracy": acc, "final_loss": 0.5} for f, acc in [(1 / 3, 0.70), (1, 0.75), (3, 0.72)]}
    assert _choose(runs, [1 / 3, 1, 3], centre) == (_rate(centre, 1), None)
    runs[_rate(centre, 3)]["val_accuracy"] = 0.80
    assert _choose(runs, [1 / 3, 1, 3], centre) == (_rate(centre, 3), "high")
    runs[_rate(centre, 1 / 3)]["val_accuracy"] = 0.90
    assert _choose(runs, [1 / 3, 1, 3], centre) == (_rate(centre, 1 / 3), "low")
    runs[_rate(centre, 1 / 3)]["final_loss"] = float("nan")  # a diverged run never wins
    assert _choose(runs, [1 / 3, 1, 3], centre) == (_rate(centre, 3), "high")


def _record(task, method, seed, correct, lr=1e-3):
    return {"task": task, "method": method, "lr": lr, "seed": seed, "val_accuracy": sum(correct) / len(correct),
            "test_correct": correct, "test_accuracy": sum(correct) / len(correct), "curve": [(5, 0.45), (10, sum(correct) / len(correct))],
            "trainable_params": 10, "step_time_s": 0.1, "calibration_s": 0.0, "final_loss": 0.3}


def test_summary_has_the_contract_and_the_paired_difference() -> None:
    settings = SuiteSettings(tasks=("a", "b"), methods=(REFERENCE, "sparsegrad-fixed", "full"), seeds=2)
    n = 400
    ref = [1] * (n // 2) + [0] * (n // 2)
    better = [1] * (n // 2 + 40) + [0] * (n // 2 - 40)  # +10 points
    records = []
    for task in ("a", "b"):
        for seed in (0, 1):
            records += [_record(task, REFERENCE, seed, ref), _record(task, "sparsegrad-fixed", seed, better if task == "a" else ref),
                        _record(task, "full", seed, better)]
    records.append(_record("a", "sparsegrad-fixed", 0, [0] * n, lr=3e-3))  # a swept rate that was not chosen
    chosen = {(t, m): (1e-3, m == "full") for t in ("a", "b") for m in settings.methods}
    doc = summarize(records, settings, chosen)
    rows = {(r["task"], r["method"]): r for r in doc["records"]}
    for r in doc["records"]:
        assert {"task", "regime", "method", "accuracy", "lr", "lr_at_grid_edge", "diff_vs_lora_mlp"} <= set(r)
        json.dumps(r)
    assert rows[("a", "sparsegrad-fixed")]["diff_vs_lora_mlp"]["mean"] == pytest.approx(0.10)
    assert rows[("b", "sparsegrad-fixed")]["diff_vs_lora_mlp"]["mean"] == pytest.approx(0.0)
    pooled = rows[("pooled", "sparsegrad-fixed")]
    assert pooled["diff_vs_lora_mlp"]["mean"] == pytest.approx(0.05)
    assert pooled["diff_vs_lora_mlp"]["ci_low"] < 0.05 < pooled["diff_vs_lora_mlp"]["ci_high"]
    assert rows[("pooled", "full")]["lr_at_grid_edge"] is True
    assert pooled["share_of_lora_to_full_gap"] == pytest.approx(0.5)  # closes all of a's gap, none of b's
    assert rows[("a", "sparsegrad-fixed")]["steps_to_lora_final"] == 10


def test_compare_to_adds_a_second_paired_difference() -> None:
    """--compare-to: each method's paired difference to a second reference (a variant against the
    default), per task and pooled, next to the one against LoRA-MLP; shown as a table column."""
    from sparseft.app.suite import table_rows

    settings = SuiteSettings(tasks=("a", "b"), methods=(REFERENCE, "sparsegrad-random", "shira"), seeds=2,
                             compare_to="sparsegrad-random")
    n = 400
    half = [1] * (n // 2) + [0] * (n // 2)
    plus = [1] * (n // 2 + 20) + [0] * (n // 2 - 20)  # +5 points
    records = []
    for task in ("a", "b"):
        for seed in (0, 1):
            records += [_record(task, REFERENCE, seed, half), _record(task, "sparsegrad-random", seed, plus),
                        _record(task, "shira", seed, half if task == "a" else plus)]
    chosen = {(t, m): (1e-3, False) for t in ("a", "b") for m in settings.methods}
    rows = {(r["task"], r["method"]): r for r in summarize(records, settings, chosen)["records"]}
    assert rows[("a", "shira")]["diff_vs_compare"]["mean"] == pytest.approx(-0.05)
    assert rows[("b", "shira")]["diff_vs_compare"]["mean"] == pytest.approx(0.0)
    assert rows[("pooled", "shira")]["diff_vs_compare"]["mean"] == pytest.approx(-0.025)
    assert rows[("pooled", "shira")]["diff_vs_lora_mlp"]["mean"] == pytest.approx(0.025)
    assert rows[("pooled", "sparsegrad-random")]["diff_vs_compare"]["mean"] == pytest.approx(0.0)
    assert rows[("a", "shira")]["compare_to"] == "sparsegrad-random"
    headers, table = table_rows(list(rows.values()))
    assert "Δ vs sparsegrad-random (95% CI)" in headers
    assert table[list(rows).index(("a", "shira"))][headers.index("Δ vs sparsegrad-random (95% CI)")].startswith("-5.00 [")


def test_method_variants_by_name() -> None:
    from sparseft.methods import DEFAULT_LR, canonical, split_methods

    assert split_methods("lora-mlp,sparsegrad[support_criterion=snr;support_narrow=8],meprop") == [
        "lora-mlp", "sparsegrad[support_criterion=snr;support_narrow=8]", "meprop"]
    name = canonical("sparsegrad[support_narrow=8;support_criterion=snr]")
    assert name == "sparsegrad-onesided[support_criterion=snr;support_narrow=8]"  # the default's variant
    assert DEFAULT_LR[name] == DEFAULT_LR["sparsegrad-onesided"]
    # the default is one-sided; among the two-sided names a gradient criterion is sparsegrad-fixed,
    # "random" sparsegrad-random
    assert canonical("sparsegrad") == "sparsegrad-onesided"
    assert canonical("sparsegrad-random[support_criterion=sum]") == "sparsegrad-fixed[support_criterion=sum]"
    assert canonical("sparsegrad-fixed[support_criterion=random]") == "sparsegrad-random[support_criterion=random]"
    prepared = prepare(name, tiny_bert(), rank=2)
    config = prepared.sparse.sparse_config
    assert (config.support_criterion, config.support_narrow, config.selection) == ("snr", 8, "fixed")
    meprop_fixed = prepare("meprop[selection=fixed;support_criterion=abs-sum]", tiny_bert(), rank=2)
    assert meprop_fixed.needs_calibration and meprop_fixed.sparse.sparse_config.identity_bases
    assert not prepare("meprop[selection=fixed]", tiny_bert(), rank=2).needs_calibration  # a random support: no pass
    for bad, why in [("lora-mlp[r=4]", "takes no"), ("sparsegrad[foo=1]", "foo"), ("sparsegrad[x]", "key=value"),
                     ("sparsegrad[x=1", r"name\[key=value")]:
        with pytest.raises(ConfigError, match=why):
            prepare(bad, tiny_bert())


class _InlineExecutor:
    """Runs each job at submit time, in this process (the suite's scheduling without workers)."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self) -> None:
        pass


def _fake_suite(monkeypatch) -> list[tuple]:
    """The suite with its runs faked in this process: the list the (task, method, lr, seed) of
    every trained run is appended to."""
    import sparseft.app.suite as S
    import sparseft.app.tasks as T

    trained: list[tuple] = []

    def fake_run_job(job):
        trained.append((job["task"], job["method"], job["lr"], job["seed"]))
        good = 0.8 if job["method"] != REFERENCE else 0.7
        correct = [1] * int(100 * good) + [0] * (100 - int(100 * good))
        return {"task": job["task"], "method": job["method"], "lr": job["lr"], "seed": job["seed"], "regime": job["settings"]["regime"],
                "val_accuracy": good - abs(job["lr"] - 1e-3), "curve": [[4, good]], "trainable_params": 10,
                "step_time_s": 0.1, "calibration_s": 0.0, "final_loss": 0.5, "test_correct": correct,
                "test_accuracy": good, "wall_s": 0.0}

    monkeypatch.setattr(S, "ProcessPoolExecutor", _InlineExecutor)
    monkeypatch.setattr(S, "run_job", fake_run_job)
    monkeypatch.setattr(S, "_model_dir", lambda *a: "model")
    monkeypatch.setattr(T, "load_task", lambda *a, **k: None)
    return trained


_COMMON = dict(tasks=("rotten_tomatoes",), seeds=2, grid=(1 / 3, 1.0, 3.0), max_extend=0, show_progress=False,
               lr_overrides={REFERENCE: 1e-3, "sparsegrad-fixed": 1e-3, "full": 1e-3})


def test_reuse_trains_only_the_missing_runs(tmp_path, monkeypatch, capsys) -> None:
    """--reuse: a second run with one more method trains only that method's runs, and the summary
    equals one made from scratch; a directory made with other run settings is refused by name."""
    import sparseft.app.suite as S

    trained = _fake_suite(monkeypatch)
    common = _COMMON
    first = S.run_suite(SuiteSettings(output_dir=str(tmp_path / "a"), methods=(REFERENCE, "sparsegrad-fixed"), **common))
    assert len(trained) == 2 * (3 + 1)
    trained.clear()
    second = S.run_suite(SuiteSettings(output_dir=str(tmp_path / "b"), methods=(REFERENCE, "sparsegrad-fixed", "full"),
                                       reuse=str(tmp_path / "a"), **common))
    assert {m for _, m, _, _ in trained} == {"full"} and len(trained) == 3 + 1
    rows = {(r["task"], r["method"]): r for r in second["records"]}
    assert rows[("rotten_tomatoes", "sparsegrad-fixed")] == next(
        r for r in first["records"] if (r["task"], r["method"]) == ("rotten_tomatoes", "sparsegrad-fixed"))
    assert len((tmp_path / "b" / "records.jsonl").read_text().splitlines()) == 12
    # resuming into its own directory after a crash cut the last line: nothing is trained again but that run
    log = tmp_path / "b" / "records.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    trained.clear()
    S.run_suite(SuiteSettings(output_dir=str(tmp_path / "b"), methods=(REFERENCE, "sparsegrad-fixed", "full"),
                              reuse=str(tmp_path / "b"), **common))
    assert len(trained) == 1
    # a record changed after its run fails its checksum: that run is trained again, not reused
    lines = log.read_text().splitlines()
    changed = json.loads(lines[0])
    changed["test_accuracy"] = 0.99
    log.write_text("\n".join([json.dumps(changed), *lines[1:]]) + "\n")
    trained.clear()
    S.run_suite(SuiteSettings(output_dir=str(tmp_path / "b"), methods=(REFERENCE, "sparsegrad-fixed", "full"),
                              reuse=str(tmp_path / "b"), **common))
    assert len(trained) == 1 and "fail their checksum" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="steps: 80 there, 40 here"):
        S.run_suite(SuiteSettings(output_dir=str(tmp_path / "c"), steps=40, reuse=str(tmp_path / "a"), **common))
    # a variant's lr option moves only its sweep's centre: the runs at rates already trained are reused, under its name
    trained.clear()
    third = S.run_suite(SuiteSettings(output_dir=str(tmp_path / "d"), methods=(REFERENCE, "sparsegrad-fixed[lr=0.003]"),
                                      reuse=str(tmp_path / "a"), **common))
    assert trained == [("rotten_tomatoes", "sparsegrad-fixed[lr=0.003]", 0.009, 0)]  # grid 1e-3, 3e-3, 9e-3; best 1e-3
    assert {r["method"] for r in third["records"]} == {REFERENCE, "sparsegrad-fixed[lr=0.003]"}


def test_reuse_takes_full_fine_tuning_across_regimes(tmp_path, monkeypatch, capsys) -> None:
    """A directory of the other regime gives only full fine-tuning's runs (every parameter trains
    in either regime); several directories combine; other settings are still refused."""
    import sparseft.app.suite as S

    trained = _fake_suite(monkeypatch)
    both = (REFERENCE, "full")
    S.run_suite(SuiteSettings(output_dir=str(tmp_path / "peft"), methods=both, **_COMMON))
    assert len(trained) == 2 * 4
    trained.clear()
    S.run_suite(SuiteSettings(output_dir=str(tmp_path / "paper"), regime="paper", methods=(REFERENCE,), **_COMMON))
    trained.clear()
    S.run_suite(SuiteSettings(output_dir=str(tmp_path / "paper-full"), regime="paper", methods=both,
                              reuse=(str(tmp_path / "paper"), str(tmp_path / "peft")), **_COMMON))
    assert trained == []  # the paper regime's reference from one directory, full fine-tuning from the other
    assert len((tmp_path / "paper-full" / "records.jsonl").read_text().splitlines()) == 8
    assert "made in the peft regime; 4 run(s) of full taken" in capsys.readouterr().err
    S.run_suite(SuiteSettings(output_dir=str(tmp_path / "paper-only"), regime="paper", methods=both,
                              reuse=str(tmp_path / "peft"), **_COMMON))
    assert {m for _, m, _, _ in trained} == {REFERENCE} and len(trained) == 4  # LoRA differs between regimes
    with pytest.raises(ConfigError, match="steps: 80 there, 40 here"):
        S.run_suite(SuiteSettings(output_dir=str(tmp_path / "x"), regime="paper", steps=40, methods=both,
                                  reuse=str(tmp_path / "peft"), **_COMMON))


def test_grid_option_parses_factors_and_refuses_bad_ones():
    from sparseft.app.cli import _grid

    assert _grid("3, 0.333,1") == (0.333, 1.0, 3.0) and _grid("1") == (1.0,)
    for bad in ("0,1", "a,1", ",", "-1"):
        with pytest.raises(ConfigError, match="--grid"):
            _grid(bad)
    # one rate is no sweep: the chosen rate is reported at the grid's edge
    assert _choose({1e-3: {"val_accuracy": 0.7, "final_loss": 0.5}}, [1.0], 1e-3) == (1e-3, "high")


def test_reuse_repeats_and_each_directory_is_checked(tmp_path):
    from sparseft.app.cli import _validate, build_parser

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "records.jsonl").write_text("")
    args = build_parser().parse_args(["bench", "--suite", "--reuse", str(tmp_path / "a"), "--reuse", str(tmp_path / "b")])
    assert args.reuse == [str(tmp_path / "a"), str(tmp_path / "b")]
    with pytest.raises(ConfigError, match=f"--reuse {tmp_path / 'b'}: no records.jsonl there"):
        _validate(args)


def test_compare_to_is_checked_before_anything_runs():
    from sparseft.app.cli import _validate, build_parser

    for argv, message in ((["bench", "--compare-to", "sparsegrad"], "--compare-to is a suite option: add --suite"),
                          (["bench", "--regime", "paper", "--tasks", "trec"], "--regime, --tasks are suite options"),
                          
                          (["bench", "--suite", "--compare-to", "nonsense"], "Unknown method")):
        with pytest.raises(ConfigError, match=message):
            _validate(build_parser().parse_args(argv))
    _validate(build_parser().parse_args(["bench", "--grid", "0.5,1,2"]))  # the plain bench sweeps a grid too
