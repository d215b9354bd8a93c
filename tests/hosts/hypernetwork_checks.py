"""``<hypernet:name:M>`` in a Forge-like host's own txt2img/img2img/hires pass (Forge, reForge, Forge-Classic: our
``hypernet`` extra network and UNet patch, ``sdconcepts.host.forge``), and the Hypernetworks card page of the
gradio 3 forks. Shared by test_forge_hypernetworks.py, test_reforge.py and test_classic.py.

The files are the harness's (``hh.HYPERNETWORKS``: hn_a linear, hn_b relu, hn_768 text only), written into
``models/hypernetworks`` before launch. Pictures are 64x64 after 2 Euler steps (hires: 96x96 after 1 more step).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import host_harness as hh
import numpy as np
from PIL import Image


def answer(host: hh.Host, path: str, **params: Any) -> tuple[np.ndarray, dict[str, Any]]:
    reply = host.request(path, {**hh.DEFAULT_TXT2IMG, **params})
    info = json.loads(reply["info"]) if isinstance(reply.get("info"), str) else reply["info"]
    return hh.decode_image(reply["images"][0]), info


def prompt_with(tags: str = "") -> str:
    return f"{hh.DEFAULT_TXT2IMG['prompt']}{tags}"


def shorthash(path: Path) -> str:
    from sdconcepts.hypernetworks.files import shorthash as file_shorthash

    return file_shorthash(path)


def check_tags_with_a1111s_meaning(host: hh.Host) -> dict[str, float]:
    """Zero = no tag, one changes the picture, stacked order matters, a negative multiplier works, the infotext names
    the file's hash, nothing leaks into the next picture. Returns the measured differences (mean |diff|)."""
    plain, plain_info = hh.txt2img(host)
    hh.assert_finite_picture(plain)
    tagged, info = hh.txt2img(host, prompt=prompt_with("<hypernet:hn_a:1>"))
    zero, _ = hh.txt2img(host, prompt=prompt_with("<hypernet:hn_a:0>"))
    figures = {"one": hh.mean_abs_diff(tagged, plain)}
    assert figures["one"] > 1.0, f"<hypernet:hn_a:1> did not change {host.kind}'s picture"
    assert np.array_equal(zero, plain), "<hypernet:hn_a:0> must give the picture without the tag"
    # The tag stays in the prompt (A1111's infotext); the file's hash comes as "Hypernet hashes" (Lora's format).
    digest = shorthash(host.hypernetwork_dir / "hn_a.pt")
    assert "<hypernet:hn_a:1>" in info and f'Hypernet hashes: "hn_a: {digest}"' in info, info
    assert "Hypernet" not in plain_info

    a_b, _ = hh.txt2img(host, prompt=prompt_with("<hypernet:hn_a:1><hypernet:hn_b:1>"))
    b_a, _ = hh.txt2img(host, prompt=prompt_with("<hypernet:hn_b:1><hypernet:hn_a:1>"))
    only_b, _ = hh.txt2img(host, prompt=prompt_with("<hypernet:hn_b:1>"))
    assert hh.mean_abs_diff(a_b, tagged) > 0.5 and hh.mean_abs_diff(a_b, only_b) > 0.5
    figures["order"] = hh.mean_abs_diff(a_b, b_a)
    assert figures["order"] > 0.1, "the order of stacked hypernetworks must matter, as in A1111"
    negative, _ = hh.txt2img(host, prompt=prompt_with("<hypernet:hn_768:-1>"))
    figures["negative"] = hh.mean_abs_diff(negative, plain)
    assert figures["negative"] > 0.5
    # Nothing leaks into the next generation.
    again, _ = hh.txt2img(host)
    assert np.array_equal(again, plain)
    return figures


