"""Training pieces without a diffusion model: schedules, templates, names, init vectors, datasets, loop, outputs."""

from __future__ import annotations

import math
import random
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdconcepts.file_names import target_path
from sdconcepts.training import (
    ConfigError,
    EmbeddingTrainingConfig,
    GradientClip,
    HypernetworkTrainingConfig,
    InvalidNameError,
    LearnRateSchedule,
    ScheduleError,
    TemplateError,
    TrainingDataset,
    available_templates,
    initial_vectors,
    parse_schedule,
    read_images,
    read_template,
    sanitize_name,
    training_loop,
)
from sdconcepts.training.dataset import DatasetError, filewords_for
from sdconcepts.training.outputs import LossLog, draw_loss_plot
from sdconcepts.training.templates import fill_template

# -- learning-rate schedules (a1111-compat §4.4) ------------------------------------------------------------------


def rates(text: str, max_steps: int, start: int = 0) -> list[float]:
    schedule = LearnRateSchedule(text, max_steps, start)
    out = []
    for step in range(start, max_steps + 5):
        rate = schedule.rate_at(step)
        if schedule.finished:
            break
        out.append(rate)
    return out


def test_schedule_pairs_mean_rate_until_step() -> None:
    assert parse_schedule("0.005:100, 1e-3:1000, 1e-5", 5000) == [(0.005, 100), (1e-3, 1000), (1e-5, 5000)]
    got = rates("0.005:100, 1e-3:1000, 1e-5", 2000)
    assert len(got) == 2000  # max steps ends the run
    assert got[99] == 0.005 and got[100] == 1e-3 and got[999] == 1e-3 and got[1000] == 1e-5


def test_schedule_clamps_skips_and_stops() -> None:
    assert parse_schedule("0.1:50, 0.01:500, 0.001", 200) == [(0.1, 50), (0.01, 200)]  # clamped, list ends
    assert parse_schedule("0.1:50, 0.01:-1, 0.5", 80) == [(0.1, 50), (0.01, 80)]
    assert parse_schedule("0.1:50, 0.01:100, 0.001", 300, current_step=60) == [(0.01, 100), (0.001, 300)]
    assert rates("0.1:50, 0.01:100", 1000) == [0.1] * 50 + [0.01] * 50  # an exhausted schedule finishes
    assert rates("0.005", 10, start=10) == []  # already at max steps


@pytest.mark.parametrize("text", ["", "abc", "0.1:x", "0.1:2:3", "0.1:10", ","])
def test_bad_schedules_are_refused(text: str) -> None:
    with pytest.raises(ScheduleError, match="schedule"):
        parse_schedule(text, 5, current_step=10)


def test_gradient_clip_modes_use_schedules() -> None:
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    GradientClip("value", LearnRateSchedule("1.0", 10)).apply([p], 0)
    assert p.grad.tolist() == [1.0, -1.0, 0.0, 0.0]
    p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    GradientClip("norm", LearnRateSchedule("0.5:1, 2.5", 10)).apply([p], 0)
    assert math.isclose(float(p.grad.norm()), 0.5, rel_tol=1e-5)
    p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0])
    GradientClip("disabled", None).apply([p], 0)
    assert p.grad.tolist() == [3.0, -4.0, 0.0, 0.0]


# -- templates and names -----------------------------------------------------------------------------------------


def test_shipped_templates() -> None:
    shipped = available_templates()
    assert {"subject", "subject_filewords", "style", "style_filewords", "hypernetwork", "none"} <= set(shipped)
    for name in ("subject", "style"):
        assert all("[name]" in line for line in read_template(name, require_name=True))
        assert all("[name]" in line and "[filewords]" in line for line in read_template(f"{name}_filewords"))
    assert all("[name]" not in line and "[filewords]" in line for line in read_template("hypernetwork"))
    assert read_template("none") == ["picture"]


def test_template_without_name_is_refused_for_textual_inversion(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    config = EmbeddingTrainingConfig(dataset=str(data), template="hypernetwork", width=32, height=32)
    with pytest.raises(ConfigError, match=r"lack \[name\]"):
        config.validated()
    # The same template is fine for a hypernetwork, which has no word to place.
    HypernetworkTrainingConfig(dataset=str(data), template="hypernetwork", width=32, height=32).validated()
    with pytest.raises(TemplateError, match="neither a file nor a shipped template"):
        read_template("no-such-template")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("learn_rate", "fast", "learn rate"),
        ("batch_size", 0, "batch size"),
        ("max_steps", 0, "max steps"),
        ("width", 30, "width"),
        ("tag_dropout", 1.5, "tag dropout"),
        ("latent_sampling", "sometimes", "latent sampling"),
        ("clip_grad_mode", "hard", "gradient clipping"),
        ("dataset", "/no/such/folder", "dataset directory"),
    ],
)
def test_config_names_the_bad_field(tmp_path: Path, field: str, value: object, message: str) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    fields = {"dataset": str(tmp_path), "template": "subject", "width": 32, "height": 32, field: value}
    with pytest.raises(ConfigError, match=message):
        EmbeddingTrainingConfig(**fields).validated()  # type: ignore[arg-type]


