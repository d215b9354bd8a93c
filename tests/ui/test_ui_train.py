"""Train tab handlers and the training job manager, on real files and the tiny real model (a few steps each)."""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdconcepts.embeddings.files import load_embedding
from sdconcepts.hypernetworks.files import load_hypernetwork
from sdconcepts.training.config import EmbeddingTrainingConfig, HypernetworkTrainingConfig
from sdconcepts.training.loop import TrainingEvent
from sdconcepts.training.outputs import LossLog
from sdconcepts.training.presets import PRESETS, preset
from sdconcepts.ui import handlers, train_handlers, train_jobs
from sdconcepts.ui.ui_session import UiConfig, UiError, UiSession

SIZE = 32  # a size the tiny model trains at quickly


@pytest.fixture()
def session(tiny_model_dir: Path, tmp_path: Path) -> UiSession:
    return UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[tmp_path / "embeddings"],
                              hypernetworks_dirs=[tmp_path / "hypernetworks"], outputs_dir=tmp_path / "outputs",
                              device="cpu"))


def _fields(data: Path, tmp_path: Path, **changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "dataset": str(data), "learn_rate": "0.01", "batch_size": 1, "gradient_accumulation": 1,
        "log_directory": str(tmp_path / "log"), "template": "subject", "width": SIZE, "height": SIZE,
        "keep_size": False, "max_steps": 4, "preview_every": 2, "save_every": 2, "use_alpha_weight": False,
        "shuffle_tags": False, "tag_dropout": 0.0, "latent_sampling": "once", "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1", "save_image_with_embedding": True, "preview_steps": 2, "preview_seed": 1,
    }
    values.update(changes)
    return values


# -- settings -----------------------------------------------------------------------------------------------------


def test_bad_settings_name_their_field_and_start_nothing(dataset: Path, tmp_path: Path) -> None:
    config, errors = train_handlers.training_config("embedding", "toy", _fields(dataset, tmp_path))
    assert isinstance(config, EmbeddingTrainingConfig) and errors == {}
    assert config.max_steps == 4 and config.preview_every == 2

    cases = {
        "learn_rate": {"learn_rate": ""},
        "dataset": {"dataset": str(tmp_path / "missing")},
        "size": {"width": 36},
        "batch_size": {"batch_size": 0},
        "max_steps": {"max_steps": 0},
        "log_directory": {"log_directory": ""},
        "intervals": {"save_every": -1},
        "template": {"template": "no-such-template"},
        "clip_grad_value": {"clip_grad_mode": "value", "clip_grad_value": "abc"},
    }
    for key, change in cases.items():
        config, errors = train_handlers.training_config("embedding", "toy", _fields(dataset, tmp_path, **change))
        assert config is None and list(errors) == [key], (key, errors)
        assert key in train_handlers.ERROR_FIELDS

    config, errors = train_handlers.training_config("hypernetwork", "", _fields(dataset, tmp_path))
    assert config is None and "name" in errors
    # A hypernetwork has no "save images with embedding" field; the rest is the same form.
    config, errors = train_handlers.training_config("hypernetwork", "h", _fields(dataset, tmp_path, template="hypernetwork"))
    assert isinstance(config, HypernetworkTrainingConfig) and errors == {}


def test_paths_no_system_takes_and_fractional_numbers_are_named_in_one_line(dataset: Path, tmp_path: Path) -> None:
    roots = [tmp_path, dataset]
    long = str(tmp_path / ("d" * 200) / ("e" * 6000))
    for key, value, reason in (
        ("dataset", str(tmp_path / "a\x00b"), "dataset directory: contains a NUL character"),  # was "embedded null byte"
        ("log_directory", long, "log directory: 6"),  # was "[Errno 36] File name too long"
        ("dataset", str(tmp_path / ("n" * 300)), "dataset directory: a name in it is 300 bytes long; names end at 255"),
    ):
        config, errors = train_handlers.training_config("embedding", "toy", _fields(dataset, tmp_path, **{key: value}),
                                                        roots=roots)
        assert config is None and list(errors) == [key] and errors[key].startswith(reason), errors
        assert "\n" not in errors[key]
    for value, message in ((1.5, "batch size must be a whole number, got 1.5"),
                           (float("nan"), "batch size must be a whole number, got nan")):
        config, errors = train_handlers.training_config("embedding", "toy",
                                                        _fields(dataset, tmp_path, batch_size=value))
        assert config is None and errors == {"batch_size": message}


