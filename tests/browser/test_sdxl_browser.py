"""SDXL models in the standalone web UI, in a real browser (Playwright driving Debian's chromium).

A tiny random SDXL is made from config when the test starts (a few seconds) and put in the checkpoints folder the
app lists (``--models-dir``) twice: as an A1111/Forge single file (``xl.safetensors``, SGM key layout) and as a
diffusers folder (``xl-folder``), next to a tiny SD 1.x folder (``sd1-folder``). The test checks that

* the model dropdown offers all three, and txt2img generates with each SDXL one once chosen;
* the Textual Inversion cards follow the chosen model: on SDXL the clip_l + clip_g embedding is a card and the
  SD 1.x files are listed as skipped with the reason (before the single file was ever loaded, too); on the SD 1.x
  model the reverse; clicking a card inserts its word, and the infotext names it (``TI hashes``);
* the Train tab on the SDXL single file creates an SDXL embedding (both halves, clip_l 32 + clip_g 48 wide here) and
  a hypernetwork with that model's widths (context 80, attention 64 and 96), trains each for a few steps with the
  loss shown and the file written, and the new embedding appears among the cards.

Standalone only: inside A1111/Forge the dropdown starts on the host's own loaded model, and loading SDXL there goes
through the host's model (tools/host_tests.sh covers that against the real hosts); tests/browser/hosted_app.py serves
no checkpoints folder and no host model, so a hosted run here would repeat the standalone one. ``tools/host_stacks.sh``
runs this file under the A1111 (gradio 3.41) and Forge (gradio 4.40) stacks through ``SDCONCEPTS_APP_PYTHON``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import browser_kit as kit
import pytest
import torch
from browser_kit import choose, fill, open_sub_tab, screenshot
from page_waits import wait_text

from sdconcepts import Embedding, save_embedding
from sdconcepts.toyworld.concept import write_concept

MODEL = "#sdconcepts_model"
PROMPT = "#sdconcepts_prompt textarea"
# The tiny SDXL's widths: CLIP-L 32 + OpenCLIP-G 48 = context 80; attention blocks 64 and 96 channels wide.
XL_WIDTHS = ["80", "64", "96"]


def _write_models(models: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.backends.tiny import build_tiny_sdxl, save_tiny_sd1

    parts: dict[str, Any] = build_tiny_sdxl(seed=0)
    save_single_file({k: parts[k] for k in ("unet", "vae", "text_encoder", "text_encoder_2")},
                     models / "xl.safetensors")
    StableDiffusionXLPipeline(**parts).save_pretrained(models / "xl-folder", safe_serialization=True)
    save_tiny_sd1(models / "sd1-folder")


def _write_embeddings(embeddings: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    save_embedding(Embedding("xlstyle", {"clip_l": torch.randn(2, 32, generator=generator) * 0.02,
                                         "clip_g": torch.randn(2, 48, generator=generator) * 0.02}),
                   embeddings / "xlstyle.safetensors")
    save_embedding(Embedding("sd1style", torch.randn(1, 48, generator=generator) * 0.02), embeddings / "sd1style.pt")
    # As wide as the SDXL pair but one tensor: an SD 1.x file, skipped on SDXL for its kind.
    save_embedding(Embedding("flatwide", torch.randn(1, 80, generator=generator) * 0.02),
                   embeddings / "flatwide.safetensors")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("browser-sdxl")
    start = time.monotonic()
    models = tmp / "models"
    models.mkdir()
    _write_models(models)
    _write_embeddings(tmp / "embeddings")
    (tmp / "hypernetworks").mkdir()
    write_concept(tmp / "dataset", count=3, seed=3, shape="triangle", colour="yellow")
    print(f"\nwrote the tiny SDXL (single file and folder), the SD 1.x model and the files in "
          f"{time.monotonic() - start:.1f} s")
    port = kit.free_port()
    command = kit.app_command("standalone", port, "-", tmp / "embeddings", tmp / "hypernetworks", tmp / "outputs",
                             "--no-examples", "--models-dir", str(models))
    with kit.serve_app(command, port=port, cwd=tmp, log=kit.OUTPUT / "sdxl-server.log") as url:
        yield url, tmp


def _open(page, url: str) -> None:  # type: ignore[no-untyped-def]
    page.set_default_timeout(kit.TIMEOUT_MS)
    kit.calm_animation_frames(page)
    page.goto(url)
    page.wait_for_selector(PROMPT, state="visible")
    page.wait_for_function("() => window.sdconcepts && window.sdconcepts.installed")


def _model_options(page) -> list[str]:  # type: ignore[no-untyped-def]
    """The labels the model dropdown offers (its option list, opened and closed again)."""
    field = page.locator(f"{MODEL} input").first
    field.click()
    # gradio 3.41 and 4.x render the list in the component (ul.options); 6.x in a listbox elsewhere in the page.
    options = page.locator('#sdconcepts_model ul.options li, [role="listbox"] li[role="option"]').filter(visible=True)
    options.first.wait_for(state="visible")
    # Each option also holds a check mark (the selected one shows it).
    labels = [text.replace("\u2713", "").strip() for text in options.all_inner_texts()]
    field.press("Escape")
    page.locator(PROMPT).click()  # leave the dropdown with its value unchanged
    return labels


def _card_names(page) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(str(n) for n in page.locator("#sdconcepts_ti_cards .sdconcepts-card").evaluate_all(
        "cards => cards.map(c => c.dataset.name)"))


def _wait_cards(page, names: list[str], timeout: float = 240) -> str:  # type: ignore[no-untyped-def]
    """Until the Textual Inversion tab shows exactly ``names`` as cards; returns the skipped list's text."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        seen = _card_names(page)
        if seen == sorted(names):
            skipped = page.locator("#sdconcepts_ti_skipped .sdconcepts-skipped")
            return str(skipped.first.inner_text()) if skipped.count() else ""
        page.wait_for_timeout(200)
    raise AssertionError(f"cards {seen}, expected {sorted(names)}")


