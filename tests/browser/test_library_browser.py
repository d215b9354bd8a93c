"""Card tabs over a library of a few thousand files in a real browser: pages, search as you type, A1111's
user-metadata editor, and clicks that insert the activation text and use the preferred weight.

Times (to the first usable card, per search) are printed, not asserted beyond a loose bound: speed goals are
measured by bench/bench_library.py. Served standalone only: inside a host the card pages are the host's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from browser_kit import (
    APP_PYTHON,
    CHROMIUM,
    OUTPUT,
    ROOT,
    STANDALONE_MODES,
    TIMEOUT_MS,
    WEBGL_CHROMIUM_ARGS,
    free_port,
    model_for_test,
    open_tab,
    sync_playwright,
    value,
    wait_for_server,
)

from sdconcepts import Embedding, save_embedding
from sdconcepts.hypernetworks.files import save_hypernetwork
from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork
from sdconcepts.ui.cards import PAGE_SIZE

EMBEDDINGS = int(os.environ.get("SDCONCEPTS_BROWSER_LIBRARY", "3000"))


def _write_big_library(root: Path, width: int) -> tuple[Path, Path]:
    embeddings = root / "embeddings"
    generator = torch.Generator().manual_seed(0)
    for i in range(EMBEDDINGS):
        folder = embeddings / f"group{i % 10}" / f"set{i % 4}"
        suffix = ".pt" if i % 2 else ".safetensors"
        save_embedding(Embedding(f"e{i:05d}", torch.randn(1, width, generator=generator) * 0.1),
                       folder / f"e{i:05d}{suffix}")
    save_embedding(Embedding("toy-style", torch.randn(2, width, generator=generator) * 0.1),
                   embeddings / "toy-style.pt")
    hypernetworks = root / "hypernetworks"
    hypernetworks.mkdir(parents=True)
    save_hypernetwork(create_hypernetwork("anime", (width,), generator_seed=1), hypernetworks / "anime.pt")
    # Written the way A1111 1.10's Lora editor writes it (json.dump, indent=4).
    (hypernetworks / "anime.json").write_text(json.dumps(
        {"description": "Anime look", "sd version": "SD1", "activation text": "cel shading",
         "preferred weight": 0.6, "negative text": "photo", "notes": ""}, indent=4), encoding="utf-8")
    return embeddings, hypernetworks


@pytest.fixture(scope="module", params=STANDALONE_MODES)
def big_app(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, Path, Path]]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"browser-library-{mode}")
    model, width = model_for_test(tmp)
    start = time.monotonic()
    embeddings, hypernetworks = _write_big_library(tmp, width)
    print(f"\nwrote {EMBEDDINGS + 1} embeddings in {time.monotonic() - start:.0f} s")
    port = free_port()
    command = [APP_PYTHON, "-m", "sdconcepts", "--port", str(port), "--no-examples",
               "--embeddings-dir", str(embeddings), "--hypernetworks-dir", str(hypernetworks),
               "--outputs-dir", str(tmp / "outputs")]
    if model != "-":
        command += ["--ckpt", model]
    # The app runs this checkout's code (the interpreter's installed sdconcepts may be another checkout).
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1",
               PYTHONPATH=pythonpath)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    log = OUTPUT / f"library-{mode}-server.log"
    started = time.monotonic()
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=tmp, env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(url, process, log)
        print(f"server answered {time.monotonic() - started:.1f} s after start")
        yield mode, url, embeddings, hypernetworks
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


CARDS = "#sdconcepts_ti_cards .sdconcepts-card"


def _card_count(page) -> int:  # type: ignore[no-untyped-def]
    return int(page.evaluate(f"() => document.querySelectorAll('{CARDS}').length"))


# Installed in the page once: per keydown in the Textual Inversion search box, the time until the page's cards are
# exactly those matching the box's text (hidden ones have no layout box), ``dom`` when the key's input event has been
# handled and ``ms`` at the first animation frame after it (what is painted next); and, on every frame, whether the
# shown cards match the box's text (``bad`` counts the frames that did not), until ``stop`` is set.
SEARCH_MONITOR = """() => {
    if (window.__sdcSearch) return;
    const state = window.__sdcSearch = {samples: [], frames: 0, bad: 0, stop: false, paused: false};
    const box = () => document.querySelector('#sdconcepts_ti_search input, #sdconcepts_ti_search textarea');
    const matching = () => {
        const words = (box().value || '').toLowerCase().split(/\\s+/).filter(Boolean);
        for (const card of document.querySelectorAll('#sdconcepts_ti_cards .sdconcepts-card')) {
            const text = card.getAttribute('data-search') || '';
            if ((card.getClientRects().length > 0) !== words.every((w) => text.includes(w))) return false;
        }
        return true;
    };
    document.addEventListener('keydown', (event) => {
        if (state.stop || state.paused || !(event.target instanceof Element) || !event.target.closest('#sdconcepts_ti_search')) return;
        const sample = {start: performance.now(), ms: null, dom: null};
        state.samples.push(sample);
        // The key's input event, once every handler of the box has run: are the cards in the page filtered yet?
        document.addEventListener('input', () => {
            if (matching()) sample.dom = performance.now() - sample.start;
        }, {once: true});
        const check = () => {
            if (matching()) sample.ms = performance.now() - sample.start; else requestAnimationFrame(check);
        };
        requestAnimationFrame(check);
    }, true);
    const frame = () => {
        if (state.stop) return;
        state.frames += 1;
        if (!matching()) state.bad += 1;
        requestAnimationFrame(frame);
    };
    requestAnimationFrame(frame);
}"""


def _wait_for_answer(page, count: int) -> None:  # type: ignore[no-untyped-def]
    """Until the summary shows the server's answer holding ``count`` cards."""
    page.wait_for_function(
        "(n) => (document.querySelector('#sdconcepts_ti_summary .sdconcepts-summary') || {})"
        ".textContent?.startsWith(n + ' of ')", arg=count,
    )


