"""The standalone app's img2img and PNG Info tabs in a real browser (Playwright driving Debian's chromium).

Draw a mask with the mouse on the Inpaint canvas (gradio 3.41's sketch tool, or 4.x/6.x's ImageEditor), inpaint with
mask blur 0 and "original" masked content, and check that the result came back with the pixels outside the stroke
unchanged; generate in txt2img, send the image to img2img, load the saved PNG in PNG Info and send its parameters
to txt2img; click a card in the img2img tab. Standalone only: inside a host these tabs are not built (the host has
its own; tests/ui/test_ui_img2img.py checks the hosted layout). ``tools/host_stacks.sh`` runs this file under the
A1111 and Forge gradio versions through ``SDCONCEPTS_APP_PYTHON``.
"""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import browser_kit as kit
import numpy as np
import pytest
from browser_kit import fill
from library_files import write_library
from PIL import Image

# For the send test, WebGL through SwiftShader instead of --disable-gpu: gradio 4.40's image editor draws with WebGL,
# and without it the page stops rendering once the server sets the editor's image (Send to inpaint). The drawing test
# keeps the plain arguments: with SwiftShader, the mouse strokes on 4.40's editor canvas in this headless chromium
# leave no mask (the strokes do register without WebGL).
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the browser test driver)")
SEND_CHROMIUM_ARGS = kit.WEBGL_CHROMIUM_ARGS

# The stroke runs across the middle row of the picture; rows this far from it are outside any brush there.
FAR_ROWS = 0.2


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    tmp = tmp_path_factory.mktemp("browser-img2img")
    model, width = kit.model_for_test(tmp)
    size = _default_size(Path(model) if model != "-" else None)
    embeddings, hypernetworks = write_library(tmp, width)
    outputs = tmp / "outputs"
    port = kit.free_port()
    command = kit.app_command("standalone", port, model, embeddings, hypernetworks, outputs)
    with kit.serve_app(command, port=port, cwd=tmp, log=kit.OUTPUT / "img2img-server.log") as url:
        yield url, outputs, size


def _default_size(model: Path | None) -> int:
    """The model's own image size, from its config files (the app under test runs elsewhere)."""
    import json

    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR

    folder = model or DEFAULT_MODEL_DIR
    sample = json.loads((folder / "unet" / "config.json").read_text())["sample_size"]
    blocks = json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]
    return int(sample) * 2 ** (len(blocks) - 1)


def _tab(page, label: str, within: str = "") -> None:  # type: ignore[no-untyped-def]
    """Click the visible tab button labelled exactly ``label`` (gradio 3: .tab-nav buttons; 4+: role="tab")."""
    scope = f"{within} " if within else ""
    buttons = page.locator(f'{scope}button[role="tab"], {scope}.tab-nav button')
    buttons.filter(has_text=re.compile(f"^\\s*{re.escape(label)}\\s*$")).filter(visible=True).first.click()


def _wait_value(page, selector: str, expected: str, timeout: float = 240) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = kit.value(page, selector)
        if seen == expected:
            return
        errors = kit.errors(page)
        if errors:
            raise AssertionError(f"gradio error: {errors[0]}")
        page.wait_for_timeout(200)
    raise AssertionError(f"{selector} is {seen!r}, not {expected!r}")


