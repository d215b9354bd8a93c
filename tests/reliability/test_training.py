"""Training under attack: absurd rates, two runs on one file, kills mid-save, umasks, long names.

Real components at tiny size (the tiny SD-1.x model, toy-world images); kills are real SIGKILLs of subprocesses or,
to hit one exact rename of a save, an ``os.replace`` that raises at its N-th call (fault injection: nothing the
code under test computes is replaced).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from sdconcepts.atomic_files import atomic_path
from sdconcepts.embeddings.files import load_embedding
from sdconcepts.file_names import InvalidNameError, name_max
from sdconcepts.hypernetworks.files import load_hypernetwork
from sdconcepts.training import (
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    create_embedding_file,
    create_hypernetwork_file,
    train_embedding,
    train_hypernetwork,
)
from sdconcepts.training.lock import TrainingLock, lock_path
from sdconcepts.training.trainables import TrainingError
from sdconcepts.training.training_model import TrainingModel

pytestmark = pytest.mark.skipif(os.name != "posix", reason="kills, umasks and flock are POSIX")

ROOT = Path(__file__).resolve().parents[2]


def _new_embedding(tiny_model: Any, folder: Path, name: str = "toytri") -> Path:
    rows = TrainingModel(tiny_model).token_rows("triangle", 2)
    return create_embedding_file(folder, name, rows, vectors=2)


def _config(dataset: Path, tmp_path: Path, **fields: Any) -> EmbeddingTrainingConfig:
    base: dict[str, Any] = {"dataset": str(dataset), "template": "subject", "width": 32, "height": 32,
                            "log_directory": str(tmp_path / "log"), "save_every": 0, "preview_every": 0,
                            "max_steps": 3, "learn_rate": "0.01"}
    return EmbeddingTrainingConfig(**{**base, **fields})


def _hn_config(dataset: Path, tmp_path: Path, **fields: Any) -> HypernetworkTrainingConfig:
    base: dict[str, Any] = {"dataset": str(dataset), "template": "filewords", "width": 32, "height": 32,
                            "log_directory": str(tmp_path / "log"), "save_every": 0, "preview_every": 0,
                            "max_steps": 3, "learn_rate": "1e-3"}
    return HypernetworkTrainingConfig(**{**base, **fields})


def _run_dir(tmp_path: Path, name: str) -> Path:
    return tmp_path / "log" / time.strftime("%Y-%m-%d") / name


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sdconcepts", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


# -- 1. a NaN stop keeps weights that work --------------------------------------------------------------------------


def test_nan_stop_keeps_weights_that_still_give_finite_results(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    path = _new_embedding(tiny_model, tmp_path / "emb")
    # Two sane steps, then a rate of 1e30: step 3's vectors are finite but ~1e30, and the loss of step 4 (the first
    # computed with them) is NaN. Saving every step used to write those vectors as "the weights of step 3".
    config = _config(dataset, tmp_path, max_steps=10, save_every=1, learn_rate="0.01:2, 1e30")
    events = list(train_embedding(tiny_model, "toytri", config, embeddings_dir=tmp_path / "emb"))
    assert events[-1].kind == "nan", [e.kind for e in events]
    kept = load_embedding(path)
    assert f"keeps the weights of step {kept.step}" in events[-1].message
    assert kept.step == 2
    vectors = kept.tensor()
    assert bool(torch.isfinite(vectors).all()) and float(vectors.abs().max()) < 1e3
    # Using it: the prompt's conditioning is finite.
    model = TrainingModel(tiny_model, {"toytri": vectors.clone()})
    with torch.no_grad():
        assert bool(torch.isfinite(model.encode_text(["a photo of toytri"])).all())
    # Resuming at a sane rate trains on instead of stopping with NaN at once.
    resumed = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=4),
                                   embeddings_dir=tmp_path / "emb"))
    assert [e.kind for e in resumed] == ["step", "step", "finished"]


def test_nan_stop_keeps_a_working_hypernetwork(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    path = create_hypernetwork_file(tmp_path, "hn", widths=(48, 32, 64), seed=1)
    config = _hn_config(dataset, tmp_path, max_steps=10, save_every=1, learn_rate="1e-3:2, 1e30")
    events = list(train_hypernetwork(tiny_model, "hn", config, hypernetworks_dir=tmp_path))
    assert events[-1].kind == "nan", [e.kind for e in events]
    kept = load_hypernetwork(path)
    assert f"keeps the weights of step {kept.step}" in events[-1].message
    assert all(bool(torch.isfinite(p).all()) for p in kept.parameters())
    resumed = list(train_hypernetwork(tiny_model, "hn", _hn_config(dataset, tmp_path, max_steps=kept.step + 1),
                                      hypernetworks_dir=tmp_path))
    assert [e.kind for e in resumed] == ["step", "finished"]


# -- 2. one run per file, across processes ----------------------------------------------------------------------


_HOLD = """
import sys, time
from sdconcepts.training.lock import TrainingLock
TrainingLock(sys.argv[1], "embedding test").acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(path: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_the_same_file_is_refused_naming_the_first(tiny_model: Any, dataset: Path,
                                                                   tmp_path: Path) -> None:
    path = _new_embedding(tiny_model, tmp_path / "emb")
    holder = _holder(path)
    try:
        with pytest.raises(TrainingError, match=f"already being trained by another run \\(pid {holder.pid}, started "):
            list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path), embeddings_dir=tmp_path / "emb"))
        assert not _run_dir(tmp_path, "toytri").exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: nothing stale blocks the next run.
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=1),
                                  embeddings_dir=tmp_path / "emb"))
    assert [e.kind for e in events] == ["step", "finished"]
    assert not lock_path(path).exists()  # a run that ends removes its lock file


