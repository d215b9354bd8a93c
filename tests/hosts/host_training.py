"""Issue 12 in a real host: our Train tab, driven in chromium, trains on the host's loaded model (no second copy).

Shared by test_a1111_train_host_model.py and test_forge_train_host_model.py (one file per host keeps the harness's
launch order: A1111 tests first, then Forge). The flow:

1. the host's own txt2img (seed 42) loads its model; the process's resident memory is read then (one model);
2. in our tab (default model: the web UI's loaded model) create an embedding, train it 2 steps with a preview and a
   save at step 2, and wait for the end;
3. memory: the process grew by far less than a second SD 1.5 copy would take (fp32 here: ~4 GB);
4. the host's image with the same seed is bit-identical to the one before training (its model left as it was);
5. the host's own txt2img uses the new embedding at once (A1111: ``TI hashes`` names it; Forge: ``TI``).

Hypernetworks go through the same create-train-wait path (``train_and_wait``). ``interrupt_and_resume``: a long run
interrupted from the tab stops after the step in flight, leaves a whole file with its matching ``.optim`` and the
host's picture unchanged; training the file again continues from the stopped step (file step, AdamW step count, loss
log rows 1..N without repeats, settings ``initial_step``, the tab's Saved files).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import host_harness as hh
import numpy as np
from page_waits import wait_text
from PIL import Image

from sdconcepts.embeddings.files import load_embedding
from sdconcepts.toyworld.concept import write_concept

HOST_MODEL_LABEL = "the web UI's loaded model"  # sdconcepts.ui.ui_session.HOST_MODEL_LABEL
KINDS = {"embedding": "ti", "hypernetwork": "hn"}  # the Train tab's element ids per kind
TRAIN_TIMEOUT_S = 1500
# An SD 1.5 copy in fp32 is ~4.1 GB (UNet 3.4, text encoder 0.5, VAE 0.3); our views must add none of that.
SECOND_COPY_BYTES = 4 * 2**30
ALLOWED_GROWTH_BYTES = 1536 * 2**20


@dataclass
class Figures:
    rss_loaded: int
    rss_after: int
    peak_after: int
    train_seconds: float


def _status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def host_pid(host: hh.Host) -> int:
    return int((host.dest / "host.pid").read_text().strip())


def _fill(page: Any, selector: str, value: str) -> None:
    field = page.locator(selector).first
    field.fill(value)
    field.press("Tab")


def _wait_text(page: Any, selector: str, text: str, timeout: float = 120, fail_on: tuple[str, ...] = ()) -> str:
    # Only our error boxes: gradio 4 (Forge) also writes progress timers ("0.1s") into pending outputs.
    return wait_text(page, selector, text, timeout, fail_on=fail_on, poll_ms=500,
                     error_boxes="[id^=sdconcepts_train_err_] .sdconcepts-field-error, "
                                 "#sdconcepts_train_message .sdconcepts-field-error")


def _click_tab(page: Any, container: str, label: str) -> None:
    # Gradio 3 (A1111) renders tab buttons in .tab-nav; Gradio 4 (Forge) gives them role="tab".
    buttons = page.locator(f'{container} button[role="tab"], {container} .tab-nav button')
    buttons.filter(has_text=label).filter(visible=True).first.click()


def open_our_tab(host: hh.Host, page: Any) -> Path:
    """Write the test dataset, set the host's txt2img sampling steps to 2 (our previews read the host's txt2img when
    asked), open our tab on the host's page (its default model: the host's); returns the dataset folder."""
    dataset = host.dest / "sdconcepts-host-training" / "dataset"
    write_concept(dataset, count=2, seed=7, shape="circle", colour="red")
    page.goto(host.url, wait_until="domcontentloaded")
    page.locator("#txt2img_prompt textarea").first.wait_for(state="visible")
    generation = page.locator('#tab_txt2img button[role="tab"], #tab_txt2img .tab-nav button')
    if generation.filter(has_text="Generation").filter(visible=True).count():  # the sliders' sub-tab (1.6+, Forge)
        _click_tab(page, "#tab_txt2img", "Generation")
    _fill(page, "#txt2img_steps input[type=number]", "2")
    _click_tab(page, "#tabs", "sdconcepts")
    model = page.locator("#sdconcepts_model input").first
    model.wait_for(state="visible")
    assert model.input_value() == HOST_MODEL_LABEL, model.input_value()
    # Our tab holds the Train tab and the embedding tools; the prompts and card pages are the host's.
    assert page.locator("#sdconcepts_prompt, #sdconcepts_generate, #sdconcepts_ti_cards").count() == 0
    _click_tab(page, "#sdconcepts_tabs", "Train")
    return dataset


def create_in_our_tab(page: Any, kind: str, name: str) -> None:
    """Create an embedding (initialised from "red") or a hypernetwork (default modules 768/320/640/1280)."""
    short = KINDS[kind]
    _click_tab(page, "#sdconcepts_train_tabs", f"Create {kind}")
    _fill(page, f"#sdconcepts_create_{short}_name input", name)
    if kind == "embedding":
        _fill(page, "#sdconcepts_create_ti_init input", "red")
    page.locator(f"#sdconcepts_create_{short}_button").click()
    result = f"#sdconcepts_create_{short}_result"
    wait_text(page, result, "Created", timeout=600, poll_ms=500, error_boxes=f"{result} .sdconcepts-field-error")


def start_in_our_tab(page: Any, kind: str, dataset: Path | None, *, max_steps: int, preview_every: int = 0,
                     save_every: int = 0, read_txt2img: bool = False) -> float:
    """Fill the Train sub-tab (64x64 images) and click Train Embedding / Train Hypernetwork for the file chosen
    (the one just created); ``dataset`` None keeps the field as it is. Returns the click's time (monotonic)."""
    _click_tab(page, "#sdconcepts_train_tabs", "Train")
    # Batch 1: these tests are about the host's model, and a step of full-size SD 1.5 on the CPU is what they pay.
    fields = [("#sdconcepts_train_batch_size input", "1"),
              ("#sdconcepts_train_width input[type=number]", "64"),
              ("#sdconcepts_train_height input[type=number]", "64"),
              ("#sdconcepts_train_max_steps input", str(max_steps)),
              ("#sdconcepts_train_preview_every input", str(preview_every)),
              ("#sdconcepts_train_save_every input", str(save_every))]
    if dataset is not None:
        fields.insert(0, ("#sdconcepts_train_dataset input", str(dataset)))
    for selector, value in fields:
        _fill(page, selector, value)
    box = page.locator("#sdconcepts_train_read_txt2img input")
    if box.is_checked() != read_txt2img:
        box.click()
    started = time.monotonic()
    page.locator(f"#sdconcepts_train_{KINDS[kind]}_button").click()
    return started


