"""Training runs on the tiny real model: what changes, what is saved, resume, interrupt, NaN, previews, the CLI.

The tiny SD-1.x model (32 px, factor-4 VAE, text width 48) is real diffusers/transformers code with random weights;
the datasets are toy-world images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdconcepts.embeddings.files import load_embedding
from sdconcepts.hypernetworks.attach import attention_layers
from sdconcepts.hypernetworks.files import load_hypernetwork
from sdconcepts.safe_load import load_torch_file
from sdconcepts.training import (
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    create_embedding_file,
    create_hypernetwork_file,
    train_embedding,
    train_hypernetwork,
)
from sdconcepts.training.training_model import TrainingModel


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def _new_embedding(tiny_model: Any, folder: Path, name: str = "toytri", vectors: int = 2) -> Path:
    rows = TrainingModel(tiny_model).token_rows("triangle", vectors)
    return create_embedding_file(folder, name, rows, vectors=vectors)


def _config(dataset: Path, tmp_path: Path, **fields: Any) -> EmbeddingTrainingConfig:
    base: dict[str, Any] = {"dataset": str(dataset), "template": "subject", "width": 32, "height": 32,
                            "log_directory": str(tmp_path / "log"), "save_every": 0, "preview_every": 0,
                            "max_steps": 3, "learn_rate": "0.01"}
    return EmbeddingTrainingConfig(**{**base, **fields})


def test_embedding_training_moves_only_the_vectors_and_saves(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    path = _new_embedding(tiny_model, tmp_path / "emb")
    start = load_embedding(path).tensor()
    frozen = {name: _state(getattr(tiny_model, name)) for name in ("unet", "vae", "text_encoder")}
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=4, save_every=2,
                                                                 batch_size=2, latent_sampling="random"), embeddings_dir=tmp_path / "emb"))
    assert [(e.kind, e.step) for e in events] == [("step", 1), ("step", 2), ("step", 3), ("step", 4), ("finished", 4)]
    assert [e.saved is not None for e in events[:4]] == [False, True, False, True]
    assert all(len(e.texts) == 2 and all("toytri" in t for t in e.texts) for e in events[:4])
    assert events[-1].message.startswith("Training finished at 4 steps")
    trained = load_embedding(path)
    assert trained.step == 4 and trained.name == "toytri"
    assert (trained.tensor() - start).abs().min() > 0  # every component of both vectors moved
    for name, before in frozen.items():
        assert _unchanged(before, getattr(tiny_model, name)), name
    run = tmp_path / "log" / time.strftime("%Y-%m-%d") / "toytri"
    # The validation loss is checked at the start (step 0) and every 64 steps: after 4 steps the best is step 0.
    assert sorted(p.name for p in (run / "embeddings").glob("*.pt")) == ["toytri-2.pt", "toytri-4.pt", "toytri-best.pt"]
    assert load_embedding(run / "embeddings" / "toytri-2.pt").step == 2
    assert load_embedding(run / "embeddings" / "toytri-best.pt").step == 0
    optim = load_torch_file(Path(f"{path}.optim"))
    assert isinstance(optim, dict) and optim["hash"] == trained.checksum()
    csv = (run / "textual_inversion_loss.csv").read_text().splitlines()
    assert csv[0] == "step,epoch,epoch_step,loss,learn_rate,val_loss" and len(csv) == 5
    assert all(row.endswith(",") for row in csv[1:])  # no check after the start: the val_loss column is empty
    assert (run / "loss.png").is_file()
    settings = json.loads(next(run.glob("settings-*.json")).read_text())
    assert settings["num_of_dataset_images"] == 4 and settings["learn_rate"] == "0.01"


def test_resume_with_optimizer_state_equals_one_run(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    one, split, fresh = tmp_path / "one", tmp_path / "split", tmp_path / "fresh"
    for folder in (one, split, fresh):
        _new_embedding(tiny_model, folder)
    list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=2), embeddings_dir=one))
    list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=1), embeddings_dir=split))
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=2), embeddings_dir=split))
    assert [e.step for e in events] == [2, 2]  # max steps is the total: the rerun resumed at step 1
    reference = load_embedding(one / "toytri.pt").tensor()
    # Equal up to the last bits: multi-threaded CPU backward passes are not bit-reproducible even between two
    # uninterrupted runs (measured: about 7e-8).
    assert torch.allclose(reference, load_embedding(split / "toytri.pt").tensor(), rtol=0, atol=1e-6)
    # Without the optimizer state the curve does not continue the same way.
    list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=1), embeddings_dir=fresh))
    Path(f"{fresh / 'toytri.pt'}.optim").unlink()
    list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=2), embeddings_dir=fresh))
    assert float((reference - load_embedding(fresh / "toytri.pt").tensor()).abs().max()) > 1e-4
    done = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=2), embeddings_dir=one))
    assert [e.kind for e in done] == ["finished"] and "already trained to step 2" in done[0].message


def test_interrupt_saves_a_final_checkpoint(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    path = _new_embedding(tiny_model, tmp_path)
    stop = threading.Event()
    kinds = []
    for event in train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=100), embeddings_dir=tmp_path,
                                 stop=stop):
        kinds.append(event.kind)
        if event.step == 2:
            stop.set()
    assert kinds == ["step", "step", "interrupted"]
    assert load_embedding(path).step == 2


def test_interrupt_before_the_first_step_says_nothing_was_saved(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    # It used to report "Embedding saved to ..." although nothing was trained or written (issue 26 item 14).
    path = _new_embedding(tiny_model, tmp_path)
    before = os.stat(path).st_ino
    stop = threading.Event()
    stop.set()
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=100),
                                  embeddings_dir=tmp_path, stop=stop))
    assert [(e.kind, e.step, e.saved) for e in events] == [("interrupted", 0, None)]
    assert "saved" not in events[0].message and "unchanged" in events[0].message
    assert os.stat(path).st_ino == before and load_embedding(path).step == 0


@pytest.mark.parametrize("interrupt", [False, True])
def test_end_of_run_does_not_save_again_what_the_last_step_saved(tiny_model: Any, dataset: Path, tmp_path: Path,
                                                                 interrupt: bool) -> None:
    # The last step's save (save_every reached it) already wrote these weights and their optimizer state; the end of
    # the run used to write them again (a second host reload, the save listed twice in the Train tab).
    path = _new_embedding(tiny_model, tmp_path)
    stop = threading.Event()
    written: dict[int, int] = {}
    events = []
    for event in train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=100 if interrupt else 2,
                                                                 save_every=1), embeddings_dir=tmp_path, stop=stop):
        events.append(event)
        if event.kind == "step":
            written[event.step] = os.stat(path).st_ino  # every save replaces the file (a new inode)
        if event.step == 2:
            stop.set()
    assert [(e.kind, e.step) for e in events] == [("step", 1), ("step", 2),
                                                  ("interrupted" if interrupt else "finished", 2)]
    assert [e.saved is not None for e in events] == [True, True, False]
    assert os.stat(path).st_ino == written[2], "the end of the run rewrote the file its last step had saved"
    assert f"at 2 steps. Embedding saved to {path}" in events[-1].message
    assert load_embedding(path).step == 2
    assert load_torch_file(Path(f"{path}.optim"))["hash"] == load_embedding(path).checksum()


def test_nan_loss_stops_and_keeps_the_last_good_file(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    path = _new_embedding(tiny_model, tmp_path)
    start = load_embedding(path).tensor()
    # An absurd rate throws the vectors to ~1e30 after one step; the text encoder then yields NaN. Those weights
    # are finite but give a NaN loss, so step 1 is not saved (it used to be, leaving a file that NaNs at once).
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=10, save_every=1,
                                                                 learn_rate="1e30"), embeddings_dir=tmp_path))
    assert [e.kind for e in events] == ["step", "nan"]
    assert events[0].saved is None
    assert "at step 2" in events[-1].message and "keeps the weights of step 0" in events[-1].message
    kept = load_embedding(path)
    assert kept.step == 0 and torch.equal(kept.tensor(), start)


def test_previews_come_from_the_live_weights(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams

    _new_embedding(tiny_model, tmp_path / "emb")
    config = _config(dataset, tmp_path, max_steps=2, save_every=2, preview_every=2, preview_seed=5, preview_steps=3,
                     preview_prompt="a toytri")
    events = list(train_embedding(tiny_model, "toytri", config, embeddings_dir=tmp_path / "emb"))
    preview = events[1].preview
    assert preview is not None and preview.endswith("toytri-2.png")
    copy = load_embedding(Path(preview).parent.parent / "embeddings" / "toytri-2.pt")
    params = GenerationParams(prompt="a toytri", steps=3, seed=5, width=32, height=32)
    expected = txt2img(tiny_model, params, embeddings={"toytri": copy.tensor()}).images[0]
    stale = txt2img(tiny_model, params, embeddings={"toytri": load_embedding(tmp_path / "emb" / "toytri.pt").tensor() * 0}).images[0]
    from PIL import Image

    with Image.open(preview) as image:
        got = np.asarray(image.convert("RGB"))
    assert np.array_equal(got, np.asarray(expected)) and not np.array_equal(got, np.asarray(stale))
    carried = load_embedding(Path(preview).parent.parent / "image_embeddings" / "toytri-2.png")
    assert torch.equal(carried.tensor(), copy.tensor())


def test_hypernetwork_training_moves_only_the_hypernetwork(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    path = create_hypernetwork_file(tmp_path, "bluish", widths=(48, 32, 64), seed=1)
    before = _state(load_hypernetwork(path))
    unet = _state(tiny_model.unet)
    config = HypernetworkTrainingConfig(dataset=str(dataset), template="filewords", width=32, height=32, max_steps=3,
                                        save_every=3, preview_every=0, learn_rate="1e-3",
                                        log_directory=str(tmp_path / "log"))
    events = list(train_hypernetwork(tiny_model, "bluish", config, hypernetworks_dir=tmp_path))
    assert [e.kind for e in events] == ["step"] * 3 + ["finished"]
    trained = load_hypernetwork(path)
    assert trained.step == 3
    moved = {k: not torch.equal(v, trained.state_dict()[k]) for k, v in before.items()}
    assert all(moved.values()), [k for k, m in moved.items() if not m]
    assert _unchanged(unet, tiny_model.unet)
    assert all(not layer.to_k._forward_pre_hooks for layer in attention_layers(tiny_model.unet))  # detached
    resumed = list(train_hypernetwork(tiny_model, "bluish", HypernetworkTrainingConfig(**{**config.__dict__, "max_steps": 4}),
                                      hypernetworks_dir=tmp_path))
    assert [e.step for e in resumed] == [4, 4]
    run = tmp_path / "log" / time.strftime("%Y-%m-%d") / "bluish"
    settings = [json.loads(p.read_text()) for p in sorted(run.glob("settings-*.json"))]
    assert any(s["optimizer_restored"] for s in settings) and (run / "hypernetwork_loss.csv").is_file()


# -- the command line ------------------------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdconcepts", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_cli_create_train_and_resume(tiny_model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    ckpt = ("--ckpt", str(tiny_model_dir))
    made = run_cli("create-embedding", "toy tri", "--init-text", "yellow triangle", "--vectors", "3", *ckpt, cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    created = load_embedding(tmp_path / "embeddings" / "toy tri.pt")
    assert created.step == 0 and created.vector_count == 3
    again = run_cli("create-embedding", "toy tri", *ckpt, cwd=tmp_path)
    assert again.returncode == 2 and "already exists" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    evil = run_cli("create-embedding", "../evil", *ckpt, cwd=tmp_path)
    assert evil.returncode == 2 and "path separator" in evil.stderr and not (tmp_path / "evil.pt").exists()
    bad = run_cli("train-embedding", "toy tri", "--dataset", str(dataset), "--template", "hypernetwork", *ckpt, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("python -m sdconcepts: error: template:")  # before any loading
    assert "lack [name]" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    train = ("train-embedding", "toy tri", "--dataset", str(dataset), "--template", "subject_filewords",
             "--learn-rate", "0.005:1, 0.002", "--save-every", "0", "--preview-every", "0", *ckpt)
    first = run_cli(*train, "--max-steps", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "Training finished at 2 steps" in first.stdout and "loss:" in first.stderr  # the progress bar
    second = run_cli(*train, "--max-steps", "3", "--validate-every", "1", cwd=tmp_path)
    assert "Training finished at 3 steps" in second.stdout, second.stderr
    assert "val=" in second.stderr and "Best step " in second.stdout and "toy tri-best.pt" in second.stdout
    assert load_embedding(tmp_path / "embeddings" / "toy tri.pt").step == 3
    hn = run_cli("create-hypernetwork", "style1", "--sizes", "48,32,64", "--layer-structure", "1, 1.5, 1", cwd=tmp_path)
    assert hn.returncode == 0, hn.stderr
    assert load_hypernetwork(tmp_path / "models" / "hypernetworks" / "style1.pt").widths == (48, 32, 64)


def test_killed_run_leaves_no_torn_file(tiny_model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    made = run_cli("create-embedding", "kill", "--vectors", "2", "--ckpt", str(tiny_model_dir), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdconcepts", "train-embedding", "kill", "--dataset", str(dataset), "--template",
         "subject", "--save-every", "1", "--preview-every", "0", "--max-steps", "100000", "--ckpt", str(tiny_model_dir)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    target = tmp_path / "embeddings" / "kill.pt"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if (load_embedding(target).step or 0) >= 3:
                    break
            except ValueError:
                pytest.fail("a reader saw a torn embedding file")
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach step 3")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    visible = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix in (".pt", ".optim")]
    assert len(visible) >= 4
    for path in visible:
        data = load_torch_file(path)  # every file under its final name is whole
        assert isinstance(data, dict)
    assert (load_embedding(target).step or 0) >= 3


@pytest.mark.slow
def test_two_process_data_parallel_run_on_cpu(tiny_model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` (what ``accelerate launch`` does too): gloo on the CPU, rank 0 writes."""
    import socket

    made = run_cli("create-embedding", "ddp", "--vectors", "2", "--ckpt", str(tiny_model_dir), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "sdconcepts", "train-embedding", "ddp", "--dataset", str(dataset),
         "--template", "subject", "--max-steps", "3", "--save-every", "0", "--preview-every", "0",
         "--ckpt", str(tiny_model_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Training finished at 3 steps") == 1  # only rank 0 reports
    assert load_embedding(tmp_path / "embeddings" / "ddp.pt").step == 3
    # The CLI's default log folder: outputs/textual_inversion (issue 26 item 8).
    csv = next((tmp_path / "outputs" / "textual_inversion").rglob("textual_inversion_loss.csv")).read_text().splitlines()
    assert len(csv) == 4  # header and 3 steps, written once


def test_latent_caching_reports_progress_and_stops_at_an_interrupt(
    tiny_model: Any, dataset: Path, tmp_path: Path
) -> None:
    path = _new_embedding(tiny_model, tmp_path / "emb")
    before = path.read_bytes()
    images = len([p for p in dataset.iterdir() if p.suffix == ".png"])
    assert images >= 2
    stop = threading.Event()
    seen = []
    # Caching 10,000 pictures said nothing for a minute, and Interrupt waited for all of them.
    for event in train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=3),
                                 embeddings_dir=path.parent, stop=stop, preparing=True):
        seen.append(event)
        if event.kind == "preparing":
            stop.set()  # the user interrupts as caching starts: it stops before the second picture
    assert [e.kind for e in seen] == ["preparing", "interrupted"]
    assert seen[0].message == f"caching latents: 0 of {images} images"  # said at once, then at most every second
    assert seen[1].message == (f"Training interrupted while caching latents (1 of {images} images); nothing was "
                               f"trained: {path} is unchanged (step 0).")
    assert path.read_bytes() == before
    # Without ``preparing`` the stream is steps and an end, as before.
    kinds = [e.kind for e in train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=2),
                                             embeddings_dir=path.parent)]
    assert kinds == ["step", "step", "finished"]