def test_cli_refuses_while_the_web_ui_trains_the_same_file(tiny_model_dir: Path, tiny_model: Any, dataset: Path,
                                                            tmp_path: Path) -> None:
    _new_embedding(tiny_model, tmp_path / "embeddings")
    running = train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=5),
                              embeddings_dir=tmp_path / "embeddings")
    first = next(running)  # this process is now training (the lock is held, as by the web UI's job thread)
    assert first.kind == "step"
    try:
        done = _cli("train-embedding", "toytri", "--dataset", str(dataset), "--ckpt", str(tiny_model_dir),
                    "--width", "32", "--height", "32", "--max-steps", "3", "--template", "subject", cwd=tmp_path)
        assert done.returncode != 0
        assert f"already being trained by another run (pid {os.getpid()}" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        running.close()
    csv = (_run_dir(tmp_path, "toytri") / "textual_inversion_loss.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in csv[1:]] == ["1"]  # the refused run logged nothing


def test_web_ui_job_refused_while_another_process_trains(tiny_model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    from sdconcepts.ui import train_handlers, train_jobs
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    session = UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[tmp_path / "embeddings"],
                                 hypernetworks_dirs=[tmp_path / "hypernetworks"], outputs_dir=tmp_path / "outputs",
                                 device="cpu"))
    path = train_handlers.create_embedding(session, str(tiny_model_dir), "toytri", "triangle", 1, False)
    config, errors = train_handlers.training_config("embedding", "toytri", {
        "dataset": str(dataset), "learn_rate": "0.01", "batch_size": 1, "gradient_accumulation": 1,
        "log_directory": str(tmp_path / "log"), "template": "subject", "width": 32, "height": 32,
        "keep_size": False, "max_steps": 2, "preview_every": 0, "save_every": 0, "use_alpha_weight": False,
        "shuffle_tags": False, "tag_dropout": 0.0, "latent_sampling": "once", "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1", "save_image_with_embedding": False, "preview_steps": 2, "preview_seed": 1,
    })
    assert config is not None, errors
    holder = _holder(path)
    try:
        jobs = train_jobs.TrainingJobs(session.generate_lock)
        job = train_handlers.start_training(session, jobs, "embedding", str(tiny_model_dir), "toytri", config)
        assert job.wait(120)
        assert job.error is not None and f"already being trained by another run (pid {holder.pid}" in job.error
        assert load_embedding(path).step == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


# -- 3. a kill between the renames of a save ----------------------------------------------------------------------


class _Killed(BaseException):
    """Raised instead of an os.replace: the process 'dies' there (BaseException, so no handler swallows it)."""


