"""Benchmark: a textual inversion step at batch 4, ours against diffusers' examples, on a quiet machine and beside a
CPU-burning job that this bench starts on the same cores (issue 27 item 6: ours >= 1.2x the example in both).

Models: the two embedded ones, the SD-1 toy-world model and toyworld-xl, at their 32 px (``--cases``; ``tiny64``
adds the tiny SD-1.x test model at 64 px, bench_training.py's case). The steps are bench_training.py's and
bench_training_sdxl.py's: ``example`` the per-step work of diffusers' ``textual_inversion.py`` /
``textual_inversion_sdxl.py`` reimplemented step for step, ``ours`` ``sdconcepts.training.train_embedding`` as the
CLI runs it (defaults: loss CSV every step, the validation loss at its default interval; no saves or previews).

Each case runs twice in one process: ``quiet`` (nothing of the bench's own beside it), then ``busy`` with
``--burners`` processes (default: one per usable core) each doing float32 matrix products with one torch thread, as
another training job would. Steps are interleaved (``bench/timing.py``) and timed in CPU time of this process (torch
with one thread computes on the calling thread, so other jobs' turns on the core do not count) and in wall time. The
machine's load average is printed with each figure: on a shared machine the "quiet" figure is only as quiet as that.

Usage: ``python bench/bench_training_load.py [--cases toyworld,toyworld-xl] [--rounds 12] [--burners N]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_training  # noqa: E402
import bench_training_sdxl  # noqa: E402

BATCH = 4
BURN = (
    "import torch; torch.set_num_threads(1); a = torch.randn(512, 512); b = torch.randn(512, 512)\n"
    "while True: a = (a @ b).tanh_()"
)


@contextmanager
def burners(count: int) -> Iterator[None]:
    """``count`` CPU-burning processes (matrix products, one thread each) for the duration of the block."""
    procs = [subprocess.Popen([sys.executable, "-c", BURN]) for _ in range(count)]
    try:
        time.sleep(2.0)  # let them start and take their cores
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def _load(case: str) -> tuple[Any, int]:
    import torch

    from sdconcepts.backends.model_loading import XL_MODEL_DIR, load_model, model_from_components
    from sdconcepts.backends.tiny import build_tiny_sd1

    if case == "tiny64":
        model = model_from_components(build_tiny_sd1(0), name="tiny-sd1")
        size = 64
    else:
        model = load_model(XL_MODEL_DIR if case == "toyworld-xl" else None, device=torch.device("cpu"))
        size = int(model.default_size)
    for module in (model.unet, model.vae, *model.text_encoders):
        module.requires_grad_(False)
    return model, size


def steppers(case: str, work: Path) -> tuple[dict[str, Callable[[], None]], int]:
    """The example's step and ours for ``case``, each on its own copy of the model (the example grows its table)."""
    example_model, size = _load(case)
    ours_model, _ = _load(case)
    data = bench_training.make_images(work / "data", size)
    if example_model.is_sdxl:
        example = bench_training_sdxl.example_stepper(example_model, data, size, BATCH)
        ours = bench_training_sdxl.ours_stepper(ours_model, data, size, BATCH, work / "ours")
    else:
        example = bench_training.example_stepper(example_model, data, size, BATCH)
        ours = bench_training.ours_stepper(ours_model, data, size, BATCH, work / "ours")
    return {"example": example, "ours": ours}, size


def measure(methods: dict[str, Callable[[], None]], rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """Interleaved medians of each method's CPU time and wall time per step (after 3 untimed steps each)."""
    import statistics

    for method in methods.values():
        for _ in range(3):
            method()
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    wall: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, method in methods.items():
            for _ in range(per_round):
                c0, w0 = time.process_time(), time.perf_counter()
                method()
                cpu[name].append(time.process_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    return {name: {"cpu_s": statistics.median(cpu[name]), "wall_s": statistics.median(wall[name])} for name in methods}


def main() -> int:
    import torch

    from sdconcepts.threads import usable_cores

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="toyworld,toyworld-xl", help="toyworld, toyworld-xl, tiny64")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=2)
    parser.add_argument("--burners", type=int, default=None, help="CPU-burning processes (default: usable cores)")
    parser.add_argument("--phases", default="quiet,busy")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for both (default 1; more makes CPU time count waiting)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    count = args.burners if args.burners is not None else usable_cores()
    rows = []
    print(
        f"batch {BATCH}, torch {torch.__version__}, {args.threads} thread(s), {args.rounds}x{args.per_round} interleaved steps each; "
        f"busy = {count} burner process(es)",
        flush=True,
    )
    print(
        f"{'case':12s} {'phase':6s} {'load':>5s} {'example ms':>11s} {'ours ms':>8s} {'CPU ratio':>9s} "
        f"{'wall ratio':>10s}  (ratio: example time / ours; goal >= 1.2)",
        flush=True,
    )
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            methods, size = steppers(case, Path(tmp))
            for phase in args.phases.split(","):
                with burners(count if phase == "busy" else 0):
                    result = measure(methods, args.rounds, args.per_round)
                    load = os.getloadavg()[0]
                ex, ours = result["example"], result["ours"]
                row = {
                    "case": case,
                    "size": size,
                    "phase": phase,
                    "load1": load,
                    "example_cpu_ms": ex["cpu_s"] * 1e3,
                    "ours_cpu_ms": ours["cpu_s"] * 1e3,
                    "example_wall_ms": ex["wall_s"] * 1e3,
                    "ours_wall_ms": ours["wall_s"] * 1e3,
                    "cpu_ratio": ex["cpu_s"] / ours["cpu_s"],
                    "wall_ratio": ex["wall_s"] / ours["wall_s"],
                }
                rows.append(row)
                print(
                    f"{case:12s} {phase:6s} {load:5.1f} {row['example_cpu_ms']:11.1f} {row['ours_cpu_ms']:8.1f} "
                    f"{row['cpu_ratio']:9.2f} {row['wall_ratio']:10.2f}",
                    flush=True,
                )
    print(json.dumps({"torch": torch.__version__, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