def _wait_image(page, selector: str, timeout: float = 300) -> Image.Image:  # type: ignore[no-untyped-def]
    """The first image under ``selector`` once it is there, fetched as the browser shows it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if page.locator(f"{selector} img").count():
            data = page.locator(f"{selector} img").first.evaluate(
                """async img => {
                    const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
                    let text = '';
                    for (let i = 0; i < bytes.length; i++) text += String.fromCharCode(bytes[i]);
                    return btoa(text);
                }"""
            )
            return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
        errors = kit.errors(page)
        if errors:
            raise AssertionError(f"gradio error: {errors[0]}")
        page.wait_for_timeout(250)
    raise AssertionError(f"no image under {selector} after {timeout} s")


def _dismiss_errors(page) -> None:  # type: ignore[no-untyped-def]
    """Close the error toasts (gradio 3, 4 and 6 give their close button the same class), so later checks see none."""
    deadline = time.monotonic() + 30
    while kit.errors(page) and time.monotonic() < deadline:
        for close in page.locator(".toast-close").all():
            try:
                close.click(timeout=2000)
            except playwright_api.Error:
                pass  # the toast went away by itself meanwhile
        page.wait_for_timeout(300)
    assert not kit.errors(page), kit.errors(page)


def _picture(size: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size]
    array = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def _open(page, url: str) -> None:  # type: ignore[no-untyped-def]
    page.set_default_timeout(kit.TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#sdconcepts_prompt textarea", state="visible")
    page.wait_for_function("() => window.sdconcepts && window.sdconcepts.installed")


def _generate(page, url: str) -> str:  # type: ignore[no-untyped-def]
    """Open the app, generate one image with known parameters; its infotext."""
    _open(page, url)
    page.locator("#sdconcepts_prompt textarea").fill("a red circle on teal")
    page.locator("#sdconcepts_neg_prompt textarea").fill("blurry")
    fill(page, "#sdconcepts_steps input[type=number]", "3")
    fill(page, "#sdconcepts_seed input", "42")
    page.locator("#sdconcepts_generate").click()
    kit.wait_for_images(page)
    page.wait_for_function(
        "() => { const t = document.querySelector('#sdconcepts_infotext textarea');"
        " return t && t.value.includes('Seed: 42'); }", timeout=180_000)
    return kit.value(page, "#sdconcepts_infotext textarea")


def _send_to_inpaint(page) -> bool:  # type: ignore[no-untyped-def]
    """Press txt2img's Send to inpaint: whether the Inpaint editor opened and shows the image within 180 s."""
    _tab(page, "txt2img", "#sdconcepts_main_tabs")
    page.locator("#sdconcepts_send_to_inpaint").click()
    editor = page.locator("#sdconcepts_img2img_inpaint_editor").first
    editor.wait_for(state="visible", timeout=240_000)
    # The page script opens the tab at once; the image and the Inpaint mode come with the server's answer.
    # Generate clicked before that answer (seen on A1111's stack in CI) runs with the form as it was.
    deadline = time.monotonic() + 180  # CI runs three lanes on two cores
    while re.search("Upload an image|Drop Image Here", editor.inner_text()) and time.monotonic() < deadline:
        errors = kit.errors(page)
        assert not errors, f"gradio error: {errors[0]}"
        page.wait_for_timeout(200)
    text = editor.inner_text()
    if re.search("Upload an image|Drop Image Here", text):
        print(f"the Inpaint editor got no image: {text!r}")
        return False
    return True


