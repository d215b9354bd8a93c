"""How many CPU threads torch computes with: chosen on purpose from the cores that are free, or set by the user.

torch starts with one thread per core. On a machine where other work holds some of those cores, its threads wait for
each other at every operation: a 20-step generation on the embedded model took 2-10x longer with 2 threads than
with 1 on a busy 2-core machine, for the same picture (``bench/bench_threads.py`` measures it). So the standalone
app and the CLI take the cores this process may run on (affinity and a cgroup CPU quota) less the cores other
processes keep busy right now, at least 1. ``--threads N`` or ``SDCONCEPTS_THREADS=N`` fixes the count instead
(``auto``: the rule above). Inside a web UI host nothing here runs: the host's choice stands.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

__all__ = ["AUTO", "THREADS_ENV", "apply_threads", "busy_cores", "choose_threads", "parse_threads", "usable_cores"]

log = logging.getLogger("sdconcepts")

THREADS_ENV = "SDCONCEPTS_THREADS"
AUTO = "auto"
SAMPLE_S = 0.1  # how long the other processes' CPU use is sampled before a job


def parse_threads(value: str) -> str:
    """``auto`` or a whole number of threads of at least 1, as given; ValueError (one sentence) otherwise."""
    text = value.strip().lower()
    if text == AUTO:
        return AUTO
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"threads must be 'auto' or a whole number, not {value!r}") from None
    if number < 1:
        raise ValueError(f"threads must be at least 1, not {number}")
    return str(number)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, lowered by a cgroup v2 CPU quota when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cpu_jiffies() -> tuple[int, int] | None:
    # /proc/stat's first line: cumulative CPU time of the whole machine; (busy, total) in clock ticks.
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def busy_cores(sample_s: float = SAMPLE_S) -> float:
    """How many cores other processes keep busy now: the machine's CPU use over ``sample_s`` less this process's.

    Where ``/proc/stat`` is missing, the 1-minute load average (which counts this process too) stands in.
    """
    start, own_start, clock_start = _cpu_jiffies(), _own_cpu_s(), time.monotonic()
    if start is None:
        try:
            return max(0.0, os.getloadavg()[0])
        except OSError:
            return 0.0
    time.sleep(sample_s)
    end, own_end, clock_end = _cpu_jiffies(), _own_cpu_s(), time.monotonic()
    if end is None or clock_end <= clock_start:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy_s = (end[0] - start[0]) / ticks - (own_end - own_start)
    return max(0.0, busy_s / (clock_end - clock_start))


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def choose_threads(cores: int, busy: float) -> int:
    """The rule: the free cores (``cores`` less ``busy``, rounded to the nearest), at least 1 and at most ``cores``."""
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def apply_threads(setting: str | None = None) -> int:
    """Set torch's thread count from ``setting`` (``auto`` or N; None: ``$SDCONCEPTS_THREADS``, else ``auto``).

    Returns the count set. Called by the CLI before a command and by the standalone web UI before each job.
    """
    if setting is None:
        setting = parse_threads(os.environ.get(THREADS_ENV, AUTO) or AUTO)
    if setting == AUTO:
        cores, busy = usable_cores(), busy_cores()
        count = choose_threads(cores, busy)
        log.info("CPU threads: %d (%d usable cores, %.1f busy with other work)", count, cores, busy)
    else:
        count = int(setting)
        log.info("CPU threads: %d (set)", count)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
