"""Issue 12 in a real host: our Train tab, driven in chromium, trains on the host's loaded model (no second copy).

Shared by test_a1111_train_host_model.py and test_forge_train_host_model.py (one file per host keeps the harness's
launch order: A1111 tests first, then Forge). The flow:

1. the host's own txt2img (seed 42) loads its model; the process's resident memory is read then (one model);
2. in our tab (default model: the web UI's loaded model) create an embedding, train it 2 steps with a preview and a
   save at step 2, and wait for the end;
3. memory: the process grew by far less than a second SD 1.5 copy would take (fp32 here: ~4 GB);
4. the host's image with the same seed is bit-identical to the one before training (its model left as it was);
5. the host's own txt2img uses the new embedding at once (A1111: ``TI hashes`` names it; Forge: ``TI``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import host_harness as hh
import numpy as np

from sdconcepts.embedding_files import load_embedding
from sdconcepts.toyworld.concept import write_concept

HOST_MODEL_LABEL = "the web UI's loaded model"  # sdconcepts.ui.session.HOST_MODEL_LABEL
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
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        locator = page.locator(selector)
        seen = locator.first.inner_text() if locator.count() else ""
        if text in seen:
            return str(seen)
        if any(bad in seen for bad in fail_on):
            raise AssertionError(f"{selector} shows {seen!r}")
        # Only our error boxes: gradio 4 (Forge) also writes progress timers ("0.1s") into pending outputs.
        refused = page.locator("[id^=sdconcepts_train_err_] .sdconcepts-field-error, "
                               "#sdconcepts_train_message .sdconcepts-field-error").all_inner_texts()
        if [t for t in refused if t.strip()]:
            raise AssertionError(f"the Train tab refused: {refused}")
        toasts = [str(t) for t in page.locator(".toast-body").all_inner_texts()]
        if toasts:
            raise AssertionError(f"gradio error: {toasts[0]}")
        page.wait_for_timeout(500)
    raise AssertionError(f"{text!r} not in {selector} after {timeout} s; it shows {seen!r}")


def _click_tab(page: Any, container: str, label: str) -> None:
    # Gradio 3 (A1111) renders tab buttons in .tab-nav; Gradio 4 (Forge) gives them role="tab".
    buttons = page.locator(f'{container} button[role="tab"], {container} .tab-nav button')
    buttons.filter(has_text=label).filter(visible=True).first.click()


def train_in_our_tab(host: hh.Host, page: Any, name: str) -> tuple[Figures, str]:
    """Steps 1-3 above; returns the memory figures and the host's picture before training (PNG bytes of seed 42)."""
    pid = host_pid(host)
    before, _ = hh.txt2img(host)  # loads the host's model
    loaded = _status(pid)["VmRSS"]

    dataset = host.dest / "sdconcepts-host-training" / "dataset"
    write_concept(dataset, count=2, seed=7, shape="circle", colour="red")

    page.goto(host.url, wait_until="domcontentloaded")
    _click_tab(page, "#tabs", "sdconcepts")
    model = page.locator("#sdconcepts_model input").first
    model.wait_for(state="visible")
    assert model.input_value() == HOST_MODEL_LABEL, model.input_value()
    _fill(page, "#sdconcepts_steps input[type=number]", "2")  # previews sample with the txt2img settings
    _click_tab(page, "#sdconcepts_tabs", "Train")
    _click_tab(page, "#sdconcepts_train_tabs", "Create embedding")
    _fill(page, "#sdconcepts_create_ti_name input", name)
    _fill(page, "#sdconcepts_create_ti_init input", "red")
    page.locator("#sdconcepts_create_ti_button").click()
    _wait_text(page, "#sdconcepts_create_ti_result", "Created", timeout=600)

    _click_tab(page, "#sdconcepts_train_tabs", "Train")
    _fill(page, "#sdconcepts_train_dataset input", str(dataset))
    for selector, value in (("#sdconcepts_train_width input[type=number]", "64"),
                            ("#sdconcepts_train_height input[type=number]", "64"),
                            ("#sdconcepts_train_max_steps input", "2"),
                            ("#sdconcepts_train_preview_every input", "2"),
                            ("#sdconcepts_train_save_every input", "2")):
        _fill(page, selector, value)
    page.locator("#sdconcepts_train_read_txt2img input").check()
    started = time.monotonic()
    page.locator("#sdconcepts_train_ti_button").click()
    # The status shows the last job until this one starts: wait for this run's own end.
    end = _wait_text(page, "#sdconcepts_train_status", f"Embedding saved to {host.dest}", timeout=TRAIN_TIMEOUT_S,
                     fail_on=("Stopped", "Error", "error"))
    seconds = time.monotonic() - started
    assert "saved to" in end and f"{name}.pt" in end, end
    page.locator("#sdconcepts_train_previews img").first.wait_for(state="visible")
    after = _status(pid)
    figures = Figures(loaded, after["VmRSS"], after["VmHWM"], seconds)
    return figures, before.tobytes()