def test_txt2img_send_to_img2img_and_png_info_round_trip(app: tuple[str, Path, int]) -> None:
    url, outputs, _size = app
    with kit.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(kit.CHROMIUM), args=SEND_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            infotext = _generate(page, url)

            # Send to img2img: the image and its parameters land in the img2img tab, which opens.
            page.locator("#sdconcepts_send_to_img2img").click()
            _wait_value(page, "#sdconcepts_img2img_prompt textarea", "a red circle on teal")
            page.locator("#sdconcepts_img2img_prompt textarea").wait_for(state="visible", timeout=240_000)
            assert kit.value(page, "#sdconcepts_img2img_neg_prompt textarea") == "blurry"
            assert kit.value(page, "#sdconcepts_img2img_seed input") == "42"
            assert kit.value(page, "#sdconcepts_img2img_steps input[type=number]") == "3"
            sent = _wait_image(page, "#sdconcepts_img2img_init_image")
            assert sent.size[0] > 0
            page.screenshot(path=str(kit.OUTPUT / "img2img-sent.png"), full_page=True)

            # Send to inpaint: the Inpaint editor opens with the image (Generate then asks for a mask, not an image).
            # Under load gradio 6's editor can lay out an empty canvas ("36%", "Upload an image") and then ignore
            # every image it is given, ours as well as an upload (test_draw_a_mask_... below meets the same): the
            # browser-side editor, not our server. Such a page is dropped and the send is tried again from a fresh
            # page's generation, three pages at most.
            for attempt in range(3):
                if _send_to_inpaint(page):
                    break
                page.screenshot(path=str(kit.OUTPUT / f"inpaint-send-stuck-{attempt + 1}.png"), full_page=True)
                assert attempt < 2, "the Inpaint editor got no image in three pages"
                page.close()
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                assert _generate(page, url) == infotext
            page.locator("#sdconcepts_img2img_generate").click()
            deadline = time.monotonic() + 60
            while not kit.errors(page) and time.monotonic() < deadline:
                page.wait_for_timeout(200)
            assert any("draw the mask" in e for e in kit.errors(page)), kit.errors(page)
            _dismiss_errors(page)

            # PNG Info: the saved PNG's parameters, sent back to a txt2img form changed in the meantime.
            _tab(page, "txt2img", "#sdconcepts_main_tabs")
            page.locator("#sdconcepts_prompt textarea").fill("something else")
            page.locator("#sdconcepts_neg_prompt textarea").fill("")
            fill(page, "#sdconcepts_seed input", "-1")
            fill(page, "#sdconcepts_steps input[type=number]", "20")
            saved = sorted(outputs.glob("*.png"))
            assert saved, "txt2img saved no PNG"
            _tab(page, "PNG Info", "#sdconcepts_main_tabs")
            page.locator("#sdconcepts_png_info_file input[type=file]").first.set_input_files(str(saved[-1]))
            _wait_value(page, "#sdconcepts_png_info_infotext textarea", infotext)
            assert "Seed: 42" in page.locator("#sdconcepts_png_info_html").first.inner_text()
            page.screenshot(path=str(kit.OUTPUT / "png-info.png"), full_page=True)
            page.locator("#sdconcepts_png_info_to_txt2img").click()
            _wait_value(page, "#sdconcepts_prompt textarea", "a red circle on teal")
            page.locator("#sdconcepts_prompt textarea").wait_for(state="visible", timeout=240_000)  # txt2img opened
            assert kit.value(page, "#sdconcepts_neg_prompt textarea") == "blurry"
            assert kit.value(page, "#sdconcepts_seed input") == "42"
            assert kit.value(page, "#sdconcepts_steps input[type=number]") == "3"
        finally:
            browser.close()


def _inpaint_in_a_new_page(browser, url: str, init_path: Path) -> tuple[Image.Image, str]:  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        return _inpaint(page, url, init_path)
    finally:
        page.close()


def _inpaint(page, url: str, init_path: Path) -> tuple[Image.Image, str]:  # type: ignore[no-untyped-def]
    """In a fresh page: check card clicks in the img2img tab, load ``init_path`` into the Inpaint editor, draw a
    stroke across the middle, inpaint it with mask blur 0 and "original" content; (result, infotext)."""
    _open(page, url)
    _tab(page, "img2img", "#sdconcepts_main_tabs")

    # A card in this tab writes to this tab's prompt, never to txt2img's.
    page.locator("#sdconcepts_img2img_prompt textarea").fill("a toy")
    _tab(page, "Hypernetworks", "#sdconcepts_img2img_tabs")
    card = page.locator('#sdconcepts_img2img_hn_cards .sdconcepts-card[data-name="toy-hypernet"]')
    card.click()
    assert kit.value(page, "#sdconcepts_img2img_prompt textarea") == "a toy <hypernet:toy-hypernet:1>"
    assert kit.value(page, "#sdconcepts_prompt textarea") == ""
    card.click()
    assert kit.value(page, "#sdconcepts_img2img_prompt textarea") == "a toy"

    _tab(page, "Inpaint", "#sdconcepts_img2img_modes")
    editor = "#sdconcepts_img2img_inpaint_editor"
    # The editor may not take a file while its tab is still being drawn: wait for its empty-state text ("Upload an
    # image", gradio 6; "Drop Image Here", 3 and 4), then upload until that text has gone.
    page.locator(editor).filter(has_text=re.compile("Upload an image|Drop Image Here")).first.wait_for(timeout=240_000)
    page.wait_for_timeout(1000)
    loaded = False
    for _attempt in range(4):
        page.locator(f"{editor} input[type=file]").first.set_input_files(str(init_path))
        page.wait_for_timeout(2500)
        text = page.locator(editor).first.inner_text()
        if "Upload an image" not in text and "Drop Image Here" not in text:
            loaded = True
            break
    assert loaded, f"the Inpaint editor still shows its empty state after 4 uploads: {text!r}"
    canvas = page.locator(f"{editor} canvas").last
    canvas.wait_for(state="visible")
    page.wait_for_timeout(1500)  # the editor lays the picture out after loading it
    # gradio 4.x opens its editor on the upload tool; 3.41's sketch and 6.x's editor start on the brush.
    draw = page.locator(f'{editor} button[aria-label="Draw button"]')
    if draw.count():
        draw.first.click()
    box = canvas.bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    span = min(box["width"], box["height"]) * 0.15
    page.mouse.move(cx - span, cy)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(cx - span + 2 * span * step / 10, cy)
    page.mouse.up()
    page.wait_for_timeout(500)
    page.screenshot(path=str(kit.OUTPUT / "inpaint-drawn.png"), full_page=True)

    _tab(page, "Settings", "#sdconcepts_img2img_tabs")
    fill(page, "#sdconcepts_img2img_mask_blur input[type=number]", "0")
    fill(page, "#sdconcepts_img2img_denoising_strength input[type=number]", "1")
    fill(page, "#sdconcepts_img2img_steps input[type=number]", "3")
    fill(page, "#sdconcepts_img2img_seed input", "7")
    page.locator("#sdconcepts_img2img_masked_content label").filter(has_text="original").first.click()
    page.locator("#sdconcepts_img2img_generate").click()
    result = _wait_image(page, "#sdconcepts_img2img_gallery")
    page.wait_for_function(
        "() => { const t = document.querySelector('#sdconcepts_img2img_infotext textarea');"
        " return t && t.value.includes('Seed: 7'); }", timeout=180_000)
    info = kit.value(page, "#sdconcepts_img2img_infotext textarea")
    page.screenshot(path=str(kit.OUTPUT / "inpaint-result.png"), full_page=True)
    return result, info


