"""The training loop: a generator of TrainingEvent, stopped by a ``threading.Event`` (minGPT's shape).

It knows nothing about files, previews or what is trainable: the parameters, the loss and the batches come in,
events go out. Side effects (saving, previews, logs) consume the events (``sdconcepts.training.outputs``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sdconcepts.threads import recheck_threads
from sdconcepts.training.schedule import LearnRateSchedule

__all__ = ["GradientClip", "TrainingEvent", "training_loop"]


@dataclass(frozen=True)
class TrainingEvent:
    """One optimizer step done (``kind`` "step"), the end of the run ("finished", "interrupted", "nan",
    "early_stop"), or, before the first step, how far its preparation got ("preparing": ``message`` says what it is
    doing).

    ``step`` is the total step count after the step (it lives in the saved file). ``texts`` are the prompts of the
    step's first micro-batch. Output consumers fill ``saved``, ``preview``, ``eta_s``, ``val_loss`` (the validation
    loss at a check step), ``best_saved`` (the best step's file, when this step is the best so far) and, on a run's
    first step, ``history``: the rows logged before it, as (step, training loss or NaN, validation loss or None), so
    that a resumed run's plot shows them too; ``message`` explains ends.
    """

    step: int
    loss: float
    lr: float
    kind: str = "step"
    epoch: int = 0
    epoch_step: int = 0
    texts: tuple[str, ...] = ()
    saved: str | None = None
    preview: str | None = None
    eta_s: float | None = None
    message: str = ""
    val_loss: float | None = None
    best_saved: str | None = None
    history: tuple[tuple[int, float, float | None], ...] = ()
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class GradientClip:
    """A1111's gradient clipping: ``mode`` "disabled", "value" or "norm", the limit a schedule string."""

    mode: str
    schedule: LearnRateSchedule | None

    def apply(self, parameters: Sequence[Tensor], step: int) -> None:
        if self.mode == "disabled" or self.schedule is None:
            return
        limit = self.schedule.rate_at(step)
        if self.mode == "value":
            torch.nn.utils.clip_grad_value_(parameters, limit)
        else:
            torch.nn.utils.clip_grad_norm_(parameters, limit)


def training_loop(
    parameters: Sequence[Tensor],
    optimizer: torch.optim.Optimizer,
    loss_of: Callable[[int, int], Tensor],
    *,
    start_step: int,
    accumulation: int,
    learn_rate: LearnRateSchedule,
    stop: threading.Event,
    clip: GradientClip | None = None,
    sync_gradients: Callable[[Sequence[Tensor]], None] | None = None,
) -> Generator[TrainingEvent, None, None]:
    """Step until the schedule finishes or ``stop`` is set. ``loss_of(step, micro)`` is one micro-batch's loss.

    A non-finite loss ends the run before the update, with a "nan" event naming the step; the weights are left as
    they were after the last good step.
    """
    step = start_step
    while True:
        rate = learn_rate.rate_at(step)
        if learn_rate.finished:
            yield TrainingEvent(step, math.nan, rate, kind="finished")
            return
        if stop.is_set():
            yield TrainingEvent(step, math.nan, rate, kind="interrupted")
            return
        for group in optimizer.param_groups:
            group["lr"] = rate
        total = 0.0
        for micro in range(accumulation):
            loss = loss_of(step, micro) / accumulation
            value = float(loss.detach())
            if not math.isfinite(value):
                yield TrainingEvent(step, value, rate, kind="nan", message=f"the loss became {value} at step {step + 1}")
                return
            loss.backward()  # type: ignore[no-untyped-call]
            total += value
        if sync_gradients is not None:
            sync_gradients(parameters)
        if clip is not None:
            clip.apply(parameters, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        recheck_threads()  # under ``auto``: other work may have started or stopped since the run began
        yield TrainingEvent(step, total, rate)