def test_big_library_pages_search_metadata_editor_and_clicks(big_app: tuple[str, str, Path, Path]) -> None:
    mode, url, embeddings, hypernetworks = big_app
    prompt = "#sdconcepts_prompt textarea"
    negative = "#sdconcepts_neg_prompt textarea"
    search = "#sdconcepts_ti_search input, #sdconcepts_ti_search textarea"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=WEBGL_CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            start = time.monotonic()
            page.goto(url)
            page.wait_for_selector(prompt, state="visible")
            page.wait_for_function("() => window.sdconcepts && window.sdconcepts.installed")
            open_tab(page, "Textual Inversion")
            page.locator(CARDS).first.wait_for(state="visible")
            first_card = time.monotonic() - start
            print(f"page load to the first usable card: {first_card:.2f} s ({EMBEDDINGS + 1} embeddings)")
            assert first_card < 60  # loose: the goals are the bench's
            # One page of cards, not thousands.
            assert _card_count(page) == PAGE_SIZE
            summary = page.locator("#sdconcepts_ti_summary").first.inner_text()
            assert f"of {EMBEDDINGS + 1} embeddings" in summary and "page 1 of" in summary, summary

            # Page 2 shows the next cards.
            first_name = page.locator(CARDS).first.get_attribute("data-name")
            page_box = page.locator("#sdconcepts_ti_page input").first
            page_box.fill("2")
            page_box.press("Enter")
            page.wait_for_function(
                f"() => document.querySelector('{CARDS}').getAttribute('data-name') !== '{first_name}'"
            )
            assert "page 2 of" in page.locator("#sdconcepts_ti_summary").first.inner_text()
            page_box.fill("1")
            page_box.press("Enter")

            # Search as you type. Each key is timed inside the page (SEARCH_MONITOR), from its keydown to the first
            # frame whose cards are exactly those matching the box's text (the shown page, filtered in the page);
            # every frame is checked too, so a late server answer for older text that showed cards the box's text
            # excludes would count. The server's answer over the whole library (the summary shows its count) is
            # timed from the key as well. The query has letters no hash has ("g"), so only names and folders
            # match, and the counts are known here.
            relative = [str(p.relative_to(embeddings)) for p in embeddings.rglob("*")
                        if p.suffix in (".pt", ".safetensors")]
            page.evaluate(SEARCH_MONITOR)
            box = page.locator(search).first
            box.click()
            server = []
            previous = len(relative)
            query = ""
            for key in "group3/set1/e0013":
                query += key
                count = sum(query in r.lower() for r in relative)
                key_at = time.monotonic()
                page.keyboard.type(key)
                if count != previous:
                    _wait_for_answer(page, count)
                    server.append((query, count, time.monotonic() - key_at))
                    previous = count
            assert _card_count(page) == 1 and server[-1][1] == 1
            # Typing on while the server's answers for older text arrive: a pause long enough for the page to ask
            # the server, then keys 60 ms apart (an answer takes longer than that here), then the final answer.
            page.evaluate("() => { window.__sdcSearch.paused = true; }")  # fill() may send keys of its own
            box.fill("")
            page.evaluate("() => { window.__sdcSearch.paused = false; }")
            _wait_for_answer(page, len(relative))
            page.keyboard.type("group3")
            page.wait_for_timeout(450)
            page.keyboard.type("/set1/e0013", delay=60)
            _wait_for_answer(page, 1)
            page.wait_for_timeout(1000)  # no older answer replaces the final one afterwards
            assert _card_count(page) == 1
            assert page.locator("#sdconcepts_ti_summary .sdconcepts-summary").first.inner_text().startswith("1 of ")
            monitor = page.evaluate("() => { window.__sdcSearch.stop = true; return window.__sdcSearch; }")
            samples = monitor["samples"]
            keys, frames = [s["dom"] for s in samples], [s["ms"] for s in samples]
            assert len(samples) == 2 * len("group3/set1/e0013") and None not in keys + frames, samples
            for label, values in (("filtered in the page (input event handled)", keys),
                                  ("the next frame, filtered", frames)):
                print(f"search, key to {label}, ms per key: " + " ".join(f"{t:.0f}" for t in values))
                print(f"search, key to {label}: median {sorted(values)[len(values) // 2]:.0f} ms, "
                      f"worst {max(values):.0f} ms over {len(values)} keys")
            print(f"search: frames showing a card the box's text excludes: {monitor['bad']} of {monitor['frames']}")
            print("search, key to the server's answer: "
                  + ", ".join(f"{q!r} ({n}) {t * 1000:.0f} ms" for q, n, t in server))
            # Loose (a busy shared machine; frames wait for the compositor there): the goal, 50 ms, is reported.
            assert max(keys) <= 500
            assert monitor["bad"] == 0
            # The filter itself, timed inside the page (the keys above also wait for the browser's other work).
            box.fill("")
            page.wait_for_function(f"() => document.querySelectorAll('{CARDS}').length === {PAGE_SIZE}")
            cost = page.evaluate(
                """() => { const input = document.querySelector('#sdconcepts_ti_search input, #sdconcepts_ti_search textarea');
                    const times = [];
                    for (const q of ['g', 'gr', 'group3', 'group3/s', 'e0', '']) {
                        const t0 = performance.now();
                        input.value = q; input.dispatchEvent(new Event('input', {bubbles: true}));
                        document.body.offsetHeight;  // include the layout the change causes
                        times.push(performance.now() - t0);
                    }
                    return times; }"""
            )
            print("in-page filter of the shown page, per keystroke incl. layout: "
                  + ", ".join(f"{t:.1f} ms" for t in cost))

            # The metadata editor: open from the card's edit button, save, and the card and the json follow.
            box.fill("toy-style")
            page.wait_for_function(f"() => document.querySelectorAll('{CARDS}').length === 1")
            card = page.locator(f'{CARDS}[data-name="toy-style"]')
            card.hover()
            card.locator(".sdconcepts-card-edit").click()
            # (gradio 6 puts a group's elem_id on its outer and inner element: use the outer one)
            editor = page.locator("#sdconcepts_ti_meta_editor").first
            editor.wait_for(state="visible")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#sdconcepts_ti_meta_title')]"
                ".some(e => e.textContent.includes('toy-style'))"
            )
            assert value(page, prompt) == ""  # the edit button does not toggle the card
            editor.locator("#sdconcepts_ti_meta_description textarea").fill("Toy world style")
            editor.locator("#sdconcepts_ti_meta_activation input, #sdconcepts_ti_meta_activation textarea").first.fill(
                "toy world")
            editor.locator("#sdconcepts_ti_meta_notes textarea").fill("made by the browser test")
            editor.locator("#sdconcepts_ti_meta_save").click()
            editor.wait_for(state="hidden")
            sidecar = embeddings / "toy-style.json"
            deadline = time.monotonic() + 120
            while not sidecar.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            saved = json.loads(sidecar.read_text(encoding="utf-8"))
            assert saved["description"] == "Toy world style" and saved["activation text"] == "toy world"
            assert saved["notes"] == "made by the browser test" and saved["preferred weight"] == 0
            page.wait_for_function(
                f"() => {{ const c = document.querySelector('{CARDS}[data-name=\"toy-style\"]');"
                " return c && c.getAttribute('data-prompt') === 'toy-style toy world'; }"
            )
            assert "Toy world style" in page.locator(f'{CARDS}[data-name="toy-style"]').inner_text()

            # A click inserts the name with its activation text; a second click removes both.
            page.locator(f'{CARDS}[data-name="toy-style"] .sdconcepts-card-name').click()
            assert value(page, prompt) == "toy-style toy world"
            page.locator(f'{CARDS}[data-name="toy-style"] .sdconcepts-card-name').click()
            assert value(page, prompt) == ""

            # Hypernetworks: the preferred weight is the multiplier, the activation text follows the tag and the
            # negative text goes to the negative prompt (A1111's Lora card behaviour).
            open_tab(page, "Hypernetworks")
            hn_card = page.locator('#sdconcepts_hn_cards .sdconcepts-card[data-name="anime"]')
            hn_card.wait_for(state="visible")
            assert "Anime look" in hn_card.inner_text()
            page.locator(prompt).fill("a red circle")
            hn_card.locator(".sdconcepts-card-name").click()
            assert value(page, prompt) == "a red circle <hypernet:anime:0.6> cel shading"
            assert value(page, negative) == "(photo:1)"
            hn_card.locator(".sdconcepts-card-name").click()
            assert value(page, prompt) == "a red circle" and value(page, negative) == ""
            page.screenshot(path=str(OUTPUT / f"library-{mode}-hypernetworks.png"), full_page=True)
        finally:
            browser.close()
