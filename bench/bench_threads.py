"""Benchmark: torch's CPU thread count on an idle and on a busy machine (what ``sdconcepts.threads`` decides).

One txt2img on the embedded toy-world model (``--steps`` steps at ``--size`` px, Euler a) is timed with 1, 2, 4 ...
threads up to every usable core (torch's default) and with ``auto`` (the product's rule, its 0.1 s sample of the
machine included), interleaved round after round; first with the machine as it is ("idle"), then in the same run
with ``--burners`` processes each spinning on a core beside it ("busy"). Prints medians of wall time and the ratio
to torch's default count within each phase, and how far the pictures differ between counts.

Usage: ``PYTHONPATH=. python bench/bench_threads.py [--steps 20] [--size 32] [--rounds 5] [--burners N]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import interleaved_medians  # noqa: E402


def _burn(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def _phase(title: str, methods: dict[str, Callable[[], object]], rounds: int) -> None:
    from sdconcepts.threads import busy_cores, choose_threads, usable_cores

    busy = busy_cores(0.5)
    print(f"\n{title}: other work holds {busy:.1f} of {usable_cores()} cores; auto picks "
          f"{choose_threads(usable_cores(), busy)}")
    medians = interleaved_medians(methods, rounds, warmup=1)
    default = medians[f"{usable_cores()} threads (torch default)"]
    for name, seconds in medians.items():
        print(f"  {name:28s} {seconds:7.2f} s   {seconds / default:5.2f}x the default")


def main() -> None:
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.threads import apply_threads, usable_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--burners", type=int, default=usable_cores(), help="CPU-burning processes in the busy phase")
    args = parser.parse_args()

    model = load_model(None, device="cpu")
    params = GenerationParams(prompt="a red circle on a teal background", steps=args.steps, seed=1,
                              width=args.size, height=args.size).validated()
    cores = usable_cores()
    counts = sorted({1, *(2**k for k in range(1, cores.bit_length()) if 2**k < cores), cores})
    pictures: dict[int, np.ndarray] = {}

    def with_threads(count: int) -> Callable[[], object]:
        def run() -> object:
            torch.set_num_threads(count)
            image = txt2img(model, params).images[0]
            pictures[count] = np.asarray(image, dtype=np.int16)
            return image
        return run

    def auto() -> object:
        apply_threads("auto")
        return txt2img(model, params).images[0]

    methods: dict[str, Callable[[], object]] = {
        (f"{n} threads (torch default)" if n == cores else f"{n} thread" + ("s" if n > 1 else "")): with_threads(n)
        for n in counts
    }
    methods["auto"] = auto
    print(f"txt2img, toy-world model, {args.steps} steps at {args.size} px, {cores} usable cores, "
          f"load average now {os.getloadavg()[0]:.1f}")
    _phase("idle", methods, args.rounds)
    stop_at = time.time() + 3600
    burners = [multiprocessing.Process(target=_burn, args=(stop_at,), daemon=True) for _ in range(args.burners)]
    for process in burners:
        process.start()
    try:
        time.sleep(1.0)
        _phase(f"busy ({args.burners} CPU-burning processes beside it)", methods, args.rounds)
    finally:
        for process in burners:
            process.terminate()
            process.join()
    reference = pictures[1]
    worst = max(int(np.abs(picture - reference).max()) for picture in pictures.values())
    print(f"\npictures: largest difference between thread counts {worst} grey levels (0-255)")


if __name__ == "__main__":
    main()
