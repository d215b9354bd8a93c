"""What a run leaves in its log folder: the loss CSV, a JSON settings file, the loss plot, and the ETA.

Layout as A1111's (a1111-compat §4.7): ``<log directory>/<YYYY-MM-DD>/<name>/`` holding ``embeddings/`` or
``hypernetworks/`` copies, ``images/`` previews, ``<kind>_loss.csv`` (step, epoch, epoch_step, loss, learn_rate) and
``settings-<time>.json``; we add ``loss.png``. Every file is written atomically.
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


class LossLog:
    """A1111's loss CSV (appended; header only for a new file), plus the points kept in memory for the plot."""

    def __init__(self, path: Path, every: int = 1, *, resume_step: int | None = None) -> None:
        """``resume_step``: the step the run continues from. Rows past it were logged by a run that was killed
        after its last save; those steps are about to be trained (and logged) again, so they are dropped."""
        self.path = path
        self.every = every
        self.points: list[tuple[int, float]] = []
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = lines[:1]
        for line in lines[1:]:
            fields = line.split(",")
            try:
                step, loss = int(fields[0]), float(fields[3])
            except (IndexError, ValueError):
                kept.append(line)
                continue
            if resume_step is not None and step > resume_step:
                continue
            kept.append(line)
            self.points.append((step, loss))
        if every and len(kept) != len(lines):
            with atomic_path(path) as tmp:
                tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def add(self, step: int, epoch: int, epoch_step: int, loss: float, learn_rate: float) -> None:
        self.points.append((step, loss))
        if not self.every or step % self.every:
            return
        new = not self.path.is_file()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                if new:
                    handle.write("step,epoch,epoch_step,loss,learn_rate\n")
                handle.write(f"{step},{epoch},{epoch_step},{loss:.7f},{learn_rate}\n")
        except OSError as exc:
            if exc.filename is not None or not exc.errno:
                raise
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc  # a failed write names no file

    def plot(self, path: Path, title: str = "") -> Path:
        return draw_loss_plot(self.points, path, title=title)


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_loss_plot(points: Sequence[tuple[int, float]], path: Path, *, title: str = "", size: tuple[int, int] = (640, 360)) -> Path:
    """A loss-versus-step chart drawn with PIL: raw losses in grey, a moving average in blue, axis labels."""
    width, height = size
    image = Image.new("RGB", size, "white")
    pen = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 15, 25, height - 35
    pen.rectangle((left, top, right, bottom), outline=(160, 160, 160))
    finite = [(s, v) for s, v in points if math.isfinite(v)]
    if title:
        pen.text((left, 6), title, fill=(0, 0, 0))
    if finite:
        steps = [s for s, _ in finite]
        values = [v for _, v in finite]
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

        raw = [xy(s, v) for s, v in finite]
        smooth = [xy(s, v) for s, v in zip(steps, _moving_average(values, max(1, len(values) // 20)), strict=True)]
        if len(raw) > 1:
            pen.line(raw, fill=(190, 190, 190), width=1)
            pen.line(smooth, fill=(30, 80, 200), width=2)
        else:
            x, y = raw[0]
            pen.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(30, 80, 200))
        for value, y in ((high, top), (low, bottom)):
            pen.text((4, y - 6), f"{value:.4f}", fill=(0, 0, 0))
        pen.text((left, bottom + 8), f"step {first}", fill=(0, 0, 0))
        label = f"step {last}"
        pen.text((right - 7 * len(label), bottom + 8), label, fill=(0, 0, 0))
    else:
        pen.text((left + 10, (top + bottom) // 2), "no finite loss values yet", fill=(0, 0, 0))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


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
