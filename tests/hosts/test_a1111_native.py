"""AUTOMATIC1111 1.10.1 keeps its own hypernetworks (issue 11, point 4) and its own embeddings bundled in LoRA files
(issue 23: A1111 loads them natively, our extension registers nothing there): with our extension installed, A1111's
``<hypernet:...>`` and ``<lora:...>`` + bundled-word images, infotexts and its own Hypernetworks card page are exactly
what A1111 gives without it.

"Without" is the same prepared tree launched with A1111's ``--disable-extra-extensions`` (only extensions-builtin/
run): the same code, weights and files, so equal results are equal by construction and compared exactly.
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

import bundle_checks as bc
import host_harness as hh
import numpy as np

PROMPT = "a red circle on a teal background"
# Same seed for every request; 64x64, 2 Euler steps (hh.DEFAULT_TXT2IMG).
REQUESTS: dict[str, dict[str, Any]] = {
    "no tag": {"prompt": PROMPT},
    "hn_a:1": {"prompt": f"{PROMPT} <hypernet:hn_a:1>"},
    "hn_b:0.6 then hn_a:-0.5": {"prompt": f"{PROMPT} <hypernet:hn_b:0.6> <hypernet:hn_a:-0.5>"},
    **bc.bundle_requests(),  # the words bundled in models/Lora/sdc_bundle.safetensors (bundle_checks.py)
}


def _run_all(host: hh.Host) -> dict[str, tuple[np.ndarray, str]]:
    return {name: hh.txt2img(host, **body) for name, body in REQUESTS.items()}


def _hypernetwork_page_state(host: hh.Host) -> dict[str, Any]:
    """What A1111's hypernetworks page and API serve: the API list and one card's HTML (served by the page object
    registered as "hypernetworks" in the host's extra-networks registry)."""
    tabs = [tab for tab in hh.tab_items(host) if tab[1].endswith("_hypernetworks")]
    listed = sorted(item["name"] for item in host.request("/sdapi/v1/hypernetworks"))
    query = urllib.parse.urlencode({"page": "hypernetworks", "tabname": "txt2img", "name": "hn_a"})
    card = host.request(f"/sd_extra_networks/get-single-card?{query}")
    return {"tabs": tabs, "listed": listed, "card": card.get("html") if isinstance(card, dict) else card}


def test_a1111_hypernetworks_and_bundled_embeddings_unchanged_by_our_extension(host_manager: hh.HostManager) -> None:
    # Without the extension first: the host launched with it then stays up for the next A1111 tests (one launch per
    # configuration; tests/hosts/conftest.py orders the tests so).
    host = host_manager.get("a1111", extension=False)
    assert "sdconcepts" not in hh.config_labels(host), "--disable-extra-extensions did not disable our extension"
    without_ext = _run_all(host)
    page_without_ext = _hypernetwork_page_state(host)

    host = host_manager.get("a1111", extension=True)
    assert "sdconcepts" in hh.config_labels(host), "our tab is missing: the extension did not load"
    with_ext = _run_all(host)
    page_with_ext = _hypernetwork_page_state(host)

    for image, _info in with_ext.values():
        hh.assert_finite_picture(image)
    # The test can fail: the hypernetworks visibly change A1111's picture...
    plain = with_ext["no tag"][0]
    assert hh.mean_abs_diff(plain, with_ext["hn_a:1"][0]) > 2.0
    assert hh.mean_abs_diff(plain, with_ext["hn_b:0.6 then hn_a:-0.5"][0]) > 2.0
    # ...and A1111 parsed the tags (its infotext drops nothing and records the stripped prompt).
    assert "<hypernet:hn_a:1>" in with_ext["hn_a:1"][1]
    assert page_with_ext["listed"] == ["hn_768", "hn_a", "hn_b"]
    # one Hypernetworks card page per generation tab, A1111's own ids
    assert page_with_ext["tabs"] == [("Hypernetworks", "txt2img_hypernetworks"), ("Hypernetworks", "img2img_hypernetworks")]
    assert "hn_a" in page_with_ext["card"]
    # A1111 itself uses the bundled word while its LoRA is in the prompt (the same checks as in Forge, its TI hashes).
    bc.check_bundled_words(host, {name: with_ext[name] for name in bc.bundle_requests()}, ti_hashes=True)

    for name in REQUESTS:
        image_with, info_with = with_ext[name]
        image_without, info_without = without_ext[name]
        assert np.array_equal(image_with, image_without), (
            f"{name}: A1111's image differs with our extension (mean |diff| {hh.mean_abs_diff(image_with, image_without):.3f})"
        )
        assert info_with == info_without, f"{name}: infotext differs:\n{info_with}\n{info_without}"
    assert page_with_ext == page_without_ext, json.dumps([page_with_ext, page_without_ext], indent=1)[:3000]


def test_a1111_hypernetworks_page_with_our_extension(a1111: hh.Host, page: Any) -> None:
    """A1111's own Hypernetworks card page under txt2img lists the files, and a click inserts A1111's tag."""
    page.goto(a1111.url, wait_until="domcontentloaded")
    page.locator("#txt2img_extra_tabs > div.tab-nav > button", has_text="Hypernetworks").first.click()
    cards = page.locator("#txt2img_hypernetworks_cards_html .card")
    card = cards.and_(page.locator('[data-name="hn_a"]'))
    card.wait_for(state="visible")
    names = sorted(cards.evaluate_all("els => els.map(e => e.dataset.name)"))
    assert names == ["hn_768", "hn_a", "hn_b"]
    # A1111 reads its settings (default multiplier, tag separator) into the page's `opts` after the first UI update;
    # a click before that inserts "undefined" (a user cannot click that early).
    page.wait_for_function("() => window.opts && opts.extra_networks_default_multiplier !== undefined")
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("a cat")
    card.click()
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<hypernet:')")
    assert prompt.input_value() == "a cat <hypernet:hn_a:1>"
    card.click()  # a second click removes it again, as A1111 does
    page.wait_for_function("() => !document.querySelector('#txt2img_prompt textarea').value.includes('<hypernet:')")
    assert prompt.input_value().strip() == "a cat"
    # No page resource may be refused (a 403 on /file= means the host's JavaScript did not load).
    assert not [m for m in page.console_messages if "403" in m], page.console_messages
    # our own tab is there too, with its own ids only
    assert page.locator("#sdconcepts_root").count() == 1
