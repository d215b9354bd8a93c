"""Interleaved timing shared by the benchmarks: each method is timed in turn, round after round, so that a slow patch
of a shared machine hits every method alike, and the medians are compared within one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved_medians(
    methods: Mapping[str, Callable[[], object]],
    rounds: int,
    *,
    per_round: int = 1,
    warmup: int = 2,
    sync: Callable[[], object] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds per call of each method: ``warmup`` untimed calls each, then ``rounds`` rounds in which every
    method runs ``per_round`` timed calls (``sync`` after each call, e.g. ``torch.cuda.synchronize``)."""
    for method in methods.values():
        for _ in range(warmup):
            method()
            sync()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            for _ in range(per_round):
                start = clock()
                method()
                sync()
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}
