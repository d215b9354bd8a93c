"""The one training job of a web UI and what the Train tab shows of it, without gradio.

``TrainingJobs`` runs at most one job in a background thread and keeps its event history, so a page that loads
later (a reload) shows the running job again; ``train_view`` turns a job into what the tab shows and ``follow``
yields a new view each time the job changes. What a job runs is decided by ``ui.train_handlers.start_training``.
"""

from __future__ import annotations

import html
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sdconcepts.atomic_files import describe_os_error
from sdconcepts.training.loop import TrainingEvent
from sdconcepts.training.outputs import draw_loss_plot
from sdconcepts.ui.ui_session import UiError

__all__ = ["HOST_NOTE", "SHOWN", "Run", "TrainView", "TrainingJob", "TrainingJobs", "follow", "plot_points", "train_view"]


# A step's ``extra`` key for one sentence about the host (e.g. it could not reload the file just saved), shown under
# the status.
HOST_NOTE = "host_note"


# -- the job -----------------------------------------------------------------------------------------------------


@dataclass
class TrainingJob:
    """One run: its events as they came (with arrival times), its end message or error, and its stop switch."""

    kind: str
    name: str
    max_steps: int
    stop: threading.Event = field(default_factory=threading.Event)
    events: list[TrainingEvent] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: str | None = None
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return not self.done

    def steps(self) -> list[TrainingEvent]:
        return [e for e in self.events if e.kind == "step"]

    def end(self) -> TrainingEvent | None:
        return next((e for e in reversed(self.events) if e.kind not in ("step", "preparing")), None)

    def wait(self, timeout: float | None = None) -> bool:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.done


Run = Callable[[threading.Event], Iterator[TrainingEvent]]


class TrainingJobs:
    """At most one training job at a time, run in a background thread; the last job stays for pages that load later."""

    def __init__(self, model_lock: threading.Lock) -> None:
        self.model_lock = model_lock
        self._lock = threading.Lock()
        self.current: TrainingJob | None = None

    def start(self, kind: str, name: str, max_steps: int, run: Run, *, lock_whole_run: bool = False) -> TrainingJob:
        """Start ``run(stop)`` in a thread; refuse with a UiError while another job runs."""
        with self._lock:
            if self.current is not None and self.current.running:
                job = self.current
                article = "an" if job.kind[:1] in "aeiou" else "a"  # "an embedding", "a hypernetwork"
                raise UiError(f"{article} {job.kind} ({job.name}) is training already; interrupt it or wait for it "
                              "to end")
            job = TrainingJob(kind, name, max_steps)
            job.thread = threading.Thread(target=self._work, args=(job, run, lock_whole_run),
                                          name=f"sdconcepts-train-{name}", daemon=True)
            self.current = job
        job.thread.start()
        return job

    def _work(self, job: TrainingJob, run: Run, lock_whole_run: bool) -> None:
        try:
            if lock_whole_run:
                with self.model_lock:
                    self._drive(job, run, step_lock=None)
            else:
                self._drive(job, run, step_lock=self.model_lock)
        except OSError as exc:  # a full disk while saving the .pt, the loss CSV or a preview: one line, not errno
            job.error = describe_os_error(exc)
        except Exception as exc:  # noqa: BLE001 - whatever stops the run is shown to the user, not lost in a thread
            job.error = str(exc) or type(exc).__name__
        finally:
            job.done = True

    @staticmethod
    def _drive(job: TrainingJob, run: Run, step_lock: threading.Lock | None) -> None:
        if step_lock is not None:
            with step_lock:
                events = run(job.stop)
        else:
            events = run(job.stop)
        while True:
            if step_lock is not None:
                with step_lock:
                    event = next(events, None)
            else:
                event = next(events, None)
            if event is None:
                return
            job.times.append(time.monotonic())
            job.events.append(event)

    def interrupt(self) -> str:
        job = self.current
        if job is None or not job.running:
            return "Nothing is training."
        job.stop.set()
        return f"Interrupting {job.name}: it stops after the current step and saves."


# -- what the tab shows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainView:
    """The Train tab's live outputs: status line, loss plot (a PNG path), previews and saved files."""

    status_html: str
    plot: str | None
    previews: list[str]
    saves: str
    running: bool
    version: tuple[int, bool]


SHOWN = 12  # the newest previews and saves the tab lists (all of them stay in the log folder)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _rate(started: float, arrivals: list[float], events: list[TrainingEvent]) -> float | None:
    times = [t for t, e in zip(arrivals, events, strict=False) if e.kind == "step"]
    recent = times[-11:]
    if len(recent) >= 2 and recent[-1] > recent[0]:
        return (len(recent) - 1) / (recent[-1] - recent[0])
    if times and times[0] > started:
        return 1.0 / (times[0] - started)
    return None


_plot_dir: Path | None = None


