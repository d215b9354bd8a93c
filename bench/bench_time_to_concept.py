"""Benchmark: CPU time to a usable concept, ours (with and without early stop) against diffusers' example recipe.

On an embedded toy-world model (``toyworld``: SD-1 layout; ``toyworld-xl``: SDXL layout): 5 pictures of a yellow
triangle on a brown background whose captions name nothing ("a shape"), the concept of
tests/training/test_training_learns.py. Both trainers start from the same initializer word ("triangle", the example
needs one token) and are snapshotted on the same schedule, in training pictures seen (20, 30, 40, 55, 80, 115, ...,
each about 1.41x the one before); each snapshot's embedding is scored through the toy world's probe: "a photo of a <word>" in 60
generations (DDIM 20 steps, CFG 5, seeds 1000-1059), the concept = shape, colour and background all right.

- ``example``: diffusers' ``textual_inversion.py`` / ``textual_inversion_sdxl.py`` per step (bench/ti_example.py)
  with its README's recipe, adapted only in resolution (32 px) and paths: lr 5e-4 x ``--scale_lr`` (= 2e-3),
  batch 1, gradient accumulation 4, constant schedule, AdamW weight decay 1e-2, 1 vector, 3000 steps (SDXL: 500).
- ``ours``: ``sdconcepts.training.train_embedding`` with the shipped defaults (``sdconcepts.training.presets``; the
  ``subject`` template, the counterpart of the example's object templates), its live vectors scored at each
  snapshot (no saves), the validation loss at its automatic interval; then the same run with ``--early-stop``
  (its denser automatic interval): where it stops, and the stopped vectors' score.

Reported: process CPU seconds (one thread; training only: model loading and scoring excluded) to the first snapshot
at >= the bar (80 %), for ours without early stop, ours with early stop (CPU to the stop), and the example. Goals
(issue 27): ours <= 0.2x the example's CPU time; the early stop within 1.5x of the earliest good snapshot, never
before it. Both runs of ours follow one trajectory (same file, seed and batches; the validation draws nothing from
training's randomness), so the early stop is judged against the snapshots of the run without it.

Usage: ``python bench/bench_time_to_concept.py [--models toyworld,toyworld-xl] [--quick] [--preset NAME]
[--learn-rate S --batch-size B --vectors N --init-text T] [--json out.json]``. ``--quick``: 30 generations per
snapshot and the example capped at a third of its README steps (a cap reached gives a lower bound for its time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ti_example import README_RECIPE, ExampleRun, scaled_rate  # noqa: E402

CONCEPT = {"shape": "triangle", "colour": "yellow", "background": "brown"}
SCHEDULE_RATIO = 2**0.5  # each snapshot point about 1.41x the one before
IMAGE_SIZE = 32


def snapshot_points(base: int, cap: int) -> list[int]:
    """The snapshot schedule in pictures seen: ``base`` x 1.41^k (multiples of 5 from 20 on), up to ``cap``."""
    points, k = {cap}, 0
    while (point := base * SCHEDULE_RATIO**k) < cap:
        points.add(max(1, round(point)) if point < 20 else 5 * round(point / 5))
        k += 1
    return sorted(p for p in points if p <= cap)


@dataclass
class Snapshot:
    images: int
    step: int
    cpu_s: float
    rate: float
    parts: dict[str, float] = field(default_factory=dict)


def first_good(snapshots: Sequence[Snapshot], bar: float) -> Snapshot | None:
    """The earliest snapshot whose concept rate reaches ``bar``."""
    return next((s for s in snapshots if s.rate >= bar), None)


def early_stop_verdict(stop_cpu: float | None, good_cpu: float | None, limit: float = 1.5) -> str:
    """Whether an early stop at ``stop_cpu`` lands within ``limit`` x of the earliest good snapshot and not before."""
    if stop_cpu is None:
        return "no stop by 10x the concept's pictures"
    if good_cpu is None:
        return "stopped, concept never reached"
    if stop_cpu < good_cpu:
        return f"too early ({stop_cpu / good_cpu:.2f}x)"
    ratio = stop_cpu / good_cpu
    return f"{'within' if ratio <= limit else 'beyond'} {limit:g}x ({ratio:.2f}x)"


# -- scoring ------------------------------------------------------------------------------------------------------


def score(model: Any, vectors: Any, samples: int, word: str = "toyconcept") -> tuple[float, dict[str, float]]:
    """The share of ``samples`` generations of "a photo of a <word>" that show the whole concept, and per part."""
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.toyworld.probe import classify

    batch = min(20, samples)
    params = GenerationParams(prompt=f"a photo of a {word}" if vectors is not None else
                              f"a photo of a {CONCEPT['colour']} {CONCEPT['shape']}", steps=20, sampler="DDIM",
                              cfg_scale=5.0, seed=1000, batch_size=batch, batch_count=math.ceil(samples / batch))
    images = txt2img(model, params, embeddings={word: vectors} if vectors is not None else None,
                     size_limits=False).images[:samples]
    found = classify(images)
    parts = {k: sum(f[k] == v for f in found) / len(found) for k, v in CONCEPT.items()}
    return sum(all(f[k] == v for k, v in CONCEPT.items()) for f in found) / len(found), parts


# -- the two trainers -------------------------------------------------------------------------------------------


@dataclass
class Settings:
    learn_rate: str
    batch_size: int
    vectors: int
    init_text: str


@dataclass
class Result:
    method: str
    snapshots: list[Snapshot] = field(default_factory=list)
    stop: Snapshot | None = None
    stop_message: str = ""
    capped: bool = False
    cpu_total_s: float = 0.0


def timed_events(events: Iterator[Any], clock: list[float]) -> Iterator[Any]:
    """``events`` with the process CPU time spent producing them added to ``clock[0]``."""
    while True:
        start = time.process_time()
        event = next(events, None)
        clock[0] += time.process_time() - start
        if event is None:
            return
        yield event


def watch_trainables() -> list[Any]:
    """The Trainables that ``train_embedding`` opens from now on, for reading the live vectors at any step without
    a save (a save's file writes and verifying forward pass would add to ours' time). Observes, changes nothing."""
    from sdconcepts.training import run as run_module

    opened: list[Any] = []
    original = run_module.open_embedding

    def opening(*args: Any, **kwargs: Any) -> Any:
        job = original(*args, **kwargs)
        opened.append(job)
        return job

    run_module.open_embedding = opening
    return opened


def run_ours(model: Any, work: Path, data: Path, settings: Settings, points: list[int], bar: float,
             samples: int, after_good: float = 10.0) -> Result:
    """Two runs from the same file and seed (one trajectory: validation draws nothing from training's randomness):
    without early stop, the live vectors scored at each snapshot point until the concept is reached; then with early
    stop (its denser automatic validation interval), unscored, until it stops (the stopped vectors scored) or
    ``after_good`` x the concept's pictures (or the last point)."""
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.training_model import TrainingModel

    batch = settings.batch_size
    rows = TrainingModel(model).token_rows(settings.init_text, settings.vectors)
    result, opened = Result("ours"), watch_trainables()
    for early_stop in (False, True):
        name = "ours-early-stop" if early_stop else "ours"
        create_embedding_file(work / "embeddings", name, rows, vectors=settings.vectors, overwrite=True)
        good = first_good(result.snapshots, bar)
        last = after_good * good.images if good is not None else points[-1]
        config = EmbeddingTrainingConfig(dataset=str(data), template="subject", width=IMAGE_SIZE, height=IMAGE_SIZE,
                                         batch_size=batch, max_steps=math.ceil(points[-1] / batch),
                                         learn_rate=settings.learn_rate, save_every=0, preview_every=0,
                                         log_directory=str(work / "log"), early_stop=early_stop)
        clock, pending, end = [0.0], list(points), None
        for event in timed_events(train_embedding(model, name, config, embeddings_dir=work / "embeddings"), clock):
            end = event
            images = event.step * batch
            if event.kind != "step" or (early_stop and images >= last):
                break
            if not early_stop and pending and images >= pending[0]:
                while pending and images >= pending[0]:
                    pending.pop(0)
                rate, parts = score(model, opened[-1].vectors.detach().clone(), samples)
                result.snapshots.append(Snapshot(images, event.step, clock[0], rate, parts))
                print(f"  ours    {images:6d} pictures, step {event.step:5d}, {clock[0]:8.1f} CPU s: "
                      f"concept {rate:.0%} {parts}", flush=True)
                if rate >= bar:
                    break
        if not early_stop:
            result.cpu_total_s = clock[0]
            result.capped = first_good(result.snapshots, bar) is None
        elif end is not None and end.kind == "early_stop":
            rate, parts = score(model, opened[-1].vectors.detach().clone(), samples)
            result.stop = Snapshot(end.step * batch, end.step, clock[0], rate, parts)
            result.stop_message = end.message
            print(f"  ours    early stop at step {end.step} ({clock[0]:.1f} CPU s), concept {rate:.0%}: "
                  f"{end.message.strip()}", flush=True)
    return result


def run_example(model: Any, data: Path, init: str, points: list[int], bar: float, samples: int,
                accumulation: int) -> Result:
    random.seed(0)
    import torch

    torch.manual_seed(0)
    batch = int(README_RECIPE["batch"])  # type: ignore[arg-type]
    run = ExampleRun(model, data, IMAGE_SIZE, batch, accumulation=accumulation, initializer=init, vectors=1,
                     learning_rate=scaled_rate(float(README_RECIPE["learning_rate"]), batch, accumulation),  # type: ignore[arg-type]
                     placeholder="<concept>")
    result, pending = Result("example"), list(points)
    while pending:
        start = time.process_time()
        run.step()
        result.cpu_total_s += time.process_time() - start
        if run.images_seen >= pending[0] and run.micro_steps % accumulation == 0:
            while pending and run.images_seen >= pending[0]:
                pending.pop(0)
            rate, parts = score(model, run.vectors(), samples)
            result.snapshots.append(Snapshot(run.images_seen, run.optimizer_steps, result.cpu_total_s, rate, parts))
            print(f"  example {run.images_seen:6d} pictures, step {run.optimizer_steps:5d}, "
                  f"{result.cpu_total_s:8.1f} CPU s: concept {rate:.0%} {parts}", flush=True)
            if rate >= bar:
                return result
    result.capped = True
    return result


# -- the report --------------------------------------------------------------------------------------------------


def report_lines(name: str, ours: Result, example: Result, bar: float) -> list[str]:
    good, ex_good = first_good(ours.snapshots, bar), first_good(example.snapshots, bar)
    ex_cpu = ex_good.cpu_s if ex_good else example.cpu_total_s
    ex_text = f"{ex_cpu:.1f}" if ex_good else f"> {ex_cpu:.1f} (not reached by {example.snapshots[-1].images} pictures)"

    def ratio(cpu: float | None) -> str:
        if cpu is None:
            return "-"
        return f"{cpu / ex_cpu:.3f}" if ex_good else f"< {cpu / ex_cpu:.3f}"

    stop = ours.stop
    rows = [
        f"{name}: concept bar {bar:.0%}",
        "| method | first snapshot >= bar (pictures, steps) | CPU s | x example |",
        "|---|---|---|---|",
        f"| ours, no early stop | {f'{good.images}, {good.step}' if good else 'not reached'} | "
        f"{f'{good.cpu_s:.1f}' if good else '-'} | {ratio(good.cpu_s if good else None)} |",
        f"| ours, early stop | {f'stop at {stop.images}, {stop.step} (concept {stop.rate:.0%})' if stop else 'no stop'}"
        f" | {f'{stop.cpu_s:.1f}' if stop else '-'} | {ratio(stop.cpu_s if stop else None)} |",
        f"| example (README recipe) | {f'{ex_good.images}, {ex_good.step}' if ex_good else 'not reached'} | {ex_text}"
        " | 1 |",
        f"early stop: {early_stop_verdict(stop.cpu_s if stop else None, good.cpu_s if good else None)}",
    ]
    return rows


def result_from(data: dict[str, Any]) -> Result:
    """A ``Result`` back from the bench's JSON."""
    snaps = [Snapshot(**snap) for snap in data["snapshots"]]
    stop = Snapshot(**data["stop"]) if data.get("stop") else None
    return Result(data["method"], snaps, stop, data.get("stop_message", ""), data.get("capped", False),
                  data.get("cpu_total_s", 0.0))


def bench_model(name: str, args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, XL_MODEL_DIR, load_model
    from sdconcepts.toyworld.concept import write_concept

    model = load_model(DEFAULT_MODEL_DIR if name == "toyworld" else XL_MODEL_DIR, device="cpu")
    family = "sdxl" if model.is_sdxl else "sd1"
    accumulation = int(README_RECIPE["accumulation"])  # type: ignore[arg-type]
    example_images = int(README_RECIPE["steps"][family]) * accumulation  # type: ignore[index]
    if args.quick:
        example_images //= 3
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_concept(work / "concept", count=5, seed=4242, **CONCEPT)
        plain, _ = score(model, None, args.samples)
        print(f"{name}: plain words ({CONCEPT['colour']} {CONCEPT['shape']}): concept {plain:.0%}", flush=True)
        results = {}
        for method in args.methods.split(","):
            if method == "ours":
                results[method] = run_ours(model, work / "ours", work / "concept", settings,
                                           snapshot_points(args.base, args.ours_cap or example_images), args.bar,
                                           args.samples)
            else:
                results[method] = run_example(model, work / "concept", settings.init_text.split()[0],
                                              snapshot_points(args.base, example_images), args.bar, args.samples,
                                              accumulation)
    out = {"model": name, "plain_words": plain, "settings": asdict(settings), "bar": args.bar,
           **{m: asdict(r) for m, r in results.items()}}
    if "ours" in results and "example" in results:
        out["table"] = report_lines(name, results["ours"], results["example"], args.bar)
        print("\n".join(out["table"]), flush=True)
    return out


def main(argv: Sequence[str] | None = None, *, announce: Callable[[str], None] = print) -> None:
    from sdconcepts.training.presets import PRESETS, preset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="toyworld,toyworld-xl")
    parser.add_argument("--methods", default="ours,example")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="ours' defaults (default: the shipped)")
    parser.add_argument("--learn-rate", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--vectors", type=int, default=None)
    parser.add_argument("--init-text", default="triangle", help="the initializer word of both (default: triangle)")
    parser.add_argument("--bar", type=float, default=0.8)
    parser.add_argument("--base", type=int, default=20, help="the first snapshot, in pictures (default: 20)")
    parser.add_argument("--samples", type=int, default=None, help="generations per snapshot (default: 60; quick 30)")
    parser.add_argument("--ours-cap", type=int, default=0, help="ours' last snapshot in pictures (default: the "
                        "example's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--report", type=Path, action="append", default=[],
                        help="print the tables of earlier --json files at --bar, without training; given again, a "
                        "later file's methods replace an earlier one's (ours from one run, the example from another)")
    args = parser.parse_args(argv)
    if args.report:
        merged: dict[str, dict[str, Any]] = {}
        for path in args.report:
            for out in json.loads(path.read_text()):
                merged.setdefault(out["model"], {}).update(out)
        for name, out in merged.items():
            if "ours" in out and "example" in out:
                announce("\n".join(report_lines(name, result_from(out["ours"]), result_from(out["example"]),
                                                 args.bar)))
        return
    args.samples = args.samples or (30 if args.quick else 60)
    import torch

    torch.set_num_threads(args.threads)
    chosen = preset(args.preset)
    settings = Settings(args.learn_rate or chosen.learn_rate, args.batch_size or chosen.batch_size,
                        args.vectors or chosen.vectors, args.init_text)
    announce(f"time to concept: {settings}, {args.samples} generations per snapshot, {args.threads} thread(s), "
             f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    outputs = [bench_model(name, args, settings) for name in args.models.split(",")]
    if args.json:
        args.json.write_text(json.dumps(outputs, indent=1) + "\n")
    announce(f"load at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
