"""javascript/sdconcepts.js in chromium without a server: the toggle rules, and the click/focus wiring on a bare page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from browser_kit import CHROMIUM, CHROMIUM_ARGS, ROOT, sync_playwright

PAGE = """
<div id="sdconcepts_root">
  <div id="sdconcepts_prompt"><label><textarea></textarea></label></div>
  <div id="sdconcepts_neg_prompt"><label><textarea></textarea></label></div>
  <div class="sdconcepts-card" tabindex="0" role="button" data-prompt="&lt;hypernet:style:1&gt;" data-allow-negative="0"><span>style</span></div>
  <div class="sdconcepts-card" tabindex="0" role="button" data-prompt="toy" data-allow-negative="1"><span>toy</span></div>
  <div id="txt2img_prompt"><textarea>host prompt</textarea></div>
  <div id="sdconcepts_ti_search"><label><input type="text"></label></div>
  <div id="sdconcepts_ti_search_go" class="sdconcepts-hidden"><button>Search</button></div>
  <div id="sdconcepts_ti_summary"><div class="sdconcepts-summary">3 of 3 embeddings</div></div>
  <div id="sdconcepts_ti_cards"><div class="prose"></div></div>
  <div id="sdconcepts_ti_skipped"><details class="sdconcepts-skipped" open><ul><li><code>emb/old.pt</code>: width 768
    <span class="sdconcepts-skipped-convert" role="button" tabindex="0" data-path="emb/old.pt">Convert for SDXL</span>
  </li></ul></details></div>
  <div id="sdconcepts_ti_tools_convert_source"><label><textarea></textarea></label></div>
  <div id="sdconcepts_ti_tools_convert"><button onclick="window.converted = (window.converted || 0) + 1">Write SDXL copy</button></div>
</div>
<div id="sdconcepts_img2img_root">
  <div id="sdconcepts_img2img_prompt"><label><textarea></textarea></label></div>
  <div id="sdconcepts_img2img_neg_prompt"><label><textarea></textarea></label></div>
  <div class="sdconcepts-card i2i" tabindex="0" role="button" data-prompt="toy" data-allow-negative="1"><span>toy</span></div>
