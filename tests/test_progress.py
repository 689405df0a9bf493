"""Long loops are never silent: piped output gets plain progress lines."""

from __future__ import annotations

from sparseft.progress import progress


def test_piped_progress_prints_lines(monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPARSEFT_PROGRESS_SECONDS", "0")
    bar = progress(range(3), desc="train", total=3)
    assert list(bar) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("train: 1/3 (") and err[-1].startswith("train: 3/3 (")


def test_disabled_progress_is_the_items_themselves(capsys) -> None:
    items = [1, 2]
    assert progress(items, disable=True) is items
    assert capsys.readouterr().err == ""


def test_postfix_is_shown(monkeypatch, capsys) -> None:
    monkeypatch.setenv("SPARSEFT_PROGRESS_SECONDS", "1000")
    bar = progress(iter(range(2)), desc="fit")
    for _ in bar:
        bar.set_postfix(loss="0.5")
    assert capsys.readouterr().err.strip() == "fit: 2 (0 s, loss=0.5)"
