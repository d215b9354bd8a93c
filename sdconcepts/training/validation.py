"""The deterministic validation loss, the best step and the early stop (docs/training.md, "Validation loss").

One step's training loss is a random draw (a picture, a timestep, noise): its curve is mostly noise and says little
about when the concept is learnt. The validation loss is the same objective on fixed pictures, prompts, noise and
timesteps (DVAR, Voronov et al. 2023), so its curve moves only when the weights do. ``Validation`` consumes the
run's steps: every ``validate_every`` steps it evaluates that loss, saves the best step's weights as
``<name>-best`` beside the numbered copies, and (opt-in) ends the run once that loss has settled: the variance of
its last checks a small share of the whole run's (DVAR's rule). Its state travels in the trained file's optimizer
sidecar, so a resumed run goes on with the same history, best and stop rule.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdconcepts.training.dataset import ImageRecord, TrainingBatch, TrainingDataset
from sdconcepts.training.objective import DiffusionModel, denoising_error

__all__ = [
    "VALIDATION_SAMPLES",
    "Validation",
    "ValidationSet",
    "ValidationState",
    "automatic_interval",
    "settled",
    "split_held_out",
]

log = logging.getLogger(__name__)

VALIDATION_SAMPLES = 8  # fixed (picture, timestep, noise) samples per check
# The automatic interval: a check is VALIDATION_SAMPLES forward passes without gradients, a training step
# batch x accumulation forward and backward passes (about 2 forward passes each on the toy model: at a factor of 6
# bench/bench_validation.py measured checks at 7.9 % of a run); every INTERVAL_FACTOR x samples /
# (batch x accumulation) steps keeps them near 6 %.
INTERVAL_FACTOR = 8
MIN_INTERVAL, MAX_INTERVAL = 10, 250
# With early stop on (docs/training.md, "Early stop: the rules replayed"): checks every EARLY_STOP_FACTOR x samples /
# (batch x accumulation) steps (at least 2; 6 at batch 5), on timesteps from the noisier half of the schedule
# (EARLY_STOP_NOISE_LEVELS: where the layout, colours and background are decided; the nearly clean end's larger error
# hid toyworld-xl's background being learnt), and the run stops once the variance of the last ``window`` checks
# (``early_stop_window``, default ``training.config.EARLY_STOP_WINDOW``) is at most EARLY_STOP_RATIO of the whole
# run's (DVAR, Voronov et al. 2023).
# Replayed with ~3,000 rules on three trajectories of each embedded model (bench/bench_early_stop_rules.py), none stopped
# within 1.5x of the concept's first good snapshot and never before it on all six; this is the safest tried: never
# before the concept on the six (1.47-2.17x), nor on eight held-out trajectories recorded after it was chosen
# (1.38-4.51x over all fourteen; docs/training.md, "Early stop: held-out trajectories"), where the earlier rule (whole
# schedule, plateau, window 3, every 5 steps) stopped toyworld-xl's seed-2 trajectory with the concept at 43 %. A stop
# before the concept leaves an unusable file; one after it only costs time.
EARLY_STOP_FACTOR = 3.75
EARLY_STOP_NOISE_LEVELS = (0.5, 1.0)
EARLY_STOP_RATIO = 0.02
EARLY_STOP_MIN_INTERVAL = 2
VALIDATION_STEP = -1  # the "step" whose prompt and latent sample validation uses: never a training step


def _seeded(*parts: object) -> int:
    return random.Random(repr(parts)).getrandbits(63)


def split_held_out(records: Sequence[ImageRecord], share: float, seed: int
                   ) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training pictures, held-out pictures): ``share`` of them (at least one) held out, chosen by ``seed``;
    with share 0 nothing is held out. Raises ValueError when nothing would be left to train on."""
    if share <= 0:
        return list(records), []
    count = max(1, round(share * len(records)))
    if count >= len(records):
        raise ValueError(f"a validation share of {share:g} of {len(records)} pictures leaves none to train on")
    held = set(random.Random(_seeded(seed, "held out")).sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


def automatic_interval(batch_size: int, accumulation: int, samples: int = VALIDATION_SAMPLES, *,
                       early_stop: bool = False) -> int:
    """The default steps between checks for a run's batch size and gradient accumulation (denser with early stop)."""
    factor, least = (EARLY_STOP_FACTOR, EARLY_STOP_MIN_INTERVAL) if early_stop else (INTERVAL_FACTOR, MIN_INTERVAL)
    every = math.ceil(factor * samples / max(1, batch_size * accumulation))
    return min(MAX_INTERVAL, max(least, every))


def settled(values: Sequence[float], window: int, ratio: float = EARLY_STOP_RATIO) -> tuple[float, float] | None:
    """(share, ratio) when the checks ``values`` have settled, else None: with at least ``2 * window`` checks, the
    variance of the last ``window`` is at most ``ratio`` x the variance of all of them (DVAR's rule; ``share`` is that
    variance over the whole run's, 0 for a loss that never moved)."""
    if window < 2 or len(values) < 2 * window:
        return None
    recent, whole = statistics.pvariance(values[-window:]), statistics.pvariance(values)
    if not recent <= ratio * whole:  # also False for a non-finite check
        return None
    return (recent / whole if whole > 0 else 0.0), ratio


@dataclass(frozen=True)
class _Chunk:
    batch: TrainingBatch
    timesteps: Tensor
    noise: Tensor


class ValidationSet:
    """Fixed samples of a dataset: pictures spread over it, each with its prompt and latent of a step no training
    step uses, timesteps stratified over the ``noise_levels`` share of the schedule and seeded noise, in chunks of
    ``chunk`` samples."""

    def __init__(self, dataset: TrainingDataset, schedule_length: int, *, seed: int, chunk: int,
                 samples: int = VALIDATION_SAMPLES, noise_levels: tuple[float, float] = (0.0, 1.0)) -> None:
        n = len(dataset)
        pictures = [k % n for k in range(samples)] if n <= samples else [k * n // samples for k in range(samples)]
        # Stratified timesteps over the ``noise_levels`` share of the schedule (the whole of it by default),
        # shuffled by seed so that no picture always gets the noisy end of it.
        low, high = noise_levels
        span = (high - low) * schedule_length
        timesteps = [min(schedule_length - 1, int(low * schedule_length + (k + 0.5) * span / samples))
                     for k in range(samples)]
        random.Random(_seeded(seed, "validation timesteps")).shuffle(timesteps)
        generator = torch.Generator().manual_seed(_seeded(seed, "validation noise"))
        latents = [dataset.latent_for(i, VALIDATION_STEP) for i in pictures]
        noise = [torch.randn(latent.shape, generator=generator, dtype=torch.float32) for latent in latents]
        texts = [dataset.text_for(i, VALIDATION_STEP) for i in pictures]
        weights = dataset.weights
        self.chunks: list[_Chunk] = []
        for start in range(0, samples, max(1, chunk)):
            part = range(start, min(samples, start + max(1, chunk)))
            batch = TrainingBatch(
                torch.stack([latents[k] for k in part]),
                tuple(texts[k] for k in part),
                torch.stack([weights[pictures[k]] for k in part]) if weights is not None else None,
            )
            self.chunks.append(_Chunk(batch, torch.tensor([timesteps[k] for k in part], dtype=torch.long),
                                      torch.stack([noise[k] for k in part])))
        self.samples = samples
        described = [(dataset.records[i].path.name, t, texts[k]) for k, (i, t) in enumerate(zip(pictures, timesteps,
                                                                                                 strict=True))]
        self.key = hashlib.sha256(repr((described, seed, [tuple(c.batch.latents.shape) for c in self.chunks]))
                                  .encode()).hexdigest()[:16]

    def loss(self, model: DiffusionModel) -> float:
        """The mean denoising error over the fixed samples, without gradients."""
        total = 0.0
        with torch.no_grad():
            for chunk in self.chunks:
                error = denoising_error(model, chunk.batch, chunk.timesteps, chunk.noise)
                total += float(error) * len(chunk.timesteps)
        return total / self.samples


@dataclass
class ValidationState:
    """What a resumed run needs: the checks so far ``(step, loss)``, the best one and its file, and the key of the
    samples they were computed on (a changed dataset or seed starts the history again)."""

    key: str
    checks: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    best_loss: float = math.inf
    best_file: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "checks": [[s, v] for s, v in self.checks], "best_step": self.best_step,
                "best_loss": self.best_loss, "best_file": self.best_file}

    @classmethod
    def restored(cls, data: Any, key: str, step: int) -> ValidationState:
        """The state saved with the file at ``step`` when it belongs to these samples, else a fresh one."""
        if not isinstance(data, dict):
            return cls(key)
        if data.get("key") != key:
            log.warning("the validation samples changed since the last run (dataset, size or seed): "
                        "the validation history starts again")
            return cls(key)
        try:
            checks = [(int(s), float(v)) for s, v in data.get("checks", []) if int(s) <= step]
            best_step = data.get("best_step")
            state = cls(key, checks, int(best_step) if best_step is not None else None,
                        float(data.get("best_loss", math.inf)), data.get("best_file"))
        except (TypeError, ValueError):
            log.warning("ignored a damaged validation state; the validation history starts again")
            return cls(key)
        if state.best_step is not None and state.best_step > step:
            state.best_step, state.best_loss, state.best_file = None, math.inf, None
        return state


class Validation:
    """The run's validation: checks every ``every`` steps (and at the start of a run without history), the best
    step saved to ``best_path`` (main rank), the early stop's decision in ``stop_reason``.

    ``job`` is the Trainable (``model``, ``save``, ``evaluating``, ``validation_state``), duck-typed to keep this
    module below ``trainables``.
    """

    def __init__(self, job: Any, validation_set: ValidationSet, *, every: int, early_stop: bool, window: int,
                 best_path: Path, main: bool) -> None:
        self.job = job
        self.set = validation_set
        self.every = every
        self.early_stop = early_stop
        self.window = window
        self.best_path = best_path
        self.main = main
        self.state = ValidationState.restored(getattr(job, "validation_state", None), validation_set.key, job.step)
        job.validation_state = self.state.as_dict()
        self.stop_reason: str | None = None
        self.start: tuple[float, str | None] | None = None
        if not self.state.checks:
            self.start = self._check(job.step)

    def _check(self, step: int) -> tuple[float, str | None]:
        job = self.job
        with job.evaluating():
            value = self.set.loss(job.model)
        state = self.state
        state.checks.append((step, value))
        saved = None
        if math.isfinite(value) and value < state.best_loss:
            state.best_step, state.best_loss = step, value
            if self.main:
                saved = str(job.save(self.best_path, file_name=self.best_path.stem, optimizer=False))
                state.best_file = saved
        if self.early_stop and self.stop_reason is None:
            found = settled([v for _, v in state.checks], self.window)
            if found is not None:
                share, ratio = found
                self.stop_reason = (
                    f"the validation loss has settled: over the last {self.window} checks ({self.window * self.every} "
                    f"steps) it varied by {share:.1%} of its variance over the run, at most {ratio:.0%}")
        job.validation_state = state.as_dict()
        return value, saved

    def on_step(self, step: int) -> tuple[float | None, str | None]:
        """(validation loss, best file saved) at this step; (None, None) when it is not a check step."""
        if not self.every or step % self.every:
            return None, None
        return self._check(step)

    def summary(self) -> str:
        """The end message's sentence about the best step."""
        state = self.state
        if state.best_step is None:
            return ""
        where = f": {state.best_file}" if state.best_file else ""
        return f" Best step {state.best_step} (validation loss {state.best_loss:.6f}){where}"


def validation_for_run(job: Any, config: Any, dataset: TrainingDataset, held_out: TrainingDataset | None,
                       best_path: Path, main: bool) -> Validation | None:
    """The run's ``Validation`` from its ``TrainingConfig`` (None when its interval is 0): on the held-out pictures
    when there are any, else on the training pictures."""
    every = int(config.validate_every)
    if every == 0:
        return None
    if every < 0:
        every = automatic_interval(dataset.batch_size, dataset.gradient_accumulation,
                                   early_stop=bool(config.early_stop))
    source = held_out if held_out is not None else dataset
    samples = ValidationSet(source, int(job.model.alphas_cumprod.shape[0]), seed=int(config.seed),
                            chunk=dataset.batch_size,
                            noise_levels=EARLY_STOP_NOISE_LEVELS if config.early_stop else (0.0, 1.0))
    return Validation(job, samples, every=every, early_stop=bool(config.early_stop),
                      window=int(config.early_stop_window), best_path=best_path, main=main)