def test_fill_template_follows_a1111_create_text() -> None:
    line = "a photo of [filewords], art by [name]"
    assert fill_template(line, name="zork", filewords="red,circle,dark") == "a photo of red,circle,dark, art by zork"
    rng = random.Random(1)
    shuffled = fill_template(line, name="zork", filewords="a,b,c,d,e,f", rng=rng, shuffle_tags=True)
    assert shuffled != "a photo of a,b,c,d,e,f, art by zork"
    assert sorted(shuffled.split(" of ")[1].split(", art")[0].split(",")) == list("abcdef")
    dropped = [fill_template("[filewords]", name="", filewords="a,b,c,d", rng=random.Random(s), tag_dropout=0.5)
               for s in range(50)]
    assert {len(d.split(",")) for d in dropped if d} > {1} and any(len(d.split(",")) < 4 for d in dropped)
    assert all(fill_template("[filewords]", name="", filewords="a,b", rng=random.Random(s), tag_dropout=1.0) == ""
               for s in range(5))


def test_names_are_sanitised_and_may_not_leave_the_folder(tmp_path: Path) -> None:
    assert sanitize_name("my style: v2!") == "my style v2"
    assert target_path(tmp_path, "toy*tri").name == "toytri.pt"
    for bad in ("../evil", "a/b", "..", "", "***", "c:\\x"):
        with pytest.raises(InvalidNameError):
            target_path(tmp_path, bad)


