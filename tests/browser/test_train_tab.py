"""The Train tab in a real browser (Playwright driving Debian's chromium) on the default model.

Preprocess a dataset, create an embedding, train it with a preview every 2 steps, watch the status, loss plot and a
preview arrive, reload the page and find the running job again, have a second Train click refused, interrupt. Runs
standalone and hosted (tests/browser/hosted_app.py; ``SDCONCEPTS_BROWSER_MODES``). The previews read "txt2img":
standalone our txt2img tab's settings, and the new embedding is then among our Textual Inversion cards; hosted the
host's txt2img (its prompt, steps, and A1111's sampler and schedule type kept apart: "DPM++ 2M" + "Karras"), which
the previews' infotext shows. Saves ``train-tab-<mode>.png`` to the browser output folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import browser_kit as kit
import pytest
from browser_kit import choose, fill, open_sub_tab, screenshot
from page_waits import wait_text
from PIL import Image

from sdconcepts.toyworld.concept import write_concept
from sdconcepts.training.presets import preset


@pytest.fixture(scope="module", params=kit.MODES)
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"browser-train-{mode}")
    model, _width = kit.model_for_test(tmp)
    dataset = tmp / "dataset"
    write_concept(dataset, count=3, seed=3, shape="triangle", colour="yellow")
    for folder in ("embeddings", "hypernetworks"):
        (tmp / folder).mkdir()
    port = kit.free_port()
    command = kit.app_command(mode, port, model, tmp / "embeddings", tmp / "hypernetworks", tmp / "outputs",
                             "--no-examples")
    with kit.serve_app(command, port=port, cwd=tmp, log=kit.OUTPUT / f"train-{mode}-server.log") as url:
        yield mode, url, dataset


def _host_tab(page, name: str) -> None:  # type: ignore[no-untyped-def]
    host_tab = page.locator('#tabs button[role="tab"], #tabs .tab-nav button')
    host_tab.filter(has_text=name).filter(visible=True).first.click()


def _open_our_page(page, mode: str) -> None:  # type: ignore[no-untyped-def]
    if mode == "hosted":
        _host_tab(page, "sdconcepts")
        page.wait_for_selector("#sdconcepts_train_root", state="visible")
        # Our tab holds no prompt or cards of its own there: the host's are the ones.
        assert page.locator("#sdconcepts_prompt, #sdconcepts_generate, #sdconcepts_ti_cards").count() == 0
        return
    page.wait_for_selector("#sdconcepts_prompt textarea", state="visible")


def _set_preview_steps(page, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Previews use the txt2img settings: few sampling steps keep them quick (the host's txt2img, hosted)."""
    if mode == "hosted":
        _host_tab(page, "txt2img")
        fill(page, "#txt2img_steps input[type=number]", "3")
        _open_our_page(page, mode)
        return
    fill(page, "#sdconcepts_steps input[type=number]", "3")


