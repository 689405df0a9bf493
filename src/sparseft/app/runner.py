"""Runs training jobs in worker processes, for `sparseft bench` and the suite alike.

A job is a dict; ``fn(job)`` (a module-level function, so it pickles) returns its record. The
runner keeps ``jobs`` worker processes busy (``threads`` torch threads each), appends every
finished record to a JSONL log as it arrives (flushed, so a cut-off run loses only the runs in
flight), and reports it: a progress bar on a terminal, one line per run otherwise (CI, nohup,
tee). A job that raises becomes a record with ``error`` naming the exception: one broken run
never loses the others.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def quiet_dependencies() -> None:
    """Silence what the libraries print that the user can do nothing about, in every process:
    bitsandbytes (imported by peft when installed) looks for an optional CPU kernel on the hub at
    import and logs, offline, two warnings that concern nothing sparseft runs; peft's loader calls
    a transformers name deprecated in 5.x (a FutureWarning per model load); peft's SHiRA builds its
    sparse tensor without saying whether torch should check it (a UserWarning per run)."""
    import logging
    import warnings

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)


def init_worker(threads: int) -> None:
    """A worker process: its torch threads, offline hub, quiet transformers (the parent reports)."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    quiet_dependencies()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def guarded(fn: Callable[[Record], Record], job: Record) -> Record:
    """``fn(job)``, or the job's identity with ``error`` when it raises."""
    try:
        return fn(job)
    except Exception as exc:
        keep = ("task", "method", "lr", "seed", "phase", "eval_split")
        fields = {**job.get("spec", {}), **job}  # (a job may nest its run's settings under "spec")
        return {**{k: fields[k] for k in keep if k in fields}, "error": f"{type(exc).__name__}: {exc}"}


class Runner:
    """``run(fn, jobs)`` in ``jobs`` worker processes; ``describe(record)`` is its one-line report."""

    def __init__(self, *, jobs: int, threads: int, log: Path, describe: Callable[[Record], str], label: str = "runs",
                 total: int = 0, show_progress: bool = True, fresh_processes: bool = False,
                 executor: Callable[..., Any] = ProcessPoolExecutor) -> None:
        # fresh_processes: each job in a new process (its peak RSS its own), at the cost of a start
        # per job; otherwise workers live on and keep their caches (the suite's tokenized data)
        fresh = {"max_tasks_per_child": 1} if fresh_processes else {}
        self.pool = executor(max_workers=max(1, jobs), initializer=init_worker, initargs=(threads,), **fresh)
        self.log = open(log, "a", encoding="utf-8")  # noqa: SIM115  (closed by close())
        self.describe, self.label = describe, label
        self.records: list[Record] = []
        self.done, self.total = 0, total
        self.t0 = time.perf_counter()
        self.bar = None
        if show_progress and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="run")

    def run(self, fn: Callable[[Record], Record], jobs: list[Record]) -> list[Record]:
        """The records of ``jobs``, in the order they finished."""
        from .artifacts import sealed_record  # (torch: the command line imports this module before it needs it)

        pending = {self.pool.submit(guarded, fn, job) for job in jobs}
        results: list[Record] = []
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                record = future.result()
                results.append(record)
                self.records.append(record)
                self.log.write(json.dumps(sealed_record(record)) + "\n")  # (--reuse checks each line)
                self.log.flush()
                self.report(record)
        return results

    def report(self, record: Record) -> None:
        self.done += 1
        self.total = max(self.total, self.done)
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_postfix_str(self.describe(record))
            self.bar.update(1)
        else:
            minutes = (time.perf_counter() - self.t0) / 60
            print(f"[{self.label} {self.done}/{self.total} {minutes:.1f} min] {self.describe(record)}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.pool.shutdown()
        self.log.close()
        if self.bar is not None:
            self.bar.close()


__all__ = ["Runner", "guarded", "init_worker"]
