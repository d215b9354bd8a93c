"""The web UI in a real browser (Playwright driving Debian's chromium) against an app the test starts.

The standalone app (``python -m sdconcepts``): our txt2img, card pages and generator, which exist only there (inside
a host our tab holds the Train tab and the embedding tools; test_train_tab.py serves both). Served and driven through
browser_kit.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from browser_kit import (
    CHROMIUM,
    CHROMIUM_ARGS,
    OUTPUT,
    STANDALONE_MODES,
    TIMEOUT_MS,
    app_command,
    errors,
    free_port,
    model_for_test,
    open_tab,
    serve_app,
    set_caret,
    sync_playwright,
    text,
    value,
    wait_for_images,
)
from library_files import write_library


@pytest.fixture(scope="module", params=STANDALONE_MODES)
def app(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"browser-{mode}")
    model, width = model_for_test(tmp)
    embeddings, hypernetworks = write_library(tmp, width)
    port = free_port()
    command = app_command(mode, port, model, embeddings, hypernetworks, tmp / "outputs", "--no-examples")
    with serve_app(command, port=port, cwd=tmp, log=OUTPUT / f"{mode}-server.log") as url:
        yield mode, url


def test_cards_insert_tags_and_generate(app: tuple[str, str]) -> None:
    mode, url = app
    prompt = "#sdconcepts_prompt textarea"
    negative = "#sdconcepts_neg_prompt textarea"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            page.wait_for_selector(prompt, state="visible")
            page.wait_for_function("() => window.sdconcepts && window.sdconcepts.installed")

            # Hypernetworks: cards with details and previews, the skipped file, search as you type.
            open_tab(page, "Hypernetworks")
            cards = page.locator("#sdconcepts_hn_cards .sdconcepts-card")
            cards.first.wait_for(state="visible")
            assert cards.count() == 2
            assert "broken-hypernet.pt" in text(page, "#sdconcepts_hn_skipped .sdconcepts-skipped")
            assert page.locator("#sdconcepts_hn_cards img.sdconcepts-card-preview").count() == 1
            page.locator("#sdconcepts_hn_search input, #sdconcepts_hn_search textarea").first.fill("anime")
            page.wait_for_function(
                "() => document.querySelectorAll('#sdconcepts_hn_cards .sdconcepts-card').length === 1"
            )
            card = page.locator('#sdconcepts_hn_cards .sdconcepts-card[data-name="anime-hypernet"]')
            assert "widths 48, 32" in card.inner_text() or "widths" in card.inner_text()
            page.screenshot(path=str(OUTPUT / f"{mode}-hypernetworks.png"), full_page=True)

            # Click inserts <hypernet:name:1> at the caret; a second click removes it.
            page.locator(prompt).fill("a red circle on teal")
            set_caret(page, prompt, len("a red circle"))
            card.click()
            assert value(page, prompt) == "a red circle <hypernet:anime-hypernet:1> on teal"
            card.click()
            assert value(page, prompt) == "a red circle on teal"
            card.click()  # keep it for the generation below: the infotext must show it
            assert value(page, prompt) == "a red circle <hypernet:anime-hypernet:1> on teal"

            # Textual Inversion: goes to the negative prompt when that had focus last, else to the prompt.
            open_tab(page, "Textual Inversion")
            ti_cards = page.locator("#sdconcepts_ti_cards .sdconcepts-card")
            ti_cards.first.wait_for(state="visible")
            assert ti_cards.count() == 2
            skipped = text(page, "#sdconcepts_ti_skipped .sdconcepts-skipped")
            assert "broken.pt" in skipped and "other-width.safetensors" in skipped and "does not fit" in skipped
            page.locator(negative).click()
            page.locator('#sdconcepts_ti_cards .sdconcepts-card[data-name="lineart"]').click()
            assert value(page, negative) == "lineart"
            page.locator(prompt).click()
            page.locator(prompt).press("End")
            page.locator('#sdconcepts_ti_cards .sdconcepts-card[data-name="toy-style"]').click()
            assert value(page, prompt) == "a red circle <hypernet:anime-hypernet:1> on teal toy-style"
            assert value(page, negative) == "lineart"
            page.screenshot(path=str(OUTPUT / f"{mode}-textual-inversion.png"), full_page=True)

            # Generate one image: gallery and infotext show what the server received from the prompt boxes.
            open_tab(page, "txt2img")
            page.locator("#sdconcepts_steps input[type=number]").fill("6")
            page.locator("#sdconcepts_steps input[type=number]").press("Tab")
            page.locator("#sdconcepts_seed input").fill("42")
            page.locator("#sdconcepts_seed input").press("Tab")
            # A size the model cannot make: a clear error, and nothing in the form is lost.
            width = page.locator("#sdconcepts_width input[type=number]")
            width.fill("40")
            width.press("Tab")
            page.locator("#sdconcepts_generate").click()
            deadline = time.monotonic() + 120
            while not any("multiples of" in e for e in errors(page)) and time.monotonic() < deadline:
                page.wait_for_timeout(250)
            assert any("multiples of" in e for e in errors(page)), errors(page)
            assert page.locator("#sdconcepts_gallery img").count() == 0
            assert value(page, prompt) == "a red circle <hypernet:anime-hypernet:1> on teal toy-style"
            width.fill("0")
            width.press("Tab")
            page.locator("#sdconcepts_generate").click()
            wait_for_images(page, expected_error="multiples of")
            page.wait_for_function(
                "() => { const t = document.querySelector('#sdconcepts_infotext textarea');"
                " return t && t.value.includes('Seed: 42'); }",
                timeout=180_000,
            )
            info = value(page, "#sdconcepts_infotext textarea")
            assert info.startswith("a red circle <hypernet:anime-hypernet:1> on teal toy-style\n")
            assert "Negative prompt: lineart" in info and "TI hashes" in info and "Steps: 6," in info
            assert page.locator("#sdconcepts_warnings .sdconcepts-warnings").count() == 0
            page.locator("#sdconcepts_random_seed").click()
            page.wait_for_function("() => document.querySelector('#sdconcepts_seed input').value === '-1'")
            page.locator("#sdconcepts_reuse_seed").click()
            page.wait_for_function("() => document.querySelector('#sdconcepts_seed input').value === '42'")
            page.screenshot(path=str(OUTPUT / f"{mode}-txt2img.png"), full_page=True)
        finally:
            browser.close()
