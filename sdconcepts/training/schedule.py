"""A1111's learning-rate schedule strings (``0.005:100, 1e-3:1000, 1e-5``), also used for the clip value.

Semantics (a1111-compat §4.4): each ``rate:step`` pair means "this rate until this step"; a bare rate or a step of
``-1`` means "until max steps" and ends the list; a step past max steps is clamped and ends the list; pairs whose
step is not past the resumed step are skipped. When the last end step is reached the schedule is finished, which is
how max steps ends a run.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["LearnRateSchedule", "ScheduleError", "parse_schedule"]

_EXAMPLE = '"0.001:100, 0.00001:1000, 1e-5:10000"'


class ScheduleError(ValueError):
    """A schedule string that cannot be read."""


def parse_schedule(text: str, max_steps: int, current_step: int = 0) -> list[tuple[float, int]]:
    """The (rate, end step) pairs of ``text`` that apply from ``current_step`` on, as A1111 reads them."""
    pairs: list[tuple[float, int]] = []
    try:
        for part in str(text).split(","):
            if not part.strip():
                continue
            fields = part.split(":")
            if len(fields) == 2:
                rate, step = float(fields[0]), int(fields[1])
                if step > current_step:
                    pairs.append((rate, min(step, max_steps)))
                    if step > max_steps:
                        break
                elif step == -1:
                    pairs.append((rate, max_steps))
                    break
            elif len(fields) == 1:
                pairs.append((float(fields[0]), max_steps))
                break
            else:
                raise ValueError(part)
    except ValueError:
        raise ScheduleError(
            f"invalid schedule {text!r}: it should be a number or, for example, like {_EXAMPLE}"
        ) from None
    if not pairs:
        raise ScheduleError(
            f"invalid schedule {text!r}: no rate applies after step {current_step} "
            f"(a number, or pairs like {_EXAMPLE})"
        )
    return pairs


class LearnRateSchedule:
    """A1111's LearnRateScheduler: ``rate_at(step)`` is called once per step, in order; ``finished`` ends training."""

    def __init__(self, text: str, max_steps: int, current_step: int = 0) -> None:
        self.text = text
        self.pairs = parse_schedule(text, max_steps, current_step)
        self._iter: Iterator[tuple[float, int]] = iter(self.pairs)
        self.rate, self.end_step = next(self._iter)
        self.finished = False

    def rate_at(self, step: int) -> float:
        """Advance to ``step`` (A1111 moves at most one pair per call) and return the rate in force."""
        if step >= self.end_step:
            try:
                self.rate, self.end_step = next(self._iter)
            except StopIteration:
                self.finished = True
        return self.rate
