"""Benchmark: early-stop rules replayed on dense validation curves of one training trajectory per model.

One run of ours (the shipped preset, bench/bench_time_to_concept.py's concept and snapshot schedule) per embedded
model records, at every step, the validation loss of several ``ValidationSet`` variants (samples, the noise-level
share of the schedule) with the CPU time each check takes, the training's own CPU time, and the probe's concept
rate at the snapshot points. ``--simulate`` then replays stop rules (interval N steps x window K checks; the
plateau rule, DVAR's variance ratio, a relative-improvement threshold) on those curves, far cheaper than one bench
run per rule: a rule's stop CPU is the training's CPU to its stop step plus its checks' CPU, judged against the
first snapshot at the bar (with the automatic interval's checks of the run without early stop). A rule qualifies
on a model when it stops at or after that snapshot and within 1.5x its CPU time. Both runs of ours in the bench
follow one trajectory (the validation draws nothing from training's randomness), so the replay gives the stop
step of a real run exactly; the CPU is a model (steps and checks timed here), confirmed by the bench.

Usage: ``python bench/bench_early_stop_rules.py --model toyworld --steps 70 [--seed S --pictures-seed P]
--json rec.json`` (recording: about 3 CPU minutes for toyworld at 70 steps, 5 for toyworld-xl at 100), then
``python bench/bench_early_stop_rules.py --simulate rec.json [--simulate rec2.json ...]`` (seconds). The docs'
table (docs/training.md, "Early stop: the rules replayed") came from toyworld at 70 steps and toyworld-xl at 100,
each with seeds 0 (the bench's trajectory: pictures seed 4242), 1 (4243) and 2 (4244); the held-out ones ("Early
stop: held-out trajectories ...") from seeds 3 (4245) and 4 (4246), then 5 (4247) and 6 (4248).

A recording also keeps the trained vectors and AdamW's moments after every step; ``--simulate ... --signals``
reports where parameter signals (gradient coherence, Pflug's diagnostic, Adam's signal-to-noise, the drift ratio)
first say "stationary". ``--variants s8-high,s5-high`` records only those validation variants (cheaper);
``--snapshots-from earlier.json`` reuses an earlier recording's probe scores for the same model and seeds instead of
scoring again (one trajectory per seed: the curves come back bit-equal).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_time_to_concept import CONCEPT, IMAGE_SIZE, score, snapshot_points, watch_trainables  # noqa: E402

# (name, samples, noise-level share of the schedule)
VARIANTS: list[tuple[str, int, tuple[float, float]]] = [
    ("s8-all", 8, (0.0, 1.0)),
    ("s16-all", 16, (0.0, 1.0)),
    ("s4-high", 4, (0.5, 1.0)),
    ("s8-high", 8, (0.5, 1.0)),
    ("s16-high", 16, (0.5, 1.0)),
    ("s8-top", 8, (0.7, 1.0)),
    ("s8-mid", 8, (0.25, 0.75)),
    ("s5-high", 5, (0.5, 1.0)),
]


def record(name: str, steps: int, samples: int, seed_dir: Path, seed: int = 0, pictures_seed: int = 4242,
           variants: Sequence[str] | None = None, points: Sequence[int] | None = None) -> dict[str, Any]:
    """One trajectory: the validation curves of ``variants`` (default all), the training CPU and loss, the trained
    vectors and Adam's moments after every step (``state``: for parameter signals), the probe's rate at ``points``
    (default the bench's snapshot steps; none to reuse an earlier recording's: one trajectory per seed)."""
    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, XL_MODEL_DIR, load_model
    from sdconcepts.toyworld.concept import write_concept
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training import run as run_module
    from sdconcepts.training.presets import preset
    from sdconcepts.training.training_model import TrainingModel
    from sdconcepts.training.validation import ValidationSet

    model = load_model(DEFAULT_MODEL_DIR if name == "toyworld" else XL_MODEL_DIR, device="cpu")
    chosen = preset(None)
    batch = chosen.batch_size
    write_concept(seed_dir / "concept", count=5, seed=pictures_seed, **CONCEPT)
    rows = TrainingModel(model).token_rows("triangle", chosen.vectors)
    create_embedding_file(seed_dir / "embeddings", "rec", rows, vectors=chosen.vectors, overwrite=True)
    opened = watch_trainables()
    sets: dict[str, ValidationSet] = {}
    chosen_variants = [v for v in VARIANTS if variants is None or v[0] in variants]
    curves: dict[str, list[float]] = {v[0]: [] for v in chosen_variants}
    costs: dict[str, list[float]] = {v[0]: [] for v in chosen_variants}
    state: dict[str, list[list[float]]] = {"vectors": [], "exp_avg": [], "exp_avg_sq": []}

    def keep_state() -> None:
        job = opened[-1]
        moments = job.optimizer.state.get(job.vectors, {})
        for key in state:
            tensor = job.vectors if key == "vectors" else moments.get(key)
            state[key].append([] if tensor is None else [float(x) for x in tensor.detach().flatten()])
    original = run_module.validation_for_run

    def check_all() -> None:
        job = opened[-1]
        for variant in sets:
            start = time.process_time()
            with job.evaluating():
                value = sets[variant].loss(job.model)
            costs[variant].append(time.process_time() - start)
            curves[variant].append(value)

    def capturing(job: Any, config: Any, dataset: Any, held_out: Any, best_path: Path, main: bool) -> Any:
        length = int(job.model.alphas_cumprod.shape[0])
        for variant, count, levels in chosen_variants:
            sets[variant] = ValidationSet(dataset, length, seed=int(config.seed), chunk=dataset.batch_size,
                                          samples=count, noise_levels=levels)
        check_all()  # step 0
        keep_state()
        return original(job, config, dataset, held_out, best_path, main)

    run_module.validation_for_run = capturing
    config = EmbeddingTrainingConfig(dataset=str(seed_dir / "concept"), template="subject", width=IMAGE_SIZE,
                                     height=IMAGE_SIZE, batch_size=batch, max_steps=steps,
                                     learn_rate=chosen.learn_rate, seed=seed, save_every=0, preview_every=0,
                                     validate_every=0, log_directory=str(seed_dir / "log"))
    if points is None:
        points = [p // batch for p in snapshot_points(20, steps * batch)]
    clock, train_cpu, train_loss, snaps = 0.0, [0.0], [math.nan], []
    events = train_embedding(model, "rec", config, embeddings_dir=seed_dir / "embeddings")
    while True:
        start = time.process_time()
        event = next(events, None)
        clock += time.process_time() - start
        if event is None or event.kind != "step":
            if event is None or event.kind != "preparing":
                break
            continue
        train_cpu.append(clock)
        train_loss.append(event.loss)
        check_all()
        keep_state()
        if event.step in points:
            rate, parts = score(model, opened[-1].vectors.detach().clone(), samples)
            snaps.append({"step": event.step, "rate": rate, "parts": parts})
            print(f"  {name} step {event.step}: concept {rate:.0%} {parts}; "
                  + ", ".join(f"{v} {curves[v][-1]:.5f}" for v in curves), flush=True)
    return {"model": name, "batch": batch, "train_cpu": train_cpu, "train_loss": train_loss, "state": state,
            "curves": curves,
            "check_cpu": {v: statistics.median(c) for v, c in costs.items()}, "snapshots": snaps,
            "samples": samples, "seed": seed, "pictures_seed": pictures_seed}


# -- rules --------------------------------------------------------------------------------------------------------


def plateau(values: Sequence[float], window: int) -> bool:
    """The rule shipped before 2026-12-06 (kept here for the replays): with at least ``2 * window`` checks, the best of
    the last ``window`` improves on the best before them by no more than those checks' residual standard deviation
    around a straight line."""
    if window < 2 or len(values) < 2 * window:
        return False
    recent = [float(v) for v in values[-window:]]
    improvement = min(float(v) for v in values[:-window]) - min(recent)
    xs = range(window)
    mean_x, mean_y = (window - 1) / 2, sum(recent) / window
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, recent, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs)
    residuals = [y - (mean_y + slope * (x - mean_x)) for x, y in zip(xs, recent, strict=True)]
    return improvement <= math.sqrt(sum(r * r for r in residuals) / max(window - 2, 1))


def plateau_rule(window: int, least: int | None = None) -> Callable[[Sequence[float]], bool]:
    """The earlier rule (``plateau``), with at least ``least`` checks (default its own ``2 * window``)."""

    def rule(values: Sequence[float]) -> bool:
        if len(values) < (least or 2 * window) or len(values) <= window:
            return False
        # plateau() itself asks for 2 x window checks: give it a copy of the first check in front when fewer
        padded = [values[0]] * max(0, 2 * window - len(values)) + list(values)
        return plateau(padded, window)

    return rule


def shipped_rule(window: int) -> Callable[[Sequence[float]], bool]:
    """The product's rule: DVAR's variance ratio at its shipped ratio (``EARLY_STOP_RATIO``)."""
    from sdconcepts.training.validation import EARLY_STOP_RATIO

    return dvar_rule(window, EARLY_STOP_RATIO)


def fallen_rule(window: int, threshold: float, fall: float, slow: int = 5) -> Callable[[Sequence[float]], bool]:
    """DVAR's rule over ``window`` checks at ``threshold`` once the loss has fallen by ``fall`` x its first check's
    value, or DVAR's rule over ``slow`` checks at the shipped 2 % (the candidate of 2026-12-06, branch es2-fallen:
    ``window`` 3, threshold 0.05, fall 0.3 on the s5-high variant every 6 steps)."""
    fast, late = dvar_rule(window, threshold), shipped_rule(slow)

    def rule(values: Sequence[float]) -> bool:
        fallen = values[0] > 0 and (values[0] - min(values)) >= fall * values[0]
        return (fallen and fast(values)) or late(values)

    return rule


def dvar_rule(window: int, threshold: float) -> Callable[[Sequence[float]], bool]:
    """DVAR's variance ratio (Voronov et al. 2023) as the product computes it
    (``sdconcepts.training.validation.settled``): with at least ``2 * window`` checks, the variance of the last
    ``window`` checks at most ``threshold`` x the variance of all of them."""
    from sdconcepts.training.validation import settled

    return lambda values: settled(values, window, threshold) is not None


def relative_rule(window: int, threshold: float) -> Callable[[Sequence[float]], bool]:
    def rule(values: Sequence[float]) -> bool:
        if len(values) < 2 * window:
            return False
        before = min(values[:-window])
        return (before - min(values[-window:])) <= threshold * before

    return rule


def rules() -> dict[str, Callable[[Sequence[float]], bool]]:
    found: dict[str, Callable[[Sequence[float]], bool]] = {}
    for window in range(2, 7):
        found[f"plateau K={window}"] = plateau_rule(window)
        for least in (window + 1, window + 2, 3 * window):
            if least != 2 * window:
                found[f"plateau K={window} min={least}"] = plateau_rule(window, least)
        for threshold in (0.02, 0.05, 0.1, 0.15, 0.25):
            found[f"dvar K={window} a={threshold}"] = dvar_rule(window, threshold)
        for threshold in (0.001, 0.002, 0.005, 0.01):
            found[f"rel K={window} r={threshold}"] = relative_rule(window, threshold)
        for threshold in (0.02, 0.05, 0.1):
            for fall in (0.2, 0.25, 0.3, 0.35):
                found[f"fallen K={window} a={threshold} f={fall}"] = fallen_rule(window, threshold, fall)
    found["shipped K=5"] = shipped_rule(5)
    return found


def stop_step(curve: Sequence[float], every: int, rule: Callable[[Sequence[float]], bool]) -> int | None:
    values: list[float] = []
    for step in range(0, len(curve), every):
        values.append(curve[step])
        if step and rule(values):
            return step
    return None


def judge(rec: dict[str, Any], variant: str, every: int, rule: Callable[[Sequence[float]], bool], bar: float,
          auto_every: int = 13) -> tuple[float | None, int | None, int]:
    """(stop CPU / first good CPU, stop step, first good step); ratio None when there is no stop."""
    good = next(s["step"] for s in rec["snapshots"] if s["rate"] >= bar)
    cost = rec["check_cpu"][variant]
    good_cpu = rec["train_cpu"][good] + (1 + good // auto_every) * cost
    step = stop_step(rec["curves"][variant], every, rule)
    if step is None:
        return None, None, good
    return (rec["train_cpu"][step] + (1 + step // every) * cost) / good_cpu, step, good


# The rules the docs' table shows, each for the intervals 3-8: (variant, rule name in ``rules()``)
NAMED = [("s8-all", "plateau K=3"), ("s8-high", "shipped K=5"), ("s5-high", "dvar K=5 a=0.02"),
         ("s5-high", "fallen K=3 a=0.02 f=0.25"), ("s5-high", "fallen K=3 a=0.05 f=0.3"),
         ("s5-high", "fallen K=3 a=0.05 f=0.35"), ("s8-top", "fallen K=2 a=0.1 f=0.2")]


def simulate(recs: list[dict[str, Any]], bars: dict[str, float], limit: float = 1.5) -> None:
    for rec in recs:
        bar = bars[rec["model"]]
        good = next(s for s in rec["snapshots"] if s["rate"] >= bar)
        print(f"{rec['model']} (seed {rec.get('seed', 0)}, pictures {rec.get('pictures_seed', 4242)}): first good "
              f"step {good['step']} ({good['rate']:.0%}), train CPU {rec['train_cpu'][good['step']]:.2f} s, steps "
              f"recorded {len(rec['train_cpu']) - 1}; check CPU "
              + ", ".join(f"{v} {c * 1000:.0f} ms" for v, c in rec["check_cpu"].items()))
        print("  snapshots: " + ", ".join(f"{s['step']}: {s['rate']:.0%}" for s in rec["snapshots"]))
    table = rules()
    print("stop step (stop CPU / first good CPU; ! = before the first good snapshot, - = no stop) per recording:")
    for variant, name in [(v, n) for v, n in NAMED if all(v in rec["curves"] for rec in recs)]:
        for every in range(3, 9):
            cells = []
            for rec in recs:
                ratio, step, good = judge(rec, variant, every, table[name], bars[rec["model"]])
                cells.append("-" if step is None else f"{step}{'!' if step < good else ''} ({ratio:.2f}x)")
            print(f"  {variant:8s} {name:16s} N={every}: " + " | ".join(cells))
    never_early = []
    for variant in [v for v in recs[0]["curves"] if all(v in rec["curves"] for rec in recs)]:
        for name, rule in table.items():
            for every in range(1, 9):
                results = [judge(rec, variant, every, rule, bars[rec["model"]]) for rec in recs]
                if all(r is not None and s is not None and s >= g for r, s, g in results):
                    worst = max(r for r, _, _ in results if r is not None)
                    never_early.append((worst, variant, name, every, results))
    never_early.sort(key=lambda p: p[0])
    passing = [p for p in never_early if p[0] <= limit]
    print(f"{len(passing)} (variant, rule, interval) stop within {limit:g}x and never early on every recording; "
          f"{len(never_early)} never early and stop on every one; the best of those:")
    for worst, variant, name, every, results in never_early[:20]:
        print(f"  worst {worst:.2f}x  {variant:9s} {name:22s} N={every}: "
              + "; ".join(f"stop {s} ({r:.2f}x, good {g})" for r, s, g in results))


# -- parameter signals (no extra forward passes) ------------------------------------------------------------------

ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, as EmbeddingTrainable builds it


def parameter_signals(rec: dict[str, Any]) -> dict[str, list[float]]:
    """Per step t >= 1 of a recording's ``state`` (the trained vectors and AdamW's moments after each step), the
    statistics that are said to tell learning from wandering, each near 1 (or positive) while the vectors move one
    way and small (or negative) in a random walk:

    - ``coherence``: |mean of the last 8 gradients| / their root mean square (1 for equal gradients, about
      1/sqrt(8) = 0.35 for independent ones); the gradients come back from Adam's first moment,
      g_t = (m_t - b1 m_{t-1}) / (1 - b1);
    - ``pflug``: the sum of the last 10 inner products of successive gradients (Pflug 1990; Chee and Toulis 2018):
      positive while transient, negative once the iterates bounce around a minimum;
    - ``snr``: Adam's bias-corrected |m| / sqrt(v), averaged over the coordinates;
    - ``drift``: the vectors' displacement over the last 8 steps over the length of their path (1 on a straight
      line, about 1/sqrt(8) in a random walk)."""
    import numpy as np

    b1, b2 = ADAM_BETAS
    state = rec["state"]
    theta = np.array(state["vectors"])
    zero = [0.0] * theta.shape[1]
    m = np.array([row or zero for row in state["exp_avg"]])
    v = np.array([row or zero for row in state["exp_avg_sq"]])
    g = np.zeros_like(m)
    g[1:] = (m[1:] - b1 * m[:-1]) / (1 - b1)
    steps = np.linalg.norm(np.diff(theta, axis=0), axis=1)
    inner = [0.0, 0.0] + [float(g[t] @ g[t - 1]) for t in range(2, len(g))]
    out: dict[str, list[float]] = {"coherence": [], "pflug": [], "snr": [], "drift": []}
    for t in range(1, len(theta)):
        last = g[max(1, t - 7):t + 1]
        out["coherence"].append(float(np.linalg.norm(last.mean(0)) / np.sqrt(np.mean(np.sum(last**2, 1)))))
        out["pflug"].append(sum(inner[max(2, t - 9):t + 1]) if t >= 11 else math.nan)
        out["snr"].append(float(np.mean(np.abs(m[t] / (1 - b1**t)) / np.sqrt(v[t] / (1 - b2**t) + 1e-16))))
        path = float(steps[t - 8:t].sum()) if t >= 8 else 0.0
        out["drift"].append(float(np.linalg.norm(theta[t] - theta[t - 8])) / path if path > 0 else math.nan)
    return out


SIGNAL_RULES: dict[str, Callable[[float], bool]] = {
    "coherence <= 0.4": lambda x: x <= 0.4, "pflug < 0": lambda x: x < 0, "snr <= 0.2": lambda x: x <= 0.2,
    "drift <= 0.5": lambda x: x <= 0.5,
}


def signals_report(recs: list[dict[str, Any]], bars: dict[str, float]) -> None:
    """The first step at which each parameter signal says "stationary", against the first good snapshot."""
    for rec in recs:
        if not rec.get("state", {}).get("vectors"):
            continue
        good = next((s["step"] for s in rec["snapshots"] if s["rate"] >= bars[rec["model"]]), None)
        signals = parameter_signals(rec)
        cells = []
        for name, test in SIGNAL_RULES.items():
            series = signals[name.split()[0]]
            step = next((t + 1 for t, x in enumerate(series) if math.isfinite(x) and test(x)), None)
            early = "!" if step is not None and good is not None and step < good else ""
            cells.append(f"{name}: {step if step is not None else '-'}{early}")
        print(f"{rec['model']} seed {rec.get('seed', 0)}: first good step {good}; " + ", ".join(cells))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toyworld")
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--samples", type=int, default=30, help="generations per snapshot (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="the training (and validation) seed")
    parser.add_argument("--pictures-seed", type=int, default=4242, help="the concept pictures' seed")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--signals", action="store_true",
                        help="with --simulate: the parameter signals' first stationary step instead of the rules")
    parser.add_argument("--variants", default=None, help="comma-separated validation variants to record (default all)")
    parser.add_argument("--snapshots-from", type=Path, default=None,
                        help="an earlier recording of the same model and seeds: its snapshots are reused, none scored")
    parser.add_argument("--simulate", type=Path, action="append", default=[])
    args = parser.parse_args(argv)
    if args.simulate:
        recs = [json.loads(p.read_text()) for p in args.simulate]
        bars = {"toyworld": 0.8, "toyworld-xl": 0.6}
        if args.signals:
            signals_report(recs, bars)
        else:
            simulate(recs, bars)
        return
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        earlier = json.loads(args.snapshots_from.read_text()) if args.snapshots_from else None
        variants = args.variants.split(",") if args.variants else None
        out = record(args.model, args.steps, args.samples, Path(tmp), args.seed, args.pictures_seed, variants,
                     [] if earlier else None)
    if earlier:
        out["snapshots"] = earlier["snapshots"]
        out["earlier_curves"] = {v: earlier["curves"][v] for v in out["curves"] if v in earlier["curves"]}
    if args.json:
        args.json.write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
