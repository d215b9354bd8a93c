"""How many CPU threads torch computes with: chosen on purpose from the cores that are free, or set by the user.

torch starts with one thread per core. On a machine where other work holds some of those cores, its threads wait for
each other at every operation: a 20-step generation on the embedded model took 2-10x longer with 2 threads than
with 1 on a busy 2-core machine, for the same picture (``bench/bench_threads.py`` measures it). So the standalone
app and the CLI take the cores this process may run on (affinity and a cgroup CPU quota) less the cores other
processes keep busy right now, at least 1. ``--threads N`` or ``SDCONCEPTS_THREADS=N`` fixes the count instead
(``auto``: the rule above). A sample taken just before a job can catch the machine in a lull, and other work
starts and stops during a long one: while ``auto`` is in force, a training run re-decides the count every
``RECHECK_S`` seconds from the CPU use over that whole interval (``recheck_threads``). Inside a web UI host nothing
here runs: the host's choice stands.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

__all__ = ["AUTO", "RECHECK_S", "THREADS_ENV", "AutoThreads", "apply_threads", "busy_cores", "choose_threads",
           "parse_threads", "recheck_threads", "usable_cores"]

log = logging.getLogger("sdconcepts")

THREADS_ENV = "SDCONCEPTS_THREADS"
AUTO = "auto"
SAMPLE_S = 0.1  # how long the other processes' CPU use is sampled before a job
RECHECK_S = 20.0  # during a long job under ``auto``: the window over which the count is decided again


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
    start = _Mark.now()
    if start.machine is None:
        try:
            return max(0.0, os.getloadavg()[0])
        except OSError:
            return 0.0
    time.sleep(sample_s)
    return _Mark.now().busy_since(start)


class _Mark:
    """The machine's cumulative CPU ticks, this process's CPU seconds and the clock at one moment."""

    def __init__(self, machine: tuple[int, int] | None, own_s: float, clock: float) -> None:
        self.machine, self.own_s, self.clock = machine, own_s, clock

    @classmethod
    def now(cls) -> _Mark:
        return cls(_cpu_jiffies(), _own_cpu_s(), time.monotonic())

    def busy_since(self, start: _Mark) -> float:
        """Cores other processes kept busy, on average, between ``start`` and this mark (0 when unknown)."""
        if self.machine is None or start.machine is None or self.clock <= start.clock:
            return 0.0
        ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        busy_s = (self.machine[0] - start.machine[0]) / ticks - (self.own_s - start.own_s)
        return max(0.0, busy_s / (self.clock - start.clock))


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def choose_threads(cores: int, busy: float) -> int:
    """The rule: the free cores (``cores`` less ``busy``, rounded to the nearest), at least 1 and at most ``cores``."""
    return max(1, min(cores, math.floor(cores - busy + 0.5)))


def apply_threads(setting: str | None = None) -> int:
    """Set torch's thread count from ``setting`` (``auto`` or N; None: ``$SDCONCEPTS_THREADS``, else ``auto``).

    Returns the count set. Called by the CLI before a command and by the standalone web UI before each job. Under
    ``auto`` the count is then kept up to date by ``recheck_threads``; a set count stops that.
    """
    global _auto
    if setting is None:
        setting = parse_threads(os.environ.get(THREADS_ENV, AUTO) or AUTO)
    if setting == AUTO:
        cores, busy = usable_cores(), busy_cores()
        count = choose_threads(cores, busy)
        log.info("CPU threads: %d (%d usable cores, %.1f busy with other work)", count, cores, busy)
        _auto = AutoThreads(cores)
    else:
        count = int(setting)
        log.info("CPU threads: %d (set)", count)
        _auto = None
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


class AutoThreads:
    """The ``auto`` rule kept in force during a job: decided again from the other processes' CPU use over the last
    ``every_s`` seconds (a window of seconds, where the decision before a job has a tenth of one)."""

    def __init__(self, cores: int, every_s: float = RECHECK_S) -> None:
        self.cores, self.every_s = cores, every_s
        self.mark = _Mark.now()
        self.last_busy: float | None = None  # the latest window's measurement

    def recheck(self, *, force: bool = False) -> int | None:
        """When the window has passed (or ``force``): set torch's count by the rule; the new count, None when the
        window has not passed or the count stays."""
        mark = _Mark.now()
        if mark.machine is None or (not force and mark.clock - self.mark.clock < self.every_s):
            return None  # nothing to measure other work by (no /proc/stat), or the window has not passed
        busy, window, self.mark = mark.busy_since(self.mark), mark.clock - self.mark.clock, mark
        self.last_busy = busy
        count = choose_threads(self.cores, busy)
        before = torch.get_num_threads()
        if count == before:
            return None
        torch.set_num_threads(count)
        log.info("CPU threads: %d -> %d (%.1f of %d cores busy with other work over the last %.0f s)",
                 before, count, busy, self.cores, window)
        return count


_auto: AutoThreads | None = None  # set by apply_threads under ``auto``: torch's thread count is process-wide too


def recheck_threads(*, force: bool = False) -> int | None:
    """Called by a long job between its steps (a training run): under ``auto``, the count decided again once per
    ``RECHECK_S`` seconds (``AutoThreads.recheck``); a no-op when the count was set or nothing here chose it (a
    host). The new count, or None."""
    return _auto.recheck(force=force) if _auto is not None else None