def _counting_replace(monkeypatch: pytest.MonkeyPatch, fail_at: int | None) -> list[int]:
    real = os.replace
    calls = [0]

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if fail_at is not None and calls[0] == fail_at:
            raise _Killed
        real(src, dst, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def _restored(tmp_path: Path, name: str) -> bool:
    settings = sorted(_run_dir(tmp_path, name).glob("settings-*.json"), key=lambda p: p.stat().st_mtime_ns)
    return bool(json.loads(settings[-1].read_text())["optimizer_restored"])


def test_a_kill_at_any_rename_of_a_save_keeps_file_and_optimizer_state_paired(
    tiny_model: Any, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    base = tmp_path / "base"
    _new_embedding(tiny_model, base)
    list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path / "b", max_steps=1), embeddings_dir=base))
    with monkeypatch.context() as patch:
        calls = _counting_replace(patch, None)
        list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path / "count", max_steps=2, save_every=1),
                             embeddings_dir=shutil.copytree(base, tmp_path / "count-emb")))
        total = calls[0]
    assert total >= 6  # settings, the copy and the file (with .optim), the plot, the final save
    for fail_at in range(1, total + 1):
        folder = shutil.copytree(base, tmp_path / f"at{fail_at}")
        logs = tmp_path / f"log{fail_at}"
        with monkeypatch.context() as patch, pytest.raises(_Killed):
            _counting_replace(patch, fail_at)
            list(train_embedding(tiny_model, "toytri", _config(dataset, logs, max_steps=2, save_every=1),
                                 embeddings_dir=folder))
        on_disk = load_embedding(folder / "toytri.pt")
        assert on_disk.step in (1, 2)
        # The next run finds the optimizer state that belongs to whichever file is there.
        list(train_embedding(tiny_model, "toytri", _config(dataset, logs, max_steps=on_disk.step + 1),
                             embeddings_dir=folder))
        assert _restored(logs, "toytri"), f"optimizer state lost after a kill at os.replace #{fail_at}"
        assert sorted(p.name for p in folder.iterdir()) == ["toytri.pt", "toytri.pt.optim"], fail_at


def test_a_kill_between_the_renames_of_a_hypernetwork_save_keeps_the_pair(
    tiny_model: Any, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdconcepts.hypernetworks.files import OptimizerState, load_optimizer_state, save_hypernetwork

    path = create_hypernetwork_file(tmp_path, "hn", widths=(48,), seed=1)
    hypernetwork = load_hypernetwork(path)
    optimizer = torch.optim.AdamW(hypernetwork.parameters(), lr=1e-3)
    for step in (1, 2):
        hypernetwork.train()
        loss = sum((m(torch.ones(2, 48)) ** 2).sum() for pair in hypernetwork.layers.values() for m in pair)
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        hypernetwork.step = step
        state = OptimizerState("AdamW", optimizer.state_dict())
        # Save 1 completes; save 2 'dies' at its third rename: the .pt is new, the pending .optim not yet moved.
        with monkeypatch.context() as patch:
            _counting_replace(patch, 3 if step == 2 else None)
            if step == 2:
                with pytest.raises(_Killed):
                    save_hypernetwork(hypernetwork, path, optimizer=state)
            else:
                save_hypernetwork(hypernetwork, path, optimizer=state)
    assert load_hypernetwork(path).step == 2
    found = load_optimizer_state(path)
    assert found is not None and int(found.state_dict["state"][0]["step"]) == 2


def test_temporaries_of_a_killed_writer_are_removed_at_the_next_start(tiny_model: Any, dataset: Path,
                                                                     tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    _new_embedding(tiny_model, folder)
    run = _run_dir(tmp_path, "toytri")
    kill_mid_write = (
        "import os, signal, sys\n"
        "from sdconcepts.atomic_files import atomic_path\n"
        "for target in sys.argv[1:]:\n"
        "    atomic_path(target).__enter__().write_bytes(b'half a file')\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    killed = subprocess.run([sys.executable, "-c", kill_mid_write, str(folder / "toytri.pt"),
                             str(run / "embeddings" / "toytri-5.pt"), str(run / "images" / "toytri-5.png")],
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL
    leftovers = [*folder.glob(".sdc-*.tmp"), *run.rglob(".sdc-*.tmp")]
    assert len(leftovers) == 3
    with atomic_path(folder / "other.pt") as live:  # a live writer's temporary (this process) is left alone
        list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=1), embeddings_dir=folder))
        assert live.exists()
        assert not any(p.exists() for p in leftovers)


# -- 4. resume after a kill does not duplicate loss rows ----------------------------------------------------------


def test_resume_after_a_kill_drops_loss_rows_past_the_saved_step(tiny_model: Any, dataset: Path,
                                                                 tmp_path: Path) -> None:
    path = _new_embedding(tiny_model, tmp_path / "emb")
    events = train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=10, save_every=2),
                             embeddings_dir=tmp_path / "emb")
    for event in events:
        if event.step == 3:
            break  # the process dies here: rows 1-3 are logged, the file holds step 2
    events.close()
    assert load_embedding(path).step == 2
    csv = _run_dir(tmp_path, "toytri") / "textual_inversion_loss.csv"
    assert [row.split(",")[0] for row in csv.read_text().splitlines()[1:]] == ["1", "2", "3"]
    list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=4), embeddings_dir=tmp_path / "emb"))
    rows = csv.read_text().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate,val_loss"
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2", "3", "4"]


# -- 5. files follow the umask ------------------------------------------------------------------------------------


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield int(request.param)
    finally:
        os.umask(old)