</div>
"""


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_content(PAGE)
            page.add_script_tag(path=str(ROOT / "javascript" / "sdconcepts.js"))
            page.add_script_tag(path=str(ROOT / "javascript" / "sdconcepts.js"))  # a second copy installs nothing
            yield page
        finally:
            browser.close()


@pytest.mark.parametrize(
    ("value", "text", "caret", "expected", "removed"),
    [
        ("", "toy", None, "toy", False),
        ("a photo", "toy", None, "a photo toy", False),  # never focused: appended, as A1111 does
        ("a red circle on teal", "<hypernet:s:1>", 12, "a red circle <hypernet:s:1> on teal", False),
        ("a, b", "<hypernet:s:1>", 1, "a <hypernet:s:1>, b", False),
        ("a red circle <hypernet:s:0.5> on teal", "<hypernet:s:1>", 0, "a red circle on teal", True),  # any number
        ("a <hypernet:s:-1>", "<hypernet:s:1>", None, "a <hypernet:s:-1> <hypernet:s:1>", False),  # A1111 quirk
        ("<hypernet:other:1>", "<hypernet:s:1>", None, "<hypernet:other:1> <hypernet:s:1>", False),
        ("a toy, b", "toy", None, "a, b", True),
        ("toy b", "toy", None, "b", True),
        ("toygirl", "toy", None, "toygirl toy", False),  # whole words only
        ("x (y) z", "(y)", None, "x z", True),  # regex characters in a name are literal
        # A card with activation text (A1111 user metadata) inserts it after the tag and removes it with the tag.
        ("a cat", "<hypernet:s:0.7> red shape", None, "a cat <hypernet:s:0.7> red shape", False),
        ("a cat <hypernet:s:0.7> red shape, b", "<hypernet:s:0.7> red shape", None, "a cat, b", True),
        ("a <hypernet:s:1> blue", "<hypernet:s:0.7> red shape", None, "a blue", True),  # edited text stays
        ("a toy red shape", "toy red shape", None, "a", True),
    ],
)
def test_toggle_rules(page: Any, value: str, text: str, caret: int | None, expected: str, removed: bool) -> None:
    result = page.evaluate("([v, t, c]) => window.sdconcepts.toggleText(v, t, c)", [value, text, caret])
    assert (result["value"], result["removed"]) == (expected, removed)


def test_clicks_follow_the_last_focused_prompt_and_notify_gradio(page: Any) -> None:
    page.evaluate("""() => {
        window.inputs = [];
        for (const id of ['sdconcepts_prompt', 'sdconcepts_neg_prompt'])
            document.querySelector('#' + id + ' textarea').addEventListener('input', () => window.inputs.push(id));
    }""")
    prompt = page.locator("#sdconcepts_prompt textarea")
    negative = page.locator("#sdconcepts_neg_prompt textarea")
    negative.click()
    page.locator("#sdconcepts_root .sdconcepts-card[data-prompt='toy']").click()
    page.locator(".sdconcepts-card[data-prompt='<hypernet:style:1>']").click()  # hypernetworks: always the prompt
    assert negative.input_value() == "toy" and prompt.input_value() == "<hypernet:style:1>"
    prompt.fill("abc def")
    prompt.evaluate("el => { el.setSelectionRange(3, 3); window.inputs.push('typed'); }")
    page.locator("#sdconcepts_root .sdconcepts-card[data-prompt='toy']").click()  # the prompt had focus last, caret after "abc"
    assert prompt.input_value() == "abc toy def"
    page.locator("#sdconcepts_root .sdconcepts-card[data-prompt='toy']").focus()
    page.keyboard.press("Enter")  # cards work from the keyboard too
    assert prompt.input_value() == "abc def"
    inputs = page.evaluate("window.inputs")
    typed = inputs.index("typed")  # fill() itself sends input events before this marker
    assert inputs[:2] == ["sdconcepts_neg_prompt", "sdconcepts_prompt"]
    assert inputs[typed + 1:] == ["sdconcepts_prompt", "sdconcepts_prompt"]
    assert page.locator("#txt2img_prompt textarea").input_value() == "host prompt"


def test_cards_in_the_img2img_tab_write_to_its_own_prompts(page: Any) -> None:
    txt2img_prompt = page.locator("#sdconcepts_prompt textarea")
    txt2img_negative = page.locator("#sdconcepts_neg_prompt textarea")
    before = (txt2img_prompt.input_value(), txt2img_negative.input_value())
    prompt = page.locator("#sdconcepts_img2img_prompt textarea")
    negative = page.locator("#sdconcepts_img2img_neg_prompt textarea")
    card = page.locator(".sdconcepts-card.i2i")
    txt2img_negative.click()  # the other tab's negative had focus: img2img's cards still go to img2img's prompt
    card.click()
    assert prompt.input_value() == "toy" and negative.input_value() == ""
    negative.click()
    card.click()
    assert negative.input_value() == "toy" and prompt.input_value() == "toy"
    assert (txt2img_prompt.input_value(), txt2img_negative.input_value()) == before


# The server's answer to a search (cards.render_cards): the cards it lists, and the query it answers.
ANSWER = """([query, names]) => {
    const esc = (t) => t.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;');
    const cards = names.map((n) => `<div class="sdconcepts-card sdconcepts-card-embedding" role="button" tabindex="0"
        data-name="${n}" data-prompt="s-${n}" data-search="${esc(n + ' group/' + n + '.pt 0a1b2c')}"><span>${n}</span></div>`);
    document.querySelector('#sdconcepts_ti_cards .prose').innerHTML =
        `<div class="sdconcepts-cards" data-query="${esc(query)}">${cards.join('')}</div>`;
    document.querySelector('#sdconcepts_ti_summary').innerHTML =
        `<div class="sdconcepts-summary">${names.length} of 3 embeddings</div>`;
}"""
SHOWN = """() => [...document.querySelectorAll('#sdconcepts_ti_cards .sdconcepts-card')]
    .filter((c) => c.getClientRects().length > 0).map((c) => c.getAttribute('data-name'))"""
STALE = """() => [document.querySelector('#sdconcepts_ti_cards .sdconcepts-cards').classList.contains('sdconcepts-searching'),
    document.querySelector('#sdconcepts_ti_summary .sdconcepts-summary').classList.contains('sdconcepts-stale')]"""


def test_search_filters_shown_cards_at_once_and_a_late_answer_for_older_text_never_shows(page: Any) -> None:
    assert page.evaluate("() => window.sdconcepts.matchesSearch('red-cat group/red-cat.pt', ['cat', 'red'])")
    assert not page.evaluate("() => window.sdconcepts.matchesSearch('red-cat', ['red', 'dog'])")
    assert page.evaluate("() => window.sdconcepts.searchWords('  Red\tCAT ')") == ["red", "cat"]
    page.evaluate(ANSWER, ["", ["red-cat", "red-dog", "blue-cat"]])
    page.evaluate("""() => { window.goClicks = [];
        document.querySelector('#sdconcepts_ti_search_go button').addEventListener('click',
            () => window.goClicks.push(document.querySelector('#sdconcepts_ti_search input').value)); }""")
    clicks = lambda: page.evaluate("window.goClicks")  # noqa: E731
    box = page.locator("#sdconcepts_ti_search input")
    box.click()
    page.keyboard.type("red")
    # Filtered by the keystroke itself, before any answer: the shown answer is for "" (marked stale).
    assert page.evaluate(SHOWN) == ["red-cat", "red-dog"] and page.evaluate(STALE) == [True, True]
    assert clicks() == []  # the server is asked once typing pauses, not per keystroke
    page.wait_for_function("() => window.goClicks.length === 1")
    assert clicks() == ["red"]
    page.keyboard.type(" CAT")
    assert page.evaluate(SHOWN) == ["red-cat"]
    # The answer for "red" arrives after " CAT" was typed: the shown cards stay those of "red cat", from the same
    # task that wrote the answer (nothing is painted in between), and no extra request (one is scheduled already).
    shown_at_once = page.evaluate(f"async (args) => {{ ({ANSWER})(args); await Promise.resolve();"
                                  f" return ({SHOWN})(); }}", ["red", ["red-cat", "red-dog"]])
    assert shown_at_once == ["red-cat"] and page.evaluate(STALE) == [True, True]
    page.wait_for_function("() => window.goClicks.length === 2")
    assert clicks() == ["red", "red CAT"]
    # An older answer arrives once more after that request (gradio dropped it while the older one ran): asked again.
    page.evaluate(ANSWER, ["red", ["red-cat", "red-dog"]])
    assert page.evaluate(SHOWN) == ["red-cat"]
    page.wait_for_function("() => window.goClicks.length === 3")
    assert clicks()[-1] == "red CAT"
    # The answer for the box's text: shown as it is (words compared case- and space-insensitively), not stale.
    page.evaluate(ANSWER, ["red  cat", ["red-cat"]])
    assert page.evaluate(SHOWN) == ["red-cat"] and page.evaluate(STALE) == [False, False]
    page.wait_for_timeout(500)
    assert len(clicks()) == 3  # nothing more asked
    # Fewer words: the shown answer is narrower than the text; the one for "red" then shows both.
    for _ in " CAT":
        page.keyboard.press("Backspace")
    assert page.evaluate(STALE) == [True, True]
    page.wait_for_function("() => window.goClicks.length === 4")
    page.evaluate(ANSWER, ["red", ["red-cat", "red-dog"]])
    assert page.evaluate(SHOWN) == ["red-cat", "red-dog"] and page.evaluate(STALE) == [False, False]
    # A page with no match while the answer is on its way says so (CSS reads the class).
    page.keyboard.type("x")
    assert page.evaluate(SHOWN) == []
    assert page.evaluate("() => document.querySelector('#sdconcepts_ti_cards .sdconcepts-cards')"
                         ".classList.contains('sdconcepts-none-shown')")
    page.wait_for_function("() => window.goClicks.length === 5")
    # A server that keeps answering older text is asked again a bounded number of times, not forever.
    for _ in range(6):
        page.evaluate(ANSWER, ["red", ["red-cat", "red-dog"]])
        page.wait_for_timeout(30)
    assert len(clicks()) == 5 + 3 and page.evaluate(SHOWN) == []


def test_a_skipped_cards_convert_button_fills_the_tools_box_and_clicks_convert(page: Any) -> None:
    page.evaluate("""() => {
        window.sourceInputs = 0;
        document.querySelector('#sdconcepts_ti_tools_convert_source textarea')
            .addEventListener('input', () => window.sourceInputs += 1);
    }""")
    prompt_before = page.locator("#sdconcepts_prompt textarea").input_value()
    page.locator(".sdconcepts-skipped-convert").click()
    assert page.locator("#sdconcepts_ti_tools_convert_source textarea").input_value() == "emb/old.pt"
    assert page.evaluate("[window.sourceInputs, window.converted]") == [1, 1]  # gradio told, then the button clicked
    assert page.locator("#sdconcepts_prompt textarea").input_value() == prompt_before  # not a card click