def _generate(page, label: str) -> str:  # type: ignore[no-untyped-def]
    """Generate on the chosen model; the infotext once it is the new image's."""
    old = kit.value(page, "#sdconcepts_infotext textarea")
    page.locator("#sdconcepts_generate").click()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        info = kit.value(page, "#sdconcepts_infotext textarea")
        if info and info != old and page.locator("#sdconcepts_gallery img").count():
            return info
        errors = kit.errors(page)
        if errors:
            raise AssertionError(f"generation on {label} failed: {errors[0]}")
        page.wait_for_timeout(250)
    raise AssertionError(f"no image from {label} after 180 s")


def test_dropdown_lists_sdxl_cards_follow_the_model_and_txt2img_generates(app: tuple[str, Path]) -> None:
    url, _tmp = app
    with kit.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(kit.CHROMIUM), args=kit.WEBGL_CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            _open(page, url)
            options = _model_options(page)
            assert {"xl.safetensors", "xl-folder", "sd1-folder"} <= set(options), options

            # Small and quick: 2 steps at 64 px (a multiple both tiny models accept).
            fill(page, "#sdconcepts_steps input[type=number]", "2")
            fill(page, "#sdconcepts_width input[type=number]", "64")
            fill(page, "#sdconcepts_height input[type=number]", "64")
            fill(page, "#sdconcepts_seed input", "7")

            # The single file, never loaded yet: its header says SDXL, so the cards follow before any generation.
            choose(page, MODEL, "xl.safetensors")
            kit.open_tab(page, "Textual Inversion")
            skipped = _wait_cards(page, ["xlstyle"])
            assert "sd1style.pt" in skipped and "width 48 does not fit the model" in skipped, skipped
            assert "flatwide.safetensors" in skipped and "does not fit an SDXL model" in skipped, skipped
            page.locator(PROMPT).fill("a red circle")
            page.locator(PROMPT).press("End")
            page.locator('#sdconcepts_ti_cards .sdconcepts-card[data-name="xlstyle"]').click()
            assert kit.value(page, PROMPT) == "a red circle xlstyle"
            screenshot(page, kit.OUTPUT / "sdxl-textual-inversion.png")
            kit.open_tab(page, "txt2img")
            info = _generate(page, "xl.safetensors")
            assert info.startswith("a red circle xlstyle\n") and "TI hashes" in info and "xlstyle" in info, info
            assert "Size: 64x64" in info, info
            assert page.locator("#sdconcepts_warnings .sdconcepts-warnings").count() == 0

            # The diffusers folder: chosen, loaded in place of the single file, generates with the same embedding.
            choose(page, MODEL, "xl-folder")
            kit.open_tab(page, "Textual Inversion")
            _wait_cards(page, ["xlstyle"])
            kit.open_tab(page, "txt2img")
            info = _generate(page, "xl-folder")
            assert "TI hashes" in info and "xlstyle" in info, info

            # Back on an SD 1.x model: the reverse.
            choose(page, MODEL, "sd1-folder")
            kit.open_tab(page, "Textual Inversion")
            skipped = _wait_cards(page, ["sd1style"])
            assert "xlstyle.safetensors" in skipped and "width 80 does not fit the model" in skipped, skipped
            page.locator(PROMPT).fill("a blue square")
            page.locator(PROMPT).press("End")
            page.locator('#sdconcepts_ti_cards .sdconcepts-card[data-name="sd1style"]').click()
            assert kit.value(page, PROMPT) == "a blue square sd1style"
        except Exception:
            screenshot(page, kit.OUTPUT / "sdxl-cards-failure.png")
            raise
        finally:
            browser.close()