def test_every_file_written_follows_the_umask(umask: int, tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    from PIL import Image

    from sdconcepts.embeddings.files import save_embedding
    from sdconcepts.images import save_png

    folder = tmp_path / "emb"
    _new_embedding(tiny_model, folder)
    save_embedding(load_embedding(folder / "toytri.pt"), folder / "toysafe.safetensors")
    list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=1, save_every=1, preview_every=1,
                                                       preview_steps=2), embeddings_dir=folder))
    list(train_embedding(tiny_model, "toysafe", _config(dataset, tmp_path, max_steps=1), embeddings_dir=folder))
    create_hypernetwork_file(tmp_path / "hn", "hn", widths=(48, 32, 64), seed=1)
    list(train_hypernetwork(tiny_model, "hn", _hn_config(dataset, tmp_path, max_steps=1), hypernetworks_dir=tmp_path / "hn"))
    save_png(Image.new("RGB", (8, 8)), tmp_path / "outputs" / "00000-1.png", "a prompt")  # what generation saves
    from sdconcepts.checkpoints.files import write_checkpoint

    write_checkpoint(tmp_path / "models" / "model.safetensors", {"w": torch.zeros(2)})  # a single-file checkpoint

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    for expected in ("toytri.pt", "toytri.pt.optim", "toysafe.safetensors", "toysafe.safetensors.optim", "hn.pt",
                     "hn.pt.optim", "toytri-1.pt", "toytri-1.png", "textual_inversion_loss.csv",
                     "hypernetwork_loss.csv", "loss.png", "00000-1.png", "model.safetensors"):
        assert expected in names, expected
    wrong = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask}
    assert not wrong, f"expected {oct(0o666 & ~umask)}"


# -- 6. long names -------------------------------------------------------------------------------------------------


def test_the_longest_name_that_fits_works_and_trains(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    folder = tmp_path / "emb"
    folder.mkdir()
    limit = name_max(folder) - len(".pt.optim")
    for length in (245, limit):
        name = "n" * length
        path = _new_embedding(tiny_model, folder, name)
        assert path.name == f"{name}.pt"
    # Training writes the .optim beside it and copies with a step number into the log folder.
    events = list(train_embedding(tiny_model, "n" * limit, _config(dataset, tmp_path, max_steps=1, save_every=1,
                                                                   preview_every=1, preview_steps=2),
                                  embeddings_dir=folder))
    assert [e.kind for e in events] == ["step", "finished"]
    assert (folder / f"{'n' * limit}.pt.optim").is_file()
    with pytest.raises(InvalidNameError, match=f"^name too long: {limit + 1} bytes, at most {limit} bytes in "):
        _new_embedding(tiny_model, folder, "n" * (limit + 1))
    with pytest.raises(InvalidNameError, match="name too long"):
        create_hypernetwork_file(folder, "é" * (limit // 2 + 1), widths=(48,))  # bytes, not characters


@pytest.mark.parametrize("command", ["create-embedding", "create-hypernetwork"])
def test_cli_too_long_name_is_one_line(command: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    extra = ("--ckpt", str(tiny_model_dir)) if command == "create-embedding" else ("--sizes", "48")
    done = _cli(command, "x" * 300, *extra, cwd=tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "name too long: 300 bytes, at most" in lines[0], done.stderr
    made = _cli(command, "y" * 245, *extra, cwd=tmp_path)
    assert made.returncode == 0, made.stderr


def test_web_ui_too_long_name_is_a_field_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sdconcepts.ui import train_handlers
    from sdconcepts.ui.ui_session import UiConfig, UiError, UiSession

    session = UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[tmp_path / "embeddings"],
                                 hypernetworks_dirs=[tmp_path / "hypernetworks"], outputs_dir=tmp_path / "outputs",
                                 device="cpu"))
    with pytest.raises(UiError, match="^name: name too long: 300 bytes, at most"):
        train_handlers.create_embedding(session, str(tiny_model_dir), "x" * 300, "*", 1, False)
    with pytest.raises(UiError, match="^name: name too long: 300 bytes, at most"):
        train_handlers.create_hypernetwork(session, "x" * 300, ["48"], "1, 2, 1", "relu", "Normal", False, False, "", False)
    assert train_handlers.create_embedding(session, str(tiny_model_dir), "y" * 245, "*", 1, False).is_file()


def test_lock_is_per_file(tmp_path: Path) -> None:
    with TrainingLock(tmp_path / "a.pt", "a"), TrainingLock(tmp_path / "b.pt", "b"):
        with pytest.raises(ValueError, match="already being trained"):
            TrainingLock(tmp_path / "a.pt", "a again").acquire()