def test_initial_vectors_pick_evenly_repeat_and_zero() -> None:
    rows = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 4)  # three init tokens
    picked = initial_vectors(rows, 6, 4)
    assert [int(r[0]) for r in picked] == [0, 0, 4, 4, 8, 8]  # vec[i] = rows[i * 3 // 6]
    assert [int(r[0]) for r in initial_vectors(rows, 2, 4)] == [0, 4]
    assert torch.equal(initial_vectors(rows[:1], 4, 4), rows[:1].repeat(4, 1))  # "*" x 4
    assert torch.equal(initial_vectors(rows[:0], 3, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="between 1 and 75"):
        initial_vectors(rows, 76, 4)


# -- datasets --------------------------------------------------------------------------------------------------


def _pool_encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed factor-4 'VAE': average pooling gives the mean, a constant std."""
    mean = torch.nn.functional.avg_pool2d(pixels, 4)[:, :1].repeat(1, 4, 1, 1)
    return mean, torch.full_like(mean, 0.5)


def _image(path: Path, size: tuple[int, int], colour: tuple[int, ...], mode: str = "RGB") -> None:
    Image.new(mode, size, colour).save(path)


def test_read_images_captions_filenames_and_regex(tmp_path: Path) -> None:
    _image(tmp_path / "00012-a red circle.png", (40, 24), (255, 0, 0))
    _image(tmp_path / "blue_square.png", (16, 16), (0, 0, 255))
    (tmp_path / "blue_square.txt").write_text("a blue square, dark", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not an image")
    records = read_images(tmp_path, width=32, height=32)
    assert [r.filewords for r in records] == ["a red circle", "a blue square, dark"]
    assert all(r.size == (32, 32) for r in records)
    assert records[0].pixels[0].min() > 0.99 and records[0].pixels[2].max() < -0.99  # RGB in [-1, 1]
    kept = read_images(tmp_path, width=32, height=32, keep_size=True)
    assert [r.size for r in kept] == [(40, 24), (16, 16)]
    assert filewords_for(tmp_path / "00012-a red circle.png", filename_regex=r"\w+", join_string="_") == "a_red_circle"
    with pytest.raises(ValueError, match="no images"):
        read_images(_empty(tmp_path), width=8, height=8)


def test_a_caption_longer_than_a_prompt_skips_its_picture_with_the_reason(tmp_path: Path) -> None:
    from sdconcepts.limits import MAX_PROMPT_CHARS

    _image(tmp_path / "a.png", (8, 8), (255, 0, 0))
    _image(tmp_path / "b.png", (8, 8), (0, 255, 0))
    (tmp_path / "a.txt").write_text("x" * (MAX_PROMPT_CHARS + 1))  # a 10 MB caption used 6.6 GB to encode
    (tmp_path / "b.txt").write_text("é" * MAX_PROMPT_CHARS)  # as long as a prompt may be (2 bytes a character)
    (record,) = read_images(tmp_path, width=8, height=8)
    assert record.path.name == "b.png" and len(record.filewords) == MAX_PROMPT_CHARS
    (tmp_path / "b.png").unlink()
    with pytest.raises(DatasetError) as info:
        read_images(tmp_path, width=8, height=8)
    assert f"(skipped: a.png (caption a.txt longer than {MAX_PROMPT_CHARS} characters))" in str(info.value)


def test_a_backtracking_filename_regex_is_stopped_with_one_line(tmp_path: Path) -> None:
    _image(tmp_path / ("a" * 60 + "!.png"), (8, 8), (255, 0, 0))

    def too_long(_signum: int, _frame: object) -> None:
        raise AssertionError("the filename regex was not stopped")

    # A deadline by signal: ``re`` holds the GIL while it backtracks (a watchdog thread never runs), but it checks
    # for signals, so without the fix this test fails after 20 s instead of hanging (2**60 ways to split the name).
    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(20)
    try:
        # The issue's pattern: the regex engine finds at once that it cannot match (A1111's words: none).
        (record,) = read_images(tmp_path, width=8, height=8, filename_regex="(a+)+$")
        assert record.filewords == ""
        # One that backtracks there too is stopped at its timeout, with the run refused in one line.
        with pytest.raises(DatasetError) as info:
            read_images(tmp_path, width=8, height=8, filename_regex="(a|aa)+$")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert "ran for over 0.5 s on the name 'aaaa" in str(info.value) and "simplify it" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(DatasetError, match="is invalid"):
        read_images(tmp_path, width=8, height=8, filename_regex="(")


def _empty(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "x.txt").write_text("caption without image")
    return folder


def test_latent_sampling_methods(tmp_path: Path) -> None:
    for i in range(4):
        _image(tmp_path / f"{i}.png", (16, 16), (60 * i, 0, 0))
    records = read_images(tmp_path, width=16, height=16)

    def dataset(method: str, seed: int = 0) -> TrainingDataset:
        return TrainingDataset(records, _pool_encode, name="w", template_lines=["[name] [filewords]"],
                               latent_sampling=method, seed=seed)

    mean = _pool_encode(records[0].pixels[None])[0][0]
    assert torch.equal(dataset("deterministic").latent_for(0, 0), mean)
    once = dataset("once")
    assert not torch.equal(once.latent_for(0, 0), mean)
    assert torch.equal(once.latent_for(0, 0), once.latent_for(0, 7))  # cached: one sample for the run
    assert torch.equal(once.latent_for(0, 0), dataset("once").latent_for(0, 0))  # seeded
    rand = dataset("random")
    assert not torch.equal(rand.latent_for(0, 1), rand.latent_for(0, 2))  # re-sampled every step
    assert torch.equal(rand.latent_for(0, 1), dataset("random").latent_for(0, 1))
    assert float((rand.latent_for(0, 1) - mean).std()) == pytest.approx(0.5, rel=0.5)


def test_batches_cover_epochs_and_group_sizes(tmp_path: Path) -> None:
    for i in range(5):
        _image(tmp_path / f"small{i}.png", (16, 16), (i, 0, 0))
    for i in range(3):
        _image(tmp_path / f"wide{i}.png", (32, 16), (0, i, 0))
    records = read_images(tmp_path, width=16, height=16, keep_size=True)
    data = TrainingDataset(records, _pool_encode, name="w", template_lines=["[name]"], batch_size=2,
                           gradient_accumulation=3)
    assert (data.batches_per_epoch, data.usable_batches, data.steps_per_epoch) == (4, 3, 1)  # drop-last for accumulation
    seen = []
    for step in range(6):
        for micro in range(3):
            batch = data.batch(step, micro)
            assert batch.latents.shape[0] == 2 and len({t for t in batch.texts}) == 1
            seen.append(batch.latents.shape[-1])
    assert set(seen) == {4, 8}  # both size groups appear, never mixed in a batch
    assert [data.batch(4, m).latents.sum() for m in range(3)] == [data.batch(4, m).latents.sum() for m in range(3)]


def test_fixed_texts_without_shuffle_and_fresh_texts_with_it(tmp_path: Path) -> None:
    for i in range(3):
        _image(tmp_path / f"{i}.png", (8, 8), (i, 0, 0))
        (tmp_path / f"{i}.txt").write_text("red,circle,dark,big")
    records = read_images(tmp_path, width=8, height=8)
    lines = [f"line{i} [name] [filewords]" for i in range(10)]
    fixed = TrainingDataset(records, _pool_encode, name="zork", template_lines=lines)
    assert {fixed.text_for(0, s) for s in range(20)} == {fixed.text_for(0, 0)}  # A1111: chosen once per image
    shuffled = TrainingDataset(records, _pool_encode, name="zork", template_lines=lines, shuffle_tags=True)
    assert len({shuffled.text_for(0, s) for s in range(20)}) > 5
    assert shuffled.text_for(0, 3) == TrainingDataset(records, _pool_encode, name="zork", template_lines=lines,
                                                      shuffle_tags=True).text_for(0, 3)


def test_alpha_weights_normalised_to_mean_one(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[:8, :, 3] = 255  # top half opaque
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "half.png")
    _image(tmp_path / "plain.png", (16, 16), (0, 0, 0))
    records = read_images(tmp_path, width=16, height=16, use_alpha=True)
    data = TrainingDataset(records, _pool_encode, name="w", template_lines=["[name]"], use_alpha=True,
                           latent_sampling="deterministic")
    assert data.weights is not None
    half, plain = data.weights
    assert half.shape == (4, 4, 4) and float(half.min()) == 0.0 and float(half.mean()) == pytest.approx(1.0)
    assert float(half[:, 0].mean()) > 1.5 and float(half[:, -1].max()) < 0.2
    assert torch.equal(plain, torch.ones(4, 4, 4))


# -- the loop --------------------------------------------------------------------------------------------------


def _quadratic_loop(target: float, steps: str, stop: threading.Event, start: int = 0):  # type: ignore[no-untyped-def]
    p = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([p], lr=0.1)

    def loss_of(step: int, micro: int) -> torch.Tensor:
        return ((p - target) ** 2).sum()

    events = training_loop([p], optimizer, loss_of, start_step=start, accumulation=2,
                           learn_rate=LearnRateSchedule(steps, 10, start), stop=stop)
    return p, events


def test_loop_steps_to_max_and_reports_each_step() -> None:
    p, events = _quadratic_loop(1.0, "0.1:4, 0.05", threading.Event(), start=2)
    collected = list(events)
    assert [e.step for e in collected] == list(range(3, 11)) + [10]
    assert collected[-1].kind == "finished"
    assert [e.lr for e in collected[:3]] == [0.1, 0.1, 0.05]
    assert collected[0].loss > collected[-2].loss
    # SGD on (p - 1)^2 with accumulation 2: p moves by lr * 2 * (1 - p) per step.
    assert torch.allclose(p, torch.full((3,), 1 - 0.8 * 0.8 * 0.9**6))


def test_loop_stops_on_event_and_on_nan() -> None:
    stop = threading.Event()
    p, events = _quadratic_loop(1.0, "0.1", stop)
    first = next(events)
    stop.set()
    assert [e.kind for e in events] == ["interrupted"] and first.step == 1
    p, events = _quadratic_loop(math.inf, "0.1", threading.Event())
    collected = list(events)
    assert [e.kind for e in collected] == ["nan"] and "step 1" in collected[0].message
    assert torch.equal(p.detach(), torch.zeros(3))  # no update from a non-finite loss


def test_loss_log_csv_and_plot(tmp_path: Path) -> None:
    log = LossLog(tmp_path / "textual_inversion_loss.csv", every=2)
    for step in range(1, 6):
        # A validation loss at step 3: its row is written although 3 is not a multiple of ``every``.
        log.add(step, (step - 1) // 2, (step - 1) % 2, 1.0 / step, 0.005, 0.3 if step == 3 else None)
    lines = (tmp_path / "textual_inversion_loss.csv").read_text().splitlines()
    assert lines == ["step,epoch,epoch_step,loss,learn_rate,val_loss", "2,0,1,0.5000000,0.005,",
                     "3,1,0,0.3333333,0.005,0.3000000", "4,1,1,0.2500000,0.005,"]
    resumed = LossLog(tmp_path / "textual_inversion_loss.csv")
    assert resumed.points == [(2, 0.5), (3, 0.3333333), (4, 0.25)] and resumed.val_points == [(3, 0.3)]
    plot = draw_loss_plot(log.points, tmp_path / "loss.png", title="loss")
    with Image.open(plot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert image.size == (640, 360)
    assert ((pixels[..., 2] > 150) & (pixels[..., 0] < 80)).sum() > 100  # the blue curve was drawn
    assert not ((pixels[..., 0] > 200) & (pixels[..., 1] > 90) & (pixels[..., 1] < 150) & (pixels[..., 2] < 60)).any()
    with Image.open(log.plot(tmp_path / "both.png")) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert ((pixels[..., 0] > 200) & (pixels[..., 1] > 90) & (pixels[..., 1] < 150) & (pixels[..., 2] < 60)).sum() > 20