def plot_points(steps: list[TrainingEvent]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """The plot's (training, validation) points: the rows a resumed run logged before (its first event's
    ``history``), then this run's steps."""
    earlier = steps[0].history if steps else ()
    training = [(step, loss) for step, loss, _ in earlier if math.isfinite(loss)]
    validation = [(step, value) for step, _, value in earlier if value is not None]
    training += [(e.step, e.loss) for e in steps]
    validation += [(e.step, e.val_loss) for e in steps if e.val_loss is not None]
    return training, validation


def _plot(job: TrainingJob, steps: list[TrainingEvent]) -> str | None:
    global _plot_dir
    if not steps:
        return None
    if _plot_dir is None:
        _plot_dir = Path(tempfile.mkdtemp(prefix="sdconcepts-loss-"))
    # A new name per step: browsers and gradio's file cache key on the path.
    path = _plot_dir / f"{id(job)}-{steps[-1].step}.png"
    if not path.is_file():
        training, validation = plot_points(steps)
        draw_loss_plot(training, path, title=f"{job.name} loss", validation=validation)
    return str(path)


def _best(steps: list[TrainingEvent]) -> TrainingEvent | None:
    return next((e for e in reversed(steps) if e.best_saved), None)


def train_view(job: TrainingJob | None) -> TrainView:
    if job is None:
        return TrainView('<div class="sdconcepts-train-status">No training has run yet.</div>', None, [], "", False,
                         (0, False))
    # One consistent snapshot: the thread appends events and then flips ``done`` while we read.
    running = job.running
    events = list(job.events)
    times = list(job.times)[: len(events)]
    steps = [e for e in events if e.kind == "step"]
    end = next((e for e in reversed(events) if e.kind not in ("step", "preparing")), None)
    preparing = next((e for e in reversed(events) if e.kind == "preparing"), None)
    error = job.error
    parts: list[str] = []
    # The thread appends the end event (or sets the error) and flips ``done`` a moment later: a snapshot between the
    # two shows the end already; ``running`` stays as read, so ``follow`` still waits for ``done`` and yields again.
    ended = not running or end is not None or error is not None
    if not ended:
        state = "Training"
    elif error or (end and end.kind == "nan"):
        state = "Stopped"
    else:
        state = "Interrupted" if end and end.kind == "interrupted" else "Done"
    parts.append(f"<b>{state}</b> {html.escape(job.kind)} <b>{html.escape(job.name)}</b>")
    if steps:
        last = steps[-1]
        rate = _rate(job.started, times, events)
        parts.append(f"step {last.step}/{job.max_steps}")
        parts.append(f"[Epoch {last.epoch}: {last.epoch_step + 1}]")
        parts.append(f"loss: {last.loss:.7f}")
        checked = next((e for e in reversed(steps) if e.val_loss is not None), None)
        if checked is not None:
            parts.append(f"validation loss: {checked.val_loss:.6f} (step {checked.step})")
        parts.append(f"lr: {last.lr:g}")
        if ended:  # a speed and time left of a run that no longer runs would read as if it did
            parts.append(f"in {_duration(times[-1] - job.started) if times else '-'}")
        elif not job.stop.is_set():
            parts.append(f"{rate:.2f} it/s" if rate else "- it/s")
            parts.append(f"ETA {_duration(last.eta_s)}")
        compiled = [str(e.extra["compile"]) for e in steps if e.extra.get("compile")]
        if compiled:
            parts.append(html.escape(compiled[-1]))
    elif not ended:
        parts.append(preparing.message if preparing is not None else "loading the model and the dataset…")
    if job.stop.is_set() and not ended:
        parts.append("interrupting…")
    status = '<div class="sdconcepts-train-status">' + " · ".join(parts)
    message = error or (end.message if end else "")
    if message:
        css = "sdconcepts-train-error" if error or (end and end.kind == "nan") else "sdconcepts-train-end"
        status += f'<div class="{css}">{html.escape(message)}</div>'
    for note in dict.fromkeys(str(e.extra[HOST_NOTE]) for e in events if e.extra.get(HOST_NOTE)):
        status += f'<div class="sdconcepts-train-note">{html.escape(note)}</div>'
    status += "</div>"
    previews = [e.preview for e in steps if e.preview][-SHOWN:]
    saves = [f"step {e.step}: {e.saved}" for e in events if e.saved][-SHOWN:]
    best = _best(steps)
    if best is not None:
        saves.insert(0, f"best, step {best.step} (validation loss {best.val_loss:.6f}): {best.best_saved}")
    return TrainView(status, _plot(job, steps), previews, "\n".join(saves), running, (len(events), running))


def follow(jobs: TrainingJobs, poll: float = 0.25, job: TrainingJob | None = None) -> Iterator[TrainView]:
    """Views of the job (the current one when not given) each time it changes, until it ends (then one last view)."""
    job = job or jobs.current
    view = train_view(job)
    yield view
    while job is not None and view.running:
        time.sleep(poll)
        latest = train_view(job)
        if latest.version != view.version:
            view = latest
            yield view