def check_after_training(host: hh.Host, name: str, figures: Figures, before: bytes, infotext_field: str) -> str:
    """Steps 3-5; returns the infotext of the host's image with the embedding."""
    growth = figures.rss_after - figures.rss_loaded
    assert growth < ALLOWED_GROWTH_BYTES, (
        f"the host process grew by {growth / 2**30:.2f} GB while our tab trained (a second model copy is "
        f"{SECOND_COPY_BYTES / 2**30:.0f} GB): {figures}"
    )
    image, _ = hh.txt2img(host)
    assert image.tobytes() == before, "the host's picture changed after training on its model"

    trained = load_embedding(host.dest / "embeddings" / f"{name}.pt")
    picture, info = hh.txt2img(host, prompt=f"a {name} circle on a teal background")
    # Trained on the host's checkpoint: the file names its hash, as the host's own infotext does.
    assert trained.step == 2 and f"Model hash: {trained.sd_checkpoint}," in info, (trained.sd_checkpoint, info)
    hh.assert_finite_picture(picture)
    assert not np.array_equal(picture, image)
    assert infotext_field in info and name in info.split(infotext_field, 1)[1].split(",")[0], info
    report = (f"[{host.kind}] RSS after model load {figures.rss_loaded / 2**30:.2f} GB, after training "
              f"{figures.rss_after / 2**30:.2f} GB (peak {figures.peak_after / 2**30:.2f} GB); training 2 steps + "
              f"preview + saves {figures.train_seconds:.0f} s")
    print(report)
    out = os.environ.get("SDCONCEPTS_HOST_FIGURES")
    if out:
        with open(out, "a", encoding="utf-8") as sink:
            sink.write(report + "\n")
    return info


def train_hypernetwork_in_our_tab(host: hh.Host, page: Any, name: str) -> float:
    """Create a hypernetwork (default modules 768/320/640/1280) and train it 2 steps on the host's model."""
    dataset = host.dest / "sdconcepts-host-training" / "dataset"
    write_concept(dataset, count=2, seed=7, shape="circle", colour="red")
    page.goto(host.url, wait_until="domcontentloaded")
    _click_tab(page, "#tabs", "sdconcepts")
    model = page.locator("#sdconcepts_model input").first
    model.wait_for(state="visible")
    assert model.input_value() == HOST_MODEL_LABEL, model.input_value()
    _fill(page, "#sdconcepts_steps input[type=number]", "2")
    _click_tab(page, "#sdconcepts_tabs", "Train")
    _click_tab(page, "#sdconcepts_train_tabs", "Create hypernetwork")
    _fill(page, "#sdconcepts_create_hn_name input", name)
    page.locator("#sdconcepts_create_hn_button").click()
    _wait_text(page, "#sdconcepts_create_hn_result", "Created", timeout=300)
    _click_tab(page, "#sdconcepts_train_tabs", "Train")
    _fill(page, "#sdconcepts_train_dataset input", str(dataset))
    for selector, value in (("#sdconcepts_train_width input[type=number]", "64"),
                            ("#sdconcepts_train_height input[type=number]", "64"),
                            ("#sdconcepts_train_max_steps input", "2"),
                            ("#sdconcepts_train_preview_every input", "2"),
                            ("#sdconcepts_train_save_every input", "2")):
        _fill(page, selector, value)
    started = time.monotonic()
    page.locator("#sdconcepts_train_hn_button").click()
    # The status shows the last job (an embedding) until this one starts: wait for this run's own end.
    end = _wait_text(page, "#sdconcepts_train_status", "Hypernetwork saved to", timeout=TRAIN_TIMEOUT_S,
                     fail_on=("Stopped", "Error", "error"))
    assert f"{name}.pt" in end, end
    return time.monotonic() - started