def train_and_wait(host: hh.Host, page: Any, kind: str, name: str, *, read_txt2img: bool = False) -> float:
    """Open our tab, create ``name`` and train it 2 steps with a preview and a save at step 2; wait for this run's
    end and return its seconds."""
    dataset = open_our_tab(host, page)
    create_in_our_tab(page, kind, name)
    started = start_in_our_tab(page, kind, dataset, max_steps=2, preview_every=2, save_every=2,
                               read_txt2img=read_txt2img)
    # The status shows the last job until this one starts: wait for this run's own end (its file's name).
    end = _wait_text(page, "#sdconcepts_train_status", f"{kind.capitalize()} saved to", timeout=TRAIN_TIMEOUT_S,
                     fail_on=("Stopped", "Error", "error"))
    seconds = time.monotonic() - started
    assert f"{name}.pt" in end and "finished at 2 steps" in end, end
    page.locator("#sdconcepts_train_previews img").first.wait_for(state="visible")
    if read_txt2img:
        # The preview was made with the host's txt2img settings (open_our_tab set its steps to 2); the Train tab's
        # default log folder is relative to the host's working folder.
        previews = sorted((host.dest / "textual_inversion").glob(f"*/{name}/images/{name}-2.png"))
        assert previews, f"no preview of {name} under {host.dest / 'textual_inversion'}"
        with Image.open(previews[-1]) as picture:
            info = str(picture.info.get("parameters", ""))
        assert "Steps: 2," in info, info
    return seconds


def train_in_our_tab(host: hh.Host, page: Any, name: str) -> tuple[Figures, bytes]:
    """Steps 1-3 above; returns the memory figures and the host's picture before training (PNG bytes of seed 42)."""
    pid = host_pid(host)
    before, _ = hh.txt2img(host)  # loads the host's model
    loaded = _status(pid)["VmRSS"]
    seconds = train_and_wait(host, page, "embedding", name, read_txt2img=True)
    after = _status(pid)
    figures = Figures(loaded, after["VmRSS"], after["VmHWM"], seconds)
    return figures, before.tobytes()