class _Phases:
    """Prints how long each step of a test took (run with -s): the browser tests' time goes to a few slow steps."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def __call__(self, label: str) -> None:
        now = time.monotonic()
        print(f"  {label}: {now - self.last:.1f} s")
        self.last = now


def _train(page, kind: str, name: str) -> str:  # type: ignore[no-untyped-def]
    """Click Train Embedding (``kind`` embedding) or Train Hypernetwork; the status once this run is done."""
    page.locator("#sdconcepts_train_ti_button" if kind == "embedding" else "#sdconcepts_train_hn_button").click()
    status = wait_text(page, "#sdconcepts_train_status", f"Done {kind} {name}", timeout=180)
    assert "loss:" in status and "step 4/4" in status and "saved to" in status, status
    return status


def test_train_tab_creates_and_trains_an_sdxl_embedding_and_hypernetwork(app: tuple[str, Path]) -> None:
    from sdconcepts.embeddings.files import load_embedding
    from sdconcepts.hypernetworks.files import load_hypernetwork

    url, tmp = app
    phase = _Phases()
    with kit.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(kit.CHROMIUM), args=kit.WEBGL_CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            _open(page, url)
            choose(page, MODEL, "xl.safetensors")
            kit.open_tab(page, "Train")
            phase("page open, model chosen")

            # Create embedding: both halves, from the init text through each encoder's own tokenizer.
            open_sub_tab(page, "Create embedding")
            fill(page, "#sdconcepts_create_ti_name input", "xlnew")
            fill(page, "#sdconcepts_create_ti_init input", "yellow triangle")
            page.locator("#sdconcepts_create_ti_button").click()
            wait_text(page, "#sdconcepts_create_ti_result", "Created")
            created = load_embedding(tmp / "embeddings" / "xlnew.safetensors")
            assert created.is_sdxl and created.vectors["clip_l"].shape[-1] == 32  # type: ignore[index]
            assert created.vectors["clip_g"].shape[-1] == 48  # type: ignore[index]
            phase("embedding created")

            # Create hypernetwork: the SDXL model's own widths are offered and ticked.
            open_sub_tab(page, "Create hypernetwork")
            sizes = page.locator("#sdconcepts_create_hn_sizes label")
            deadline = time.monotonic() + 30
            while [t.strip() for t in sizes.all_inner_texts()] != XL_WIDTHS and time.monotonic() < deadline:
                page.wait_for_timeout(200)
            assert [t.strip() for t in sizes.all_inner_texts()] == XL_WIDTHS, sizes.all_inner_texts()
            assert page.locator("#sdconcepts_create_hn_sizes input:checked").count() == len(XL_WIDTHS)
            fill(page, "#sdconcepts_create_hn_name input", "xlhn")
            page.locator("#sdconcepts_create_hn_button").click()
            wait_text(page, "#sdconcepts_create_hn_result", "Created")
            assert sorted(load_hypernetwork(tmp / "hypernetworks" / "xlhn.pt").layers) == [64, 80, 96]
            phase("hypernetwork created")

            # Train each for 4 steps at 64 px on the raw dataset (resized on load), saving every 2 steps.
            open_sub_tab(page, "Train")
            for selector, value in (("#sdconcepts_train_dataset input", str(tmp / "dataset")),
                                    ("#sdconcepts_train_width input[type=number]", "64"),
                                    ("#sdconcepts_train_height input[type=number]", "64"),
                                    ("#sdconcepts_train_max_steps input", "4"),
                                    ("#sdconcepts_train_preview_every input", "0"),
                                    ("#sdconcepts_train_save_every input", "2")):
                fill(page, selector, value)
            assert page.locator("#sdconcepts_train_embedding input").first.input_value() == "xlnew"
            phase("train form filled")
            before = created.vectors["clip_g"].clone()  # type: ignore[index]
            _train(page, "embedding", "xlnew")
            phase("embedding trained")
            page.locator("#sdconcepts_train_plot").first.scroll_into_view_if_needed()
            page.locator("#sdconcepts_train_plot img").first.wait_for(state="visible", timeout=240_000)
            trained = load_embedding(tmp / "embeddings" / "xlnew.safetensors")
            assert trained.is_sdxl and trained.step == 4, trained.step
            assert not torch.equal(trained.vectors["clip_g"], before)  # type: ignore[index]

            assert page.locator("#sdconcepts_train_hypernetwork input").first.input_value() == "xlhn"
            _train(page, "hypernetwork", "xlhn")
            phase("hypernetwork trained")
            hypernetwork = load_hypernetwork(tmp / "hypernetworks" / "xlhn.pt")
            assert hypernetwork.step == 4 and sorted(hypernetwork.layers) == [64, 80, 96]
            screenshot(page, kit.OUTPUT / "sdxl-train-tab.png")
            phase("screenshot")

            # The trained embedding is a card on this SDXL model, without a restart.
            kit.open_tab(page, "Textual Inversion")
            _wait_cards(page, ["xlnew", "xlstyle"])
            kit.open_tab(page, "Hypernetworks")
            page.locator('#sdconcepts_hn_cards .sdconcepts-card[data-name="xlhn"]').wait_for(state="visible")
            phase("cards")
        except Exception:
            screenshot(page, kit.OUTPUT / "sdxl-train-failure.png")
            raise
        finally:
            browser.close()

