"""The default number of torch CPU threads: the idle physical cores, at most 4, at least 1.

torch starts with one thread per physical core. When another process is busy on those cores,
its OpenMP threads wait on each other and a run collapses: on the 2-core machine, with other jobs
beside it, a MiniLM training step took 1.8-5.6× longer on 2 threads than on 1, and a 1536×1536
float64 ``eigh`` 3-5× longer (``benchmarks/thread_defaults.py``; 28.2 s against 0.58 s in the
worst case seen). So the default counts only the cores nobody else is using:

    threads = clamp(round(physical cores − busy cores), 1, 4)

where busy cores is the 1-minute load average scaled to the CPUs this process may use. Four at
most: a small model's steps (MiniLM, batch 16 × 64 tokens) gain little beyond that and a larger
count only widens the exposure to a neighbour. ``--threads N`` or ``OMP_NUM_THREADS`` override it.
No torch here: ``sparseft --help`` and argument checks stay instant.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_DEFAULT_THREADS = 4
RULE = "the idle physical cores, at most 4, at least 1 (1 while other processes keep the cores busy)"


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None) -> int:
    """Distinct physical cores among ``cpus`` (SMT siblings count once); the CPU count where the
    topology is not readable."""
    cpus = usable_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "physical_package_id").read_text().strip() + ":" + (topology / "core_id").read_text().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def busy_cores(cpus: int | None = None) -> float:
    """How many of this process's CPUs other processes keep busy: the 1-minute load average, scaled
    from the machine's CPU count to the CPUs this process may use (a container pinned to 2 of 64
    CPUs sees the host's load). 0 where the load average is not available."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    usable = len(usable_cpus()) if cpus is None else cpus
    total = os.cpu_count() or usable
    return load * usable / max(total, usable)


def default_threads(cores: int | None = None, busy: float | None = None, env: dict[str, str] | None = None) -> int:
    """The thread count ``sparseft train`` uses when ``--threads`` is not given (see the module doc);
    ``OMP_NUM_THREADS``, when set to a positive number, wins."""
    return choose(None, cores, busy, env)[0]


def choose(explicit: int | None = None, cores: int | None = None, busy: float | None = None,
           env: dict[str, str] | None = None) -> tuple[int, str]:
    """(threads, why): ``explicit`` (``--threads``) if given, else ``OMP_NUM_THREADS`` if set, else
    the idle physical cores clamped to [1, 4]."""
    if explicit:
        return explicit, "--threads"
    env = os.environ if env is None else env
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given), "OMP_NUM_THREADS"
    cores = physical_cores() if cores is None else cores
    busy = busy_cores() if busy is None else busy
    threads = max(1, min(MAX_DEFAULT_THREADS, int(cores - busy + 0.5)))
    return threads, f"default: {cores} physical cores, {busy:.1f} busy by the 1-minute load average"