def check_after_training(host: hh.Host, name: str, figures: Figures, before: bytes, infotext_field: str, *,
                         step: int = 2) -> str:
    """Steps 3-5 (the file trained to ``step``); returns the infotext of the host's image with the embedding."""
    growth = figures.rss_after - figures.rss_loaded
    assert growth < ALLOWED_GROWTH_BYTES, (
        f"the host process grew by {growth / 2**30:.2f} GB while our tab trained (a second model copy is "
        f"{SECOND_COPY_BYTES / 2**30:.0f} GB): {figures}"
    )
    image, _ = hh.txt2img(host)
    assert image.tobytes() == before, "the host's picture changed after training on its model"

    trained = load_embedding(host.embeddings_dir / f"{name}.pt")
    picture, info = hh.txt2img(host, prompt=f"a {name} circle on a teal background")
    # Trained on the host's checkpoint: the file names its hash, as the host's own infotext does.
    assert trained.step == step and f"Model hash: {trained.sd_checkpoint}," in info, (trained.sd_checkpoint, info)
    hh.assert_finite_picture(picture)
    assert not np.array_equal(picture, image)
    assert infotext_field in info and name in info.split(infotext_field, 1)[1].split(",")[0], info
    report = (f"[{host.kind}] RSS after model load {figures.rss_loaded / 2**30:.2f} GB, after training "
              f"{figures.rss_after / 2**30:.2f} GB (peak {figures.peak_after / 2**30:.2f} GB); training 2 steps + "
              f"preview + saves {figures.train_seconds:.0f} s")
    report_figures(report)
    return info


def report_figures(report: str) -> None:
    """Print a line of figures (pytest -s shows it) and append it to $SDCONCEPTS_HOST_FIGURES when set."""
    print(report)
    out = os.environ.get("SDCONCEPTS_HOST_FIGURES")
    if out:
        with open(out, "a", encoding="utf-8") as sink:
            sink.write(report + "\n")


def train_hypernetwork_in_our_tab(host: hh.Host, page: Any, name: str) -> float:
    """Create a hypernetwork (default modules 768/320/640/1280) and train it 2 steps on the host's model, its
    preview made with our tab's txt2img settings ("Read parameters from txt2img")."""
    return train_and_wait(host, page, "hypernetwork", name, read_txt2img=True)


def check_hypernetwork_in_host(host: hh.Host, name: str, before: np.ndarray) -> None:
    """After training ``name`` on the host's model: the host's picture is what it was (``before``), and the host's
    own txt2img applies ``<hypernet:name:1>`` at once (no restart, no refresh) and names it in its infotext."""
    after, _ = hh.txt2img(host)
    assert after.tobytes() == before.tobytes(), "the host's picture changed after training a hypernetwork on its model"
    tagged, info = hh.txt2img(host, prompt=f"{hh.DEFAULT_TXT2IMG['prompt']} <hypernet:{name}:1>")
    hh.assert_finite_picture(tagged)
    assert "Hypernet hashes:" in info and name in info.split("Hypernet hashes:", 1)[1], info
    assert not np.array_equal(tagged, after)


# -- interrupt and resume ----------------------------------------------------------------------------------------

LONG_RUN = 100000  # max steps of the run that is interrupted: far more than it can do before the click


def _temporaries(folder: Path) -> list[str]:
    # sdconcepts.atomic_files' writers: ".sdc-<pid>-<hex>.tmp", pending sidecars ".sdc-<hash>.optim"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".sdc-"))


def _optimizer_step(path: Path) -> tuple[int, str]:
    """The AdamW step count in ``path``'s ``.optim`` sidecar, and the vectors' checksum the sidecar names."""
    import torch

    from sdconcepts.atomic_files import SIDECAR_SHA_KEY, sidecar_path
    from sdconcepts.safe_load import file_sha256, load_torch_file

    data: dict[str, Any] = load_torch_file(sidecar_path(path))  # type: ignore[assignment]
    assert data[SIDECAR_SHA_KEY] == file_sha256(path), "the .optim sidecar belongs to another version of the file"
    states = list(data["optimizer_state_dict"]["state"].values())
    assert len(states) == 1, data["optimizer_state_dict"]
    step = states[0]["step"]
    return int(step.item() if isinstance(step, torch.Tensor) else step), str(data["hash"])


