"""Peak memory per run: a suite worker runs many jobs, so each must report its own peak, not the
largest of every job the worker ran before it."""

from __future__ import annotations

import pytest
import torch

from sparseft.app.metrics import peak_rss_bytes, reset_peak_rss

MIB = 2**20


def _touch(mib: int) -> torch.Tensor:
    return torch.ones(mib * MIB // 4)  # (ones, not empty: the pages must be resident)


def test_the_reset_starts_a_new_window():
    if not reset_peak_rss():
        pytest.skip("this OS cannot reset the peak RSS")
    big = _touch(300)
    peak_with = peak_rss_bytes()
    del big
    assert reset_peak_rss()
    assert peak_rss_bytes() < peak_with - 200 * MIB, "the peak kept the earlier job's allocation"
    small = _touch(50)
    assert peak_rss_bytes() >= small.numel() * 4, "the new window misses what this job holds"


def test_the_peak_only_grows_within_a_window():
    if not reset_peak_rss():  # (without a reset the lifetime peak may already exceed what this test adds)
        pytest.skip("this OS cannot reset the peak RSS")
    before = peak_rss_bytes()
    block = _touch(100)
    after = peak_rss_bytes()
    del block
    assert after >= before + 90 * MIB
    assert peak_rss_bytes() >= after - 4 * MIB  # (freed memory stays in the peak; the kernel's counters lag by a few pages)


def test_an_earlier_job_kept_alive_only_by_a_cycle_is_not_in_the_next_window():
    if not reset_peak_rss():
        pytest.skip("this OS cannot reset the peak RSS")
    job = {"weights": _touch(300)}
    job["self"] = job  # (models often hold such cycles: hooks, closures; only the cycle collector frees them)
    peak_with = peak_rss_bytes()
    del job
    assert reset_peak_rss()
    assert peak_rss_bytes() < peak_with - 200 * MIB, "the window started with the earlier job still resident"