def test_preprocess_and_create_refuse_such_values_too(session: UiSession, tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    session.train_roots = lambda: [tmp_path]  # type: ignore[method-assign]
    with pytest.raises(UiError, match="^source directory: contains a NUL character"):
        train_handlers.preprocess(session, str(tmp_path / "x\x00"), str(tmp_path / "out"), None)
    for vectors, shown in ((1.5, "1.5"), (float("nan"), "nan")):  # 1.5 became 1 vector, NaN a Python error
        with pytest.raises(UiError, match=f"^vectors per token must be a whole number, got {shown}$"):
            train_handlers.create_embedding(session, str(tiny_model_dir), "toy", "", vectors, False)
    assert not (tmp_path / "embeddings").exists()


# -- create -------------------------------------------------------------------------------------------------------


def _form(data: Path, tmp_path: Path, **changes: Any) -> train_handlers.TrainForm:
    values: dict[str, Any] = {
        "embedding_learn_rate": "0.01", "hypernetwork_learn_rate": "0.00001", "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1", "batch_size": 1, "gradient_accumulation": 1, "dataset": str(data),
        "log_directory": str(tmp_path / "log"), "template": "subject", "width": SIZE, "height": SIZE,
        "keep_size": False, "max_steps": 4, "preview_every": 2, "save_every": 2, "use_alpha_weight": False,
        "save_image_with_embedding": True, "read_txt2img": False, "shuffle_tags": False, "tag_dropout": None,
        "latent_sampling": "once", "preview_prompt": "a txt2img prompt", "preview_negative_prompt": None,
        "preview_steps": 3, "preview_sampler": "Euler a", "preview_cfg_scale": 7, "preview_seed": 5,
    }
    values.update(changes)
    return train_handlers.TrainForm.from_values(values)


def test_the_train_form_gives_the_kinds_rate_and_txt2img_previews_only_when_asked(dataset: Path,
                                                                                   tmp_path: Path) -> None:
    form = _form(dataset, tmp_path)
    assert train_handlers.TrainForm.keys()[:2] == ("embedding_learn_rate", "hypernetwork_learn_rate")
    embedding = form.config_values("embedding")
    assert embedding["learn_rate"] == "0.01" and embedding["tag_dropout"] == 0.0
    assert not any(key.startswith("preview_") and key != "preview_every" for key in embedding)
    assert form.config_values("hypernetwork")["learn_rate"] == "0.00001"
    asked = _form(dataset, tmp_path, read_txt2img=True).config_values("embedding")
    assert (asked["preview_prompt"], asked["preview_cfg_scale"]) == ("a txt2img prompt", 7.0)
    # A txt2img field that is not there (None: a host without it) keeps the run's default.
    assert "preview_negative_prompt" not in asked
    config, errors = train_handlers.training_config("embedding", "toy", asked)
    assert errors == {} and isinstance(config, EmbeddingTrainingConfig) and config.preview_steps == 3
    assert config.preview_negative_prompt == "" and config.preview_sampler == "Euler a"


@pytest.mark.parametrize(("sampler", "schedule", "used", "noted"), [
    ("DPM++ 2M", "Karras", "DPM++ 2M Karras", False),  # A1111 1.9+: the schedule type apart
    ("DPM++ 2M", "Automatic", "DPM++ 2M", False),
    ("DPM++ 2M Karras", None, "DPM++ 2M Karras", False),  # older hosts, and our own txt2img
    ("LCM", "Automatic", "Euler a", True),  # a sampler this engine lacks: Euler a, and the start says so
])
def test_previews_read_a_hosts_sampler_and_schedule_type(dataset: Path, tmp_path: Path, sampler: str,
                                                         schedule: str | None, used: str, noted: bool) -> None:
    form = _form(dataset, tmp_path, read_txt2img=True, preview_sampler=sampler, preview_schedule=schedule)
    assert form.config_values("embedding")["preview_sampler"] == used
    note = form.preview_sampler_used()[1]
    assert (sampler in note and "Euler a" in note) if noted else note == ""
    unasked = _form(dataset, tmp_path, preview_sampler=sampler, preview_schedule=schedule)
    assert "preview_sampler" not in unasked.config_values("embedding") and unasked.preview_sampler_used() == (None, "")


def test_a_train_click_with_folders_outside_the_uis_starts_nothing(session: UiSession, dataset: Path,
                                                                    tmp_path: Path) -> None:
    jobs = train_jobs.TrainingJobs(session.generate_lock)
    started = train_handlers.start_from_form(session, jobs, "embedding", "", "toy", _form(dataset, tmp_path))
    assert started.job is None and jobs.current is None
    assert started.message == "Fix the marked settings; nothing was started."
    assert set(started.problems) == {"dataset", "log_directory"}
    assert "start it with --train-root DIR" in started.problems["dataset"]


def test_inside_a_host_the_refusal_names_the_option_the_extension_registers(session: UiSession, dataset: Path,
                                                                           tmp_path: Path) -> None:
    """A host rejects our server's --train-root; the extension registers --sdconcepts-train-root (preload.py)."""
    hosted = UiSession(dataclasses.replace(session.config, train_root_option="--sdconcepts-train-root"))
    jobs = train_jobs.TrainingJobs(hosted.generate_lock)
    started = train_handlers.start_from_form(hosted, jobs, "embedding", "", "toy", _form(dataset, tmp_path))
    assert started.job is None
    assert "start it with --sdconcepts-train-root DIR" in started.problems["dataset"], started.problems
    # --sdconcepts-train-root adds folders to the default ones (the host's working folder and data folders).
    extended = UiSession(dataclasses.replace(session.config, extra_train_roots=[dataset.parent, tmp_path]))
    assert extended.train_roots() == [*session.train_roots(), dataset.parent, tmp_path]
    allowed = UiSession(dataclasses.replace(session.config, train_roots=[dataset.parent, tmp_path]))
    config, problems = train_handlers.training_config("embedding", "toy", _form(dataset, tmp_path).config_values(
        "embedding"), roots=allowed.train_roots())
    assert problems == {} and config is not None


def test_create_embedding_and_hypernetwork_with_a1111_semantics(session: UiSession, tiny_model_dir: Path) -> None:
    label = str(tiny_model_dir)
    path = train_handlers.create_embedding(session, label, "toy thing", "triangle", 3, False)
    embedding = load_embedding(path)
    assert path.parent == session.config.embeddings_dirs[0] and embedding.step == 0
    assert tuple(embedding.vectors.shape) == (3, 48)
    assert train_handlers.embedding_names(session) == ["toy thing"]
    with pytest.raises(UiError, match="^name: .*already exists"):
        train_handlers.create_embedding(session, label, "toy thing", "triangle", 1, False)
    assert load_embedding(train_handlers.create_embedding(session, label, "toy thing", "", 1, True)).vectors.abs().sum() == 0
    with pytest.raises(UiError, match="^name"):
        train_handlers.create_embedding(session, label, "  ", "*", 1, False)

    path = train_handlers.create_hypernetwork(session, "toy-hn", ["48", "32", "64"], "1, 2, 1", "relu", "Normal", True, False,
                                     "", False)
    hypernetwork = load_hypernetwork(path)
    assert sorted(hypernetwork.widths) == [32, 48, 64] and train_handlers.hypernetwork_names(session) == ["toy-hn"]
    with pytest.raises(UiError, match="^layer structure"):
        train_handlers.create_hypernetwork(session, "bad", ["48"], "2, 2, 1", "relu", "Normal", False, False, "", False)
    with pytest.raises(UiError, match="^modules"):
        train_handlers.create_hypernetwork(session, "none", [], "1, 2, 1", "relu", "Normal", False, False, "", False)


# -- the job ------------------------------------------------------------------------------------------------------


def test_training_streams_steps_plot_previews_and_saves(session: UiSession, tiny_model_dir: Path, dataset: Path,
                                                       tmp_path: Path) -> None:
    label = str(tiny_model_dir)
    train_handlers.create_embedding(session, label, "toytri", "triangle", 2, False)
    config, _ = train_handlers.training_config("embedding", "toytri", _fields(dataset, tmp_path, validate_every=2))
    assert config is not None
    jobs = train_jobs.TrainingJobs(session.generate_lock)
    assert "No training" in train_jobs.train_view(jobs.current).status_html
    job = train_handlers.start_training(session, jobs, "embedding", label, "toytri", config)
    views = list(train_jobs.follow(jobs, poll=0.05, job=job))
    last = views[-1]
    assert not last.running and job.error is None, job.error
    assert "step 4/4" in last.status_html and "loss:" in last.status_html and " · in " in last.status_html
    assert "it/s" not in last.status_html and "ETA" not in last.status_html  # an ended run has neither
    assert "Training finished at 4 steps" in last.status_html
    assert last.status_html.startswith('<div class="sdconcepts-train-status"><b>Done</b>')
    assert last.plot is not None and Path(last.plot).is_file()
    assert [Path(p).name for p in last.previews] == ["toytri-2.png", "toytri-4.png"]
    assert all(Path(p).is_file() for p in last.previews)
    path = session.config.embeddings_dirs[0] / "toytri.pt"
    # Each save once: the end of the run does not write (or list) again what step 4's save wrote.
    saves = last.saves.splitlines()
    assert saves[1:] == [f"step 2: {path}", f"step 4: {path}"]
    # The validation loss (steps 0, 2, 4) in the status line, its best step first among the saved files and named
    # in the end message.
    assert "validation loss: " in last.status_html and "Best step " in last.status_html
    assert saves[0].startswith("best, step ") and saves[0].endswith("toytri-best.pt")
    assert load_embedding(session.config.embeddings_dirs[0] / "toytri.pt").step == 4
    # A page loaded afterwards (a reload) shows the same job.
    assert train_jobs.train_view(jobs.current).status_html == last.status_html
    assert [v.status_html for v in train_jobs.follow(jobs)][-1] == last.status_html


def test_interrupt_saves_a_second_start_is_refused_and_txt2img_still_works(
    session: UiSession, tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    label = str(tiny_model_dir)
    train_handlers.create_embedding(session, label, "toytri", "triangle", 1, False)
    config, _ = train_handlers.training_config("embedding", "toytri",
                                      _fields(dataset, tmp_path, max_steps=100000, preview_every=0, save_every=0))
    assert config is not None
    jobs = train_jobs.TrainingJobs(session.generate_lock)
    assert jobs.interrupt() == "Nothing is training."
    job = train_handlers.start_training(session, jobs, "embedding", label, "toytri", config)
    deadline = time.monotonic() + 60
    while not job.steps() and time.monotonic() < deadline and job.running:
        time.sleep(0.02)
    assert job.steps(), job.error
    with pytest.raises(UiError, match=r"^an embedding \(toytri\) is training already"):
        train_handlers.start_training(session, jobs, "embedding", label, "toytri", config)
    # Generation takes turns with the training steps on the shared model.
    params = handlers.generation_params("a toytri", "", "Euler a", 2, 7.0, 1, SIZE, SIZE, 1, 1)
    out = handlers.generate(session, label, params)
    assert len(out.gallery) == 1 and job.running
    steps_at_interrupt = job.steps()[-1].step
    assert "Interrupting toytri" in jobs.interrupt()
    assert job.wait(60)
    end = job.end()
    assert end is not None and end.kind == "interrupted" and job.error is None
    # Within one step of the interrupt (the step running when it came finishes), and that step is saved.
    assert job.steps()[-1].step <= steps_at_interrupt + 2
    assert load_embedding(session.config.embeddings_dirs[0] / "toytri.pt").step == job.steps()[-1].step
    assert "<b>Interrupted</b>" in train_jobs.train_view(job).status_html
    assert "Training interrupted" in train_jobs.train_view(job).status_html
    # Once it ended, a new job may start.
    config2, _ = train_handlers.training_config("embedding", "toytri", _fields(dataset, tmp_path, max_steps=job.steps()[-1].step + 1,
                                                                      preview_every=0, save_every=0))
    assert config2 is not None
    again = train_handlers.start_training(session, jobs, "embedding", label, "toytri", config2)
    assert again.wait(60) and again.error is None and again is jobs.current


def test_the_view_says_how_far_latent_caching_got() -> None:
    job = train_jobs.TrainingJob("embedding", "toytri", 100)
    job.events.append(TrainingEvent(0, math.nan, 0.0, kind="preparing", message="caching latents: 1200 of 10000 images"))
    job.times.append(job.started + 1)
    view = train_jobs.train_view(job)
    assert view.running and job.end() is None  # not an end: the run goes on
    assert "<b>Training</b>" in view.status_html and "caching latents: 1200 of 10000 images" in view.status_html


def test_the_view_between_the_end_event_and_done_already_shows_the_end() -> None:
    """The training thread appends its end event (or sets the error) and flips ``done`` a moment later; a page that
    polls in between must already read the end (a host test once saw "Training … interrupting…" beside the end
    message), and ``follow`` must still give one more view once ``done`` flips."""
    job = train_jobs.TrainingJob("embedding", "toytri", 100)
    job.events.append(TrainingEvent(1, 0.5, 0.005))
    job.times.append(job.started + 1)
    job.stop.set()
    assert "<b>Training</b>" in train_jobs.train_view(job).status_html
    assert "interrupting…" in train_jobs.train_view(job).status_html
    job.events.append(TrainingEvent(1, math.nan, 0.005, kind="interrupted", message="Training interrupted at 1 steps."))
    job.times.append(job.started + 2)
    between = train_jobs.train_view(job)
    assert job.running and between.running
    assert "<b>Interrupted</b>" in between.status_html and "interrupting…" not in between.status_html
    assert "Training interrupted at 1 steps." in between.status_html
    views = train_jobs.follow(train_jobs.TrainingJobs(threading.Lock()), poll=0.01, job=job)
    assert next(views).running
    job.done = True
    last = next(views)
    assert not last.running and "<b>Interrupted</b>" in last.status_html
    assert next(views, None) is None

    failing = train_jobs.TrainingJob("embedding", "toytri", 100)
    failing.error = "out of memory"
    view = train_jobs.train_view(failing)
    assert failing.running and "<b>Stopped</b>" in view.status_html and "sdconcepts-train-error" in view.status_html


def test_the_plot_of_a_resumed_run_shows_the_earlier_steps_too() -> None:
    # The run's first event carries the rows the loss CSV already had (training.run; tests/training/test_validation
    # checks a real resumed run gives them): the plot starts at step 1, not at the resumed run's first step.
    first = TrainingEvent(3, 0.3, 0.005, val_loss=0.25, history=((0, math.nan, 0.4), (1, 0.5, None), (2, 0.45, 0.3)))
    training, validation = train_jobs.plot_points([first, TrainingEvent(4, 0.2, 0.005)])
    assert training == [(1, 0.5), (2, 0.45), (3, 0.3), (4, 0.2)]
    assert validation == [(0, 0.4), (2, 0.3), (3, 0.25)]


def test_a_failing_run_reports_its_error(session: UiSession, tiny_model_dir: Path, dataset: Path,
                                         tmp_path: Path) -> None:
    config, _ = train_handlers.training_config("embedding", "missing", _fields(dataset, tmp_path))
    assert config is not None
    jobs = train_jobs.TrainingJobs(threading.Lock())
    job = train_handlers.start_training(session, jobs, "embedding", str(tiny_model_dir), "missing", config)
    assert job.wait(60) and not job.running
    view = train_jobs.train_view(job)
    assert "no embedding &#x27;missing&#x27;" in view.status_html and "sdconcepts-train-error" in view.status_html


def test_hypernetwork_training_holds_the_model_for_the_whole_run(session: UiSession, tiny_model_dir: Path,
                                                                 dataset: Path, tmp_path: Path) -> None:
    train_handlers.create_hypernetwork(session, "toy-hn", ["48", "32", "64"], "1, 2, 1", "linear", "Normal", False, False,
                              "", False)
    config, _ = train_handlers.training_config("hypernetwork", "toy-hn",
                                      _fields(dataset, tmp_path, template="hypernetwork", learn_rate="0.001",
                                              max_steps=2, preview_every=0, save_every=0))
    assert config is not None
    jobs = train_jobs.TrainingJobs(session.generate_lock)
    job = train_handlers.start_training(session, jobs, "hypernetwork", str(tiny_model_dir), "toy-hn", config)
    deadline = time.monotonic() + 30
    while job.running and not session.generate_lock.locked() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert job.wait(60) and job.error is None, job.error
    assert not session.generate_lock.locked()
    assert load_hypernetwork(session.config.hypernetworks_dirs[0] / "toy-hn.pt").step == 2


def test_the_ui_has_the_train_tab_with_our_ids(session: UiSession) -> None:
    from sdconcepts.ui.app import build_ui

    blocks = build_ui(session)
    ids = {c.get("props", {}).get("elem_id") for c in blocks.config["components"]}
    for wanted in ("sdconcepts_train_ti_button", "sdconcepts_train_interrupt", "sdconcepts_train_plot",
                   "sdconcepts_create_ti_name", "sdconcepts_create_hn_sizes", "sdconcepts_train_err_dataset"):
        assert wanted in ids
    defaults = {c["props"].get("elem_id"): c["props"].get("value") for c in blocks.config["components"]}
    # The embedding fields start from the default preset (docs/training.md, "Defaults and presets"); the
    # hypernetwork's rate is A1111's.
    chosen = preset(None)
    assert defaults["sdconcepts_train_preset"] == chosen.name
    assert defaults["sdconcepts_train_ti_lr"] == chosen.learn_rate and defaults["sdconcepts_train_hn_lr"] == "0.00001"
    assert defaults["sdconcepts_train_batch_size"] == chosen.batch_size
    assert (defaults["sdconcepts_create_ti_vectors"], defaults["sdconcepts_create_ti_init"]) == (chosen.vectors,
                                                                                               chosen.init_text)
    assert defaults["sdconcepts_train_max_steps"] == 100000
    assert defaults["sdconcepts_train_template"] == "style_filewords"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_choosing_a_preset_fills_the_embedding_fields(name: str) -> None:
    chosen = PRESETS[name]
    assert train_handlers.preset_fields(name) == (chosen.init_text, chosen.vectors, chosen.learn_rate,
                                                  chosen.batch_size)
    with pytest.raises(UiError, match="unknown preset"):
        train_handlers.preset_fields("kohya")


def test_forms_fit_the_model(session: UiSession, tiny_model_dir: Path, tmp_path: Path) -> None:
    """The tiny model (like the toy model) has context width 48, attention widths 32/64 and a 32 px native size:
    Create hypernetwork offers those, not A1111's 768/320/640/1280, and the size sliders reach 32."""
    from sdconcepts.ui.app import build_ui

    props = {c["props"].get("elem_id"): c["props"] for c in build_ui(session).config["components"]}
    assert props["sdconcepts_create_hn_sizes"]["value"] == ["48", "32", "64"]
    assert [c[0] if isinstance(c, (list, tuple)) else c
            for c in props["sdconcepts_create_hn_sizes"]["choices"]] == ["48", "32", "64"]
    for key in ("sdconcepts_train_width", "sdconcepts_train_height", "sdconcepts_preprocess_width",
                "sdconcepts_preprocess_height"):
        assert props[key]["value"] == 32 and props[key]["minimum"] <= 32, (key, props[key])
    # What the form offers creates a hypernetwork that the model accepts and trains at its own size.
    fit = train_handlers.form_defaults(session, str(tiny_model_dir))
    path = train_handlers.create_hypernetwork(session, "fit", fit.widths_ticked, "1, 2, 1", "linear", "Normal", False, False,
                                     "", False)
    assert sorted(load_hypernetwork(path).widths) == [32, 48, 64]
    # A model whose shape cannot be read cheaply (a .ckpt) gets A1111's choices.
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "big.ckpt").write_bytes(b"not read")
    other = UiSession(UiConfig(models_dir=tmp_path / "models"))
    assert train_handlers.form_defaults(other, "big.ckpt").widths_ticked == ["768", "320", "640", "1280"]
    assert train_handlers.form_defaults(other, "big.ckpt").size == 512
    # ... and does not call them the model's own widths (1024 is SD 2.x's only; issue 26 item 15).
    assert "the model's" in fit.widths_label
    unknown = train_handlers.form_defaults(other, "big.ckpt").widths_label
    assert "the model's" not in unknown and "A1111's widths" in unknown and "1024 SD 2.x" in unknown


def test_model_shape_from_files_and_from_the_loaded_model(tiny_model_dir: Path, tiny_model: Any,
                                                          tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from sdconcepts.model_shape import read_model_shape, shape_of_loaded

    from_files = read_model_shape(tiny_model_dir)
    assert from_files is not None and from_files == shape_of_loaded(tiny_model)
    assert from_files.widths == (48, 32, 64) and from_files.size == 32 and from_files.multiple == 32
    # An A1111 single file: the widths come from the header's tensor shapes (SD 1.x: 768 context, 320/640/1280).
    blocks = "model.diffusion_model.input_blocks.{}.1.transformer_blocks.0.attn{}.to_k.weight"
    tensors = {blocks.format(i, 1): torch.zeros(c, c) for i, c in ((1, 320), (4, 640), (7, 1280))}
    tensors |= {blocks.format(i, 2): torch.zeros(c, 768) for i, c in ((1, 320), (4, 640), (7, 1280))}
    save_file(tensors, tmp_path / "sd15.safetensors")
    single = read_model_shape(tmp_path / "sd15.safetensors")
    assert single is not None and single.widths == (768, 320, 640, 1280) and single.size == 512
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    assert read_model_shape(tmp_path / "broken.safetensors") is None


# -- preprocess ---------------------------------------------------------------------------------------------------


def test_preprocess_resizes_flips_splits_and_captions(tmp_path: Path) -> None:
    from PIL import Image

    from sdconcepts.ui.train_preprocess import PreprocessSettings, caption_from_name, preprocess_images, run_preprocess

    source = tmp_path / "in"
    source.mkdir()
    square = Image.new("RGB", (40, 40), "white")
    square.paste((255, 0, 0), (0, 0, 10, 40))  # a red band on the left
    square.save(source / "red_band.png")
    Image.new("RGB", (128, 32), (0, 0, 255)).save(source / "12-wide_blue.png")  # ratio 0.25: split
    (source / "12-wide_blue.txt").write_text("a banner\n")
    (source / "notes.txt").write_text("not an image")
    assert caption_from_name(source / "12-wide_blue.png") == "wide blue"

    out = tmp_path / "out"
    settings = PreprocessSettings(width=32, height=32, flip=True, split=True, caption_from_name=True,
                                  caption_action="append")
    written = preprocess_images(source, out, settings)
    names = [p.name for p in written]
    # The wide image: 32 px high, 128 wide -> ceil((128 - 6.4) / 25.6) = 5 crops, each with a flipped copy.
    assert names[:10] == [f"00000-{i}-12-wide_blue.png" for i in range(10)]
    assert names[10:] == ["00001-0-red_band.png", "00001-1-red_band.png"]
    assert all(Image.open(p).size == (32, 32) for p in written)
    band, flipped = Image.open(out / "00001-0-red_band.png"), Image.open(out / "00001-1-red_band.png")
    assert band.getpixel((1, 16))[0] > 200 and band.getpixel((30, 16))[1] > 200
    assert flipped.getpixel((30, 16))[0] > 200 and flipped.getpixel((1, 16))[1] > 200
    assert (out / "00000-0-12-wide_blue.txt").read_text() == "wide blue a banner\n"
    assert (out / "00001-0-red_band.txt").read_text() == "red band\n"

    kept = preprocess_images(source, tmp_path / "kept", PreprocessSettings(width=32, height=32, keep_size=True,
                                                                           caption_action="copy"))
    assert [Image.open(p).size for p in kept] == [(128, 32), (40, 40)]
    assert (tmp_path / "kept" / "00000-0-12-wide_blue.txt").read_text() == "a banner\n"
    assert not (tmp_path / "kept" / "00001-0-red_band.txt").exists()

    # A .gif or .tif is read as the dataset reader reads it (they were silently left out); what is not a picture is
    # listed as skipped with its reason.
    Image.new("RGB", (20, 20), (0, 255, 0)).save(source / "green.gif")
    Image.new("RGB", (20, 20), (0, 255, 0)).save(source / "green2.tif")
    (source / "readme.md").write_text("not a picture")
    report = run_preprocess(source, tmp_path / "more", PreprocessSettings(width=32, height=32))
    assert sorted(p.name for p in report.written) == ["00000-0-12-wide_blue.png", "00001-0-green.png",
                                                      "00002-0-green2.png", "00004-0-red_band.png"]  # numbered by file, as A1111
    assert report.skipped == ["readme.md (not an image PIL can read)"]

    with pytest.raises(UiError, match="^source directory"):
        preprocess_images(tmp_path / "missing", out, settings)
    with pytest.raises(UiError, match="^destination directory"):
        preprocess_images(source, source, settings)


def test_a_full_disk_ends_a_web_run_with_one_line(tmp_path: Path) -> None:
    def run(_stop: threading.Event) -> Iterator[TrainingEvent]:
        # The run's loss CSV on /dev/full: the kernel's own ENOSPC, as a full disk gives it (a raw OSError before).
        LossLog(Path("/dev/full")).add(1, 0, 1, 0.5, 0.005)
        yield from ()

    jobs = train_jobs.TrainingJobs(threading.Lock())
    job = jobs.start("embedding", "toytri", 4, run)
    assert job.wait(30)
    assert job.error == "/dev/full: No space left on device (the disk is full); files saved before are kept"


def test_status_of_an_interrupted_run_shows_no_speed_or_time_left() -> None:
    """After Interrupt the status showed the last "0.12 it/s · ETA 25:12" as if the run went on (issue 26 item 10)."""
    job = train_jobs.TrainingJob("embedding", "toytri", 1000)
    job.started = 100.0
    for step in (1, 2, 3):
        job.events.append(TrainingEvent(step=step, loss=0.1, lr=0.005, eta_s=1500.0))
        job.times.append(100.0 + 8 * step)
    running = train_jobs.train_view(job).status_html
    assert "it/s" in running and "ETA 25:00" in running
    job.stop.set()
    interrupting = train_jobs.train_view(job).status_html
    assert "interrupting" in interrupting and "it/s" not in interrupting and "ETA" not in interrupting
    job.events.append(TrainingEvent(step=3, loss=0.1, lr=0.005, kind="interrupted", message="Training interrupted"))
    job.times.append(125.0)
    job.done = True
    ended = train_jobs.train_view(job).status_html
    assert "<b>Interrupted</b>" in ended and "step 3/1000" in ended and "in 00:25" in ended
    assert "it/s" not in ended and "ETA" not in ended


def test_creating_a_file_tells_the_host_at_once(session: UiSession, tiny_model_dir: Path) -> None:
    """Inside a host the host's lists (A1111's hypernetwork dropdowns, its embedding database) must know a file our
    tab created without a refresh (issue 26 item 17: A1111's Hypernetwork dropdown was empty after creating one)."""
    told: list[str] = []
    hosted = UiSession(dataclasses.replace(session.config, files_changed=lambda kind: told.append(kind) or None))
    train_handlers.create_embedding(hosted, str(tiny_model_dir), "told", "triangle", 1, False)
    assert told == ["embedding"]
    train_handlers.create_hypernetwork(hosted, "toldhn", "48", "1, 2, 1", "linear", "Normal", False, False, "", False)
    assert told == ["embedding", "hypernetwork"]
    with pytest.raises(UiError):
        train_handlers.create_hypernetwork(hosted, "toldhn", "48", "1, 2, 1", "linear", "Normal", False, False, "",
                                           False)
    assert told == ["embedding", "hypernetwork"]  # nothing written, nothing told
