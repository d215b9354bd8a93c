"""What a run leaves in its log folder: the loss CSV, a JSON settings file, the loss plot, and the ETA.

Layout as A1111's (a1111-compat §4.7): ``<log directory>/<YYYY-MM-DD>/<name>/`` holding ``embeddings/`` or
``hypernetworks/`` copies, ``images/`` previews, ``<kind>_loss.csv`` (step, epoch, epoch_step, loss, learn_rate) and
``settings-<time>.json``; we add ``loss.png`` and a last CSV column, ``val_loss`` (the validation loss at the steps
that have one, empty elsewhere; A1111's five columns keep their places). Every file is written appended or atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from sdconcepts.atomic_files import atomic_path

__all__ = ["EtaClock", "LossLog", "draw_loss_plot", "run_folder", "write_settings"]

CSV_NAMES = {"embedding": "textual_inversion_loss.csv", "hypernetwork": "hypernetwork_loss.csv"}


def run_folder(log_directory: str | Path, name: str, when: dt.datetime | None = None) -> Path:
    when = when or dt.datetime.now()
    return Path(log_directory) / when.strftime("%Y-%m-%d") / name


def write_settings(folder: Path, settings: dict[str, Any], when: dt.datetime | None = None) -> Path:
    when = when or dt.datetime.now()
    path = folder / f"settings-{when.strftime('%Y-%m-%d-%H-%M-%S')}.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"datetime": when.strftime("%Y-%m-%d %H:%M:%S"), **settings}, indent=4, default=str))
    return path


CSV_HEADER = "step,epoch,epoch_step,loss,learn_rate,val_loss"
_A1111_HEADER = "step,epoch,epoch_step,loss,learn_rate"


class LossLog:
    """A1111's loss CSV (appended; header only for a new file) with our ``val_loss`` column, plus the points kept in
    memory for the plot: ``points`` (step, training loss) and ``val_points`` (step, validation loss)."""

    def __init__(self, path: Path, every: int = 1, *, resume_step: int | None = None) -> None:
        """``resume_step``: the step the run continues from. Rows past it were logged by a run that was killed
        after its last save; those steps are about to be trained (and logged) again, so they are dropped. A CSV
        with A1111's header gets the ``val_loss`` column (empty in its rows)."""
        self.path = path
        self.every = every
        self.points: list[tuple[int, float]] = []
        self.val_points: list[tuple[int, float]] = []
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = [CSV_HEADER] if lines[:1] == [_A1111_HEADER] else lines[:1]
        for line in lines[1:]:
            fields = line.split(",")
            try:
                step, loss = int(fields[0]), float(fields[3]) if fields[3].strip() else math.nan
            except (IndexError, ValueError):
                kept.append(line)
                continue
            if resume_step is not None and step > resume_step:
                continue
            kept.append(line if len(fields) > 5 or kept[0] != CSV_HEADER else f"{line},")
            if math.isfinite(loss):
                self.points.append((step, loss))
            if len(fields) > 5 and fields[5].strip():
                try:
                    self.val_points.append((step, float(fields[5])))
                except ValueError:
                    pass
        if every and kept != lines:
            with atomic_path(path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def history(self) -> list[tuple[int, float, float | None]]:
        """The rows logged so far as (step, training loss or NaN, validation loss or None), in step order."""
        rows: dict[int, list[float | None]] = {}
        for step, loss in self.points:
            rows.setdefault(step, [math.nan, None])[0] = loss
        for step, value in self.val_points:
            rows.setdefault(step, [math.nan, None])[1] = value
        return [(step, float(pair[0] if pair[0] is not None else math.nan), pair[1]) for step, pair in sorted(rows.items())]

    def add(self, step: int, epoch: int, epoch_step: int, loss: float, learn_rate: float,
            val_loss: float | None = None) -> None:
        """A step's row: written every ``every`` steps, and at every step with a validation loss."""
        if math.isfinite(loss):
            self.points.append((step, loss))
        if val_loss is not None:
            self.val_points.append((step, val_loss))
        if not self.every or (step % self.every and val_loss is None):
            return
        self._write(f"{step},{epoch},{epoch_step},{loss:.7f},{learn_rate},{'' if val_loss is None else f'{val_loss:.7f}'}")

    def add_validation(self, step: int, val_loss: float) -> None:
        """A validation loss without a training step (the check at the start of a run): plotted, not written (every
        CSV row stays a training step with all of A1111's columns)."""
        self.val_points.append((step, val_loss))

    def _write(self, row: str) -> None:
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                if new:
                    handle.write(f"{CSV_HEADER}\n")
                handle.write(f"{row}\n")
        except OSError as exc:
            if exc.filename is not None or not exc.errno:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc  # a failed write names no file

    def plot(self, path: Path, title: str = "") -> Path:
        return draw_loss_plot(self.points, path, title=title, validation=self.val_points)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


_BLUE, _ORANGE, _GREY = (30, 80, 200), (230, 120, 0), (190, 190, 190)


def draw_loss_plot(points: Sequence[tuple[int, float]], path: Path, *, title: str = "", size: tuple[int, int] = (640, 360),
                   validation: Sequence[tuple[int, float]] = ()) -> Path:
    """A loss-versus-step chart drawn with PIL: raw training losses in grey, their moving average in blue, the
    validation loss in orange with a dot per check, a legend and axis labels."""
    width, height = size
    image = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 15, 25, height - 35
    pen.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    checks = [(s, v) for s, v in validation if math.isfinite(v)]
    if title:
        pen.text((left, 6), title, fill=(0, 0, 0))
    if not finite and not checks:
        pen.text((left + 10, (top + bottom) // 2), "no finite loss values yet", fill=(0, 0, 0))
    else:
        steps = [s for s, _ in finite + checks]
        values = [v for _, v in finite + checks]
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        first, last = min(steps), max(steps)
        span = max(last - first, 1)

        def xy(step: float, value: float) -> tuple[float, float]:
            return (
                left + (step - first) / span * (right - left),
                bottom - (value - low) / (high - low) * (bottom - top),
            )

        if finite:
            raw = [xy(s, v) for s, v in finite]
            averages = _moving_average([v for _, v in finite], max(1, len(finite) // 20))
            _series(pen, raw, [xy(s, v) for (s, _), v in zip(finite, averages, strict=True)], _BLUE)
        if checks:
            dots = [xy(s, v) for s, v in checks]
            _series(pen, [], dots, _ORANGE)
            for x, y in dots:
                pen.ellipse((x - 2, y - 2, x + 2, y + 2), fill=_ORANGE)
        _legend(pen, right, top, [("training loss (average)", _BLUE)] * bool(finite)
                + [("validation loss", _ORANGE)] * bool(checks))
        for value, y in ((high, top), (low, bottom)):
            pen.text((4, y - 6), f"{value:.4f}", fill=(0, 0, 0))
        pen.text((left, bottom + 8), f"step {first}", fill=(0, 0, 0))
        label = f"step {last}"
        pen.text((right - 7 * len(label), bottom + 8), label, fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def _series(pen: ImageDraw.ImageDraw, raw: list[tuple[float, float]], line: list[tuple[float, float]],
            colour: tuple[int, int, int]) -> None:
    if len(line) > 1:
        if len(raw) > 1:
            pen.line(raw, fill=_GREY, width=1)
        pen.line(line, fill=colour, width=2)
    elif line:
        x, y = line[0]
        pen.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)


def _legend(pen: ImageDraw.ImageDraw, right: int, top: int, entries: list[tuple[str, tuple[int, int, int]]]) -> None:
    for row, (label, colour) in enumerate(entries):
        y = top + 6 + 14 * row
        x = right - 8 - 7 * len(label) - 22
        pen.line((x, y + 5, x + 16, y + 5), fill=colour, width=3)
        pen.text((x + 22, y), label, fill=(0, 0, 0))


class EtaClock:
    """Seconds left, from this run's own pace (A1111's elapsed / progress - elapsed over the steps of this run)."""

    def __init__(self, start_step: int, end_step: int) -> None:
        self.start_step = start_step
        self.end_step = end_step
        self.started = time.monotonic()

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / done * max(self.end_step - step, 0)