def test_draw_a_mask_and_inpaint_keeps_the_rest(app: tuple[str, Path, int], tmp_path: Path) -> None:
    url, _outputs, model_size = app
    # The model's own size, so that "Just resize" leaves the picture as it is.
    size = model_size
    init = _picture(size)
    init_path = tmp_path / "init.png"
    init.save(init_path)
    with kit.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(kit.CHROMIUM), args=kit.CHROMIUM_ARGS)
        try:
            # Under load (a CI machine; this one while other jobs ran: 2 runs of 4), gradio 6's editor sometimes
            # lays out an empty canvas and then ignores every upload ("36%", "Upload an image" stay), and what it
            # hands over on Generate has no background. That is the browser-side editor, not our server, which
            # answers "upload an image first" as it should: such a page is dropped and the test starts again in a
            # fresh one, three pages at most.
            for attempt in range(3):
                try:
                    result, info = _inpaint_in_a_new_page(browser, url, init_path)
                    break
                except AssertionError as exc:
                    stuck = "empty state" in str(exc) or "upload an image first" in str(exc)
                    if not stuck or attempt == 2:
                        raise
                    print(f"the Inpaint editor did not take the picture in page {attempt + 1}: {exc}")
        except AssertionError as exc:
            if "draw the mask" in str(exc) and kit.app_gradio_major() == 4:
                # The server answered as it should for an empty mask; what failed is the stroke's delivery.
                pytest.skip("headless chromium without a GPU did not deliver the mouse stroke to gradio 4.40's "
                            "WebGL image editor this run (it does in most runs; 3.41 and 6.x are checked always)")
            raise
        finally:
            browser.close()

    assert "Denoising strength: 1" in info and "Mask blur" not in info, info
    assert result.size == init.size
    got = np.asarray(result, dtype=np.int16)
    want = np.asarray(init, dtype=np.int16)
    far = int(size * FAR_ROWS)
    outside = np.concatenate([np.abs(got[:far] - want[:far]), np.abs(got[-far:] - want[-far:])])
    # Exact on the server (the paste-back lays the original over the result); gradio 4+'s editor hands the picture
    # over through the browser's canvas, so allow a level or two of colour conversion there.
    assert outside.max() <= 2, f"pixels outside the mask changed by up to {outside.max()}"
    middle = np.abs(got[size // 2 - 2:size // 2 + 2] - want[size // 2 - 2:size // 2 + 2])
    assert middle.max() > 10, "nothing under the stroke was inpainted"