def interrupt_and_resume(host: hh.Host, page: Any, name: str) -> str:
    """Our tab, on the host's model: train an embedding for LONG_RUN steps, click Interrupt once its first step
    is done, check the run stops after the step in flight and leaves a whole file with its optimizer state, and
    the host's picture unchanged; then train the same file again up to 2 steps more and check it continued from
    the stopped step (file step, optimizer step count, loss log, Saved files) instead of starting again from 0.
    Returns a one-line report of the figures."""
    before, _ = hh.txt2img(host)  # also loads the host's model when this test runs alone
    dataset = open_our_tab(host, page)
    create_in_our_tab(page, "embedding", name)
    path = host.embeddings_dir / f"{name}.pt"
    started = start_in_our_tab(page, "embedding", dataset, max_steps=LONG_RUN)

    # Wait for this run's first step (its status counts to LONG_RUN), then interrupt.
    deadline = time.monotonic() + TRAIN_TIMEOUT_S
    shown = 0
    while time.monotonic() < deadline:
        match = re.search(rf"step (\d+)/{LONG_RUN}\b", page.locator("#sdconcepts_train_status").first.inner_text())
        shown = int(match.group(1)) if match else 0
        if shown >= 1:
            break
        page.wait_for_timeout(250)
    assert shown >= 1, f"the run did not reach step 1 in {TRAIN_TIMEOUT_S} s"
    first_steps = time.monotonic() - started
    clicked = time.monotonic()
    page.locator("#sdconcepts_train_interrupt").click()
    end = _wait_text(page, "#sdconcepts_train_status", "Training interrupted at", timeout=600,
                     fail_on=("Stopped", "Error", "error", "Training finished"))
    stop_seconds = time.monotonic() - clicked
    stopped = int(re.search(r"Training interrupted at (\d+) steps", end).group(1))  # type: ignore[union-attr]
    assert "Interrupted" in end and f"{name}.pt" in end, end
    # It stops after the step in flight when the click arrived (the status may lag by one step).
    assert shown <= stopped <= shown + 2, (shown, stopped, end)

    # The last good file: whole (loads), its step the stopped one, its optimizer state beside it and matching it,
    # no temporary left in the folder.
    saved = load_embedding(path)
    assert saved.step == stopped, (saved.step, stopped)
    optimizer_step, checksum = _optimizer_step(path)
    assert optimizer_step == stopped and checksum == saved.checksum(), (optimizer_step, stopped, checksum)
    assert not _temporaries(path.parent), _temporaries(path.parent)
    after, _ = hh.txt2img(host)
    assert after.tobytes() == before.tobytes(), "the host's picture changed after an interrupted run on its model"

    # Resume: the same file, 2 steps more, a save at each.
    target = stopped + 2
    resumed = start_in_our_tab(page, "embedding", None, max_steps=target, save_every=1)
    end = _wait_text(page, "#sdconcepts_train_status", f"Training finished at {target} steps", timeout=TRAIN_TIMEOUT_S,
                     fail_on=("Stopped", "Error", "error", "already trained"))
    resume_seconds = time.monotonic() - resumed
    saves = page.locator("#sdconcepts_train_saves textarea").first.input_value()
    # This run saved at its own steps only: stopped + 1 and stopped + 2 (a run from 0 would list step 1 onwards).
    assert re.findall(r"^step (\d+):", saves, re.M) == [str(stopped + 1), str(target)], saves
    resumed_file = load_embedding(path)
    assert resumed_file.step == target, (resumed_file.step, target)
    # The optimizer went on from its restored state (a fresh one would count 2 steps).
    assert _optimizer_step(path)[0] == target
    assert not _temporaries(path.parent), _temporaries(path.parent)
    # The loss log holds each step once, 1 .. target, in order: the second run appended after the first.
    logs = sorted(host.dest.glob(f"textual_inversion/*/{name}/textual_inversion_loss.csv"))
    assert len(logs) == 1, logs
    rows = logs[0].read_text(encoding="utf-8").splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == list(range(1, target + 1)), rows
    settings = sorted(logs[0].parent.glob("settings-*.json"))
    last = json.loads(settings[-1].read_text(encoding="utf-8"))
    assert last["initial_step"] == stopped and last["optimizer_restored"] is True, last
    return (f"[{host.kind}] interrupt: {shown} steps in {first_steps:.0f} s, stopped at step {stopped} "
            f"{stop_seconds:.1f} s after the click; resume {stopped} -> {target} in {resume_seconds:.0f} s")


def interrupt_resume_and_use(host: hh.Host, page: Any, name: str, infotext_field: str) -> str:
    """One embedding flow per host (each training run on a full-size model costs minutes of CI):
    ``interrupt_and_resume``, with the host process's memory read before and after, then ``check_after_training``
    on the resumed file (no second copy, the host's picture unchanged, its txt2img uses the file). Returns the
    report line."""
    pid = host_pid(host)
    before, _ = hh.txt2img(host)  # loads the host's model
    loaded = _status(pid)["VmRSS"]
    started = time.monotonic()
    report = interrupt_and_resume(host, page, name)
    after = _status(pid)
    figures = Figures(loaded, after["VmRSS"], after["VmHWM"], time.monotonic() - started)
    step = load_embedding(host.embeddings_dir / f"{name}.pt").step
    check_after_training(host, name, figures, before.tobytes(), infotext_field, step=step)
    return (f"{report}; RSS after model load {figures.rss_loaded / 2**30:.2f} GB, after both runs "
            f"{figures.rss_after / 2**30:.2f} GB (peak {figures.peak_after / 2**30:.2f} GB)")