def test_create_train_watch_reload_interrupt_and_find_the_card(app: tuple[str, str, Path]) -> None:
    mode, url, dataset = app
    with kit.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(kit.CHROMIUM), args=kit.WEBGL_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(kit.TIMEOUT_MS)
            page.goto(url)
            _open_our_page(page, mode)
            _set_preview_steps(page, mode)
            kit.open_tab(page, "Train")

            # Preprocess the dataset: 3 images at the training size, each with a flipped copy, captions copied.
            prepared = dataset.parent / "prepared"
            open_sub_tab(page, "Preprocess images")
            fill(page, "#sdconcepts_preprocess_source input", str(dataset))
            fill(page, "#sdconcepts_preprocess_destination input", str(prepared))
            fill(page, "#sdconcepts_preprocess_width input[type=number]", "64")
            fill(page, "#sdconcepts_preprocess_height input[type=number]", "64")
            page.locator("#sdconcepts_preprocess_flip input").check()
            choose(page, "#sdconcepts_preprocess_caption_action", "copy")
            page.locator("#sdconcepts_preprocess_button").click()
            wait_text(page, "#sdconcepts_preprocess_result", "Preprocessing finished: 6 images")
            assert len(list(prepared.glob("*.png"))) == 6 and len(list(prepared.glob("*.txt"))) == 6

            # Create embedding: the new name is chosen in the Train sub-tab's dropdown.
            open_sub_tab(page, "Create embedding")
            fill(page, "#sdconcepts_create_ti_name input", "uitoy")
            fill(page, "#sdconcepts_create_ti_init input", "triangle")
            page.locator("#sdconcepts_create_ti_button").click()
            wait_text(page, "#sdconcepts_create_ti_result", "Created")

            open_sub_tab(page, "Train")
            # A missing dataset is refused next to its field and nothing starts.
            fill(page, "#sdconcepts_train_dataset input", str(dataset / "missing"))
            page.locator("#sdconcepts_train_ti_button").click()
            wait_text(page, "#sdconcepts_train_err_dataset", "does not exist")
            assert "No training" in page.locator("#sdconcepts_train_status").first.inner_text()

            fill(page, "#sdconcepts_train_dataset input", str(prepared))
            for selector, value in (("#sdconcepts_train_width input[type=number]", "64"),
                                    ("#sdconcepts_train_height input[type=number]", "64"),
                                    ("#sdconcepts_train_max_steps input", "2000"),
                                    ("#sdconcepts_train_preview_every input", "2"),
                                    ("#sdconcepts_train_save_every input", "2")):
                fill(page, selector, value)
            page.locator("#sdconcepts_train_read_txt2img input").check()
            page.locator("#sdconcepts_train_ti_button").click()
            status = wait_text(page, "#sdconcepts_train_status", "loss:")
            first_rate = preset(None).learn_rate.split(":")[0]  # the default preset's schedule starts here
            assert "it/s" in status and "ETA" in status and f"lr: {first_rate}" in status, status
            page.locator("#sdconcepts_train_plot img").first.wait_for(state="visible", timeout=120_000)
            page.locator("#sdconcepts_train_previews img").first.wait_for(state="visible", timeout=120_000)
            page.wait_for_function(
                "() => { const t = document.querySelector('#sdconcepts_train_saves textarea');"
                " return t && t.value.includes('uitoy'); }"
            )

            # A second Train click while one runs is refused with a message. gradio 3.41's front end (A1111's stack)
            # holds a click on an event that is still streaming until it ends, so the refusal is seen on 4+ only.
            if kit.app_gradio_major() >= 4:
                page.locator("#sdconcepts_train_ti_button").click()
                wait_text(page, "#sdconcepts_train_message", "is training already")

            # Reload: the page shows the running job again, still stepping.
            page.reload()
            _open_our_page(page, mode)
            kit.open_tab(page, "Train")
            open_sub_tab(page, "Train")
            first = wait_text(page, "#sdconcepts_train_status", "loss:")
            assert "Training" in first and "uitoy" in first
            # Gradio's images load lazily: an image below the fold has no size until it is scrolled to.
            page.locator("#sdconcepts_train_plot").first.scroll_into_view_if_needed()
            page.locator("#sdconcepts_train_plot img").first.wait_for(state="visible", timeout=240_000)

            page.locator("#sdconcepts_train_interrupt").click()
            end = wait_text(page, "#sdconcepts_train_status", "Training interrupted", timeout=120)
            assert "saved to" in end and "uitoy.pt" in end
            page.locator("#sdconcepts_train_previews img").first.wait_for(state="visible")
            screenshot(page, kit.OUTPUT / f"train-tab-{mode}.png")

            if mode == "hosted":
                # The previews were made with the host's txt2img settings.
                previews = sorted(p for p in dataset.parent.rglob("uitoy-*.png") if p.parent.name == "images")
                assert previews, list(dataset.parent.rglob("*.png"))
                with Image.open(previews[-1]) as picture:
                    info = str(picture.info.get("parameters", ""))
                assert info.startswith("the host's own prompt"), info
                assert "Steps: 3," in info and "DPM++ 2M" in info and "Karras" in info, info
            else:
                # The trained file is among the Textual Inversion cards without a restart.
                kit.open_tab(page, "Textual Inversion")
                page.locator('#sdconcepts_ti_cards .sdconcepts-card[data-name="uitoy"]').wait_for(state="visible")
        except Exception:
            screenshot(page, kit.OUTPUT / f"train-tab-{mode}-failure.png")
            raise
        finally:
            browser.close()