def check_hires_pass_and_img2img(host: hh.Host, **hires_extra: Any) -> None:
    """A tag only in the hires prompt changes only the second pass; img2img applies a tag."""
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 1,
             "denoising_strength": 0.6, **hires_extra}
    plain, _ = answer(host, "/sdapi/v1/txt2img", **hires)
    second_only, _ = answer(host, "/sdapi/v1/txt2img", **hires, hr_prompt=prompt_with("<hypernet:hn_a:1>"))
    assert plain.shape == (96, 96, 3)
    assert hh.mean_abs_diff(second_only, plain) > 0.5, "the hires pass ignored its <hypernet:> tag"

    buffer = io.BytesIO()
    Image.fromarray(plain).save(buffer, format="PNG")
    init = base64.b64encode(buffer.getvalue()).decode()
    img2img = {"init_images": [init], "denoising_strength": 0.75, "width": 64, "height": 64}
    base, _ = answer(host, "/sdapi/v1/img2img", **img2img)
    tagged, _ = answer(host, "/sdapi/v1/img2img", **img2img, prompt=prompt_with("<hypernet:hn_a:1>"))
    assert hh.mean_abs_diff(tagged, base) > 0.5, "img2img ignored <hypernet:hn_a:1>"


def check_warnings(host: hh.Host) -> None:
    """Unknown names and files that fit no layer: the picture is the untagged one, the console says why (the API
    answer carries no comments; the page test sees them in the UI), and no traceback."""
    hh.write_hypernetwork(host.hypernetwork_dir, hh.HypernetworkSpec("hn_xl", seed=4, widths=(2048,)))
    plain, _ = hh.txt2img(host)
    image, _ = hh.txt2img(host, prompt=prompt_with("<hypernet:missing:1><hypernet:hn_xl:1>"))
    assert np.array_equal(image, plain)
    log = host.log_text().split("Startup time:", 1)[-1]
    assert "unknown hypernet 'missing'" in log, host.log_tail()
    assert "hypernet 'hn_xl' has modules for widths [2048], none of which fits" in log, host.log_tail()
    assert "Traceback" not in log, host.log_tail()


def check_gradio3_card_page(host: hh.Host, page: Any) -> None:
    """The Hypernetworks card page under txt2img (A1111's page machinery, gradio 3.41: reForge's own page, ours in
    Forge-Classic) lists the files, a click inserts ``<hypernet:name:M>`` with the host's default multiplier and a
    second click removes it; generating from the page shows an unknown name's warning under the picture."""
    page.goto(host.url, wait_until="domcontentloaded")
    page.locator("#txt2img_extra_tabs > div.tab-nav > button", has_text="Hypernetworks").first.click()
    cards = page.locator("#txt2img_hypernetworks_cards_html .card")
    card = cards.and_(page.locator('[data-name="hn_a"]'))
    card.wait_for(state="visible")
    names = set(cards.evaluate_all("els => els.map(e => e.dataset.name)"))
    assert {"hn_768", "hn_a", "hn_b"} <= names, names
    page.wait_for_function("() => window.opts && opts.extra_networks_default_multiplier !== undefined")
    multiplier = page.evaluate("() => String(opts.extra_networks_default_multiplier)")
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("a red circle")
    card.click()
    page.wait_for_function("() => document.querySelector('#txt2img_prompt textarea').value.includes('<hypernet:')")
    assert prompt.input_value() == f"a red circle <hypernet:hn_a:{multiplier}>", prompt.input_value()
    card.click()
    page.wait_for_function("() => !document.querySelector('#txt2img_prompt textarea').value.includes('<hypernet:')")
    assert not [m for m in page.console_messages if "403" in m], page.console_messages

    prompt.fill("a red circle <hypernet:missing:1>")
    # The sliders live in the Generation tab (the card pages replaced it).
    page.locator("#txt2img_extra_tabs > div.tab-nav > button", has_text="Generation").first.click()
    for slider, value in (("width", "64"), ("height", "64"), ("steps", "2")):
        field = page.locator(f"#txt2img_{slider} input[type=number]")
        field.fill(value)
        field.press("Enter")
    page.click("#txt2img_generate")
    page.wait_for_function(
        "() => (document.querySelector('#html_log_txt2img')?.innerText || '').includes(\"unknown hypernet 'missing'\")",
        timeout=600_000,
    )
