"""Hypernetworks inside the real Forge (dfdcbab6): ``<hypernet:name:M>`` in its txt2img/img2img/hires pass, the
infotext and warnings, the Hypernetworks card page, and A1111's own ``apply_hypernetworks`` as the oracle for what
our patch hands Forge's ``to_k``/``to_v``.

The files are the harness's (``hh.HYPERNETWORKS``: hn_a linear, hn_b relu, hn_768 text only), written into
``models/hypernetworks`` before launch. Pictures are 64x64 after 2 Euler steps (hires: 96x96 after 1 more step).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import host_harness as hh
import hypernetwork_checks as checks
import pytest
import torch


def test_forge_applies_hypernet_tags_with_a1111s_meaning(forge: hh.Host) -> None:
    checks.check_tags_with_a1111s_meaning(forge)


def test_forge_hires_pass_and_img2img_apply_the_tag(forge: hh.Host) -> None:
    checks.check_hires_pass_and_img2img(forge, hr_additional_modules=["Use same choices"])  # Forge API: None fails


def test_forge_warns_about_unknown_names_and_files_that_fit_no_layer(forge: hh.Host) -> None:
    checks.check_warnings(forge)


_FORGE_SIDE = textwrap.dedent(
    """
    import sys, types, torch
    tree, extension, out, *files = sys.argv[1:]
    sys.argv = [sys.argv[0], "--always-cpu"]
    sys.path[:0] = [tree, tree + "/packages_3rdparty", extension]
    from backend.nn.unet import BasicTransformerBlock
    from backend.patcher.base import ModelPatcher
    from sdconcepts.host import forge

    torch.manual_seed(0)
    block = BasicTransformerBlock(320, 5, 64, context_dim=768, checkpoint=False).eval()
    patcher = ModelPatcher(block, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    loaded = forge.ForgeHypernetworks()
    chain = [(loaded.load(__import__("pathlib").Path(f), torch.device("cpu")), m) for f, m in zip(files[::2], map(float, files[1::2]))]
    p = types.SimpleNamespace(sd_model=types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=patcher)))
    setattr(p, forge.STATE_ATTRIBUTE, chain)
    assert forge.patch_unet(p)
    patched = p.sd_model.forge_objects.unet
    assert patched is not patcher and patcher.model_options["transformer_options"] == {}, "the patch leaked"
    seen = {}
    def keep(name):
        def hook(module, args, *rest):
            seen[name] = (rest[0] if rest else args[0]).detach().clone()
        return hook
    block.norm1.register_forward_hook(keep("hidden"))
    for attn in ("attn1", "attn2"):
        for proj in ("to_k", "to_v"):
            getattr(getattr(block, attn), proj).register_forward_pre_hook(keep(attn + "." + proj))
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 64, 320, generator=g), torch.randn(2, 77, 768, generator=g)
    with torch.inference_mode():
        block(x, context=text, transformer_options=patched.model_options["transformer_options"])
    seen["text"] = text
    from safetensors.torch import save_file  # A1111's restricted torch.load rejects new torch zip entries
    save_file({k: v.contiguous() for k, v in seen.items()}, out)
    """
)

_A1111_SIDE = textwrap.dedent(
    """
    import sys, torch
    tree, inputs, out, *files = sys.argv[1:]
    sys.argv = [sys.argv[0], "--use-cpu", "all", "--no-half", "--skip-torch-cuda-test"]
    sys.path.insert(0, tree)
    from modules import initialize
    initialize.imports()
    from modules.hypernetworks import hypernetwork as H
    chain = []
    for f, m in zip(files[::2], map(float, files[1::2])):
        h = H.Hypernetwork()
        h.load(f)
        h.set_multiplier(m)
        chain.append(h)
    from safetensors.torch import load_file, save_file
    seen = load_file(inputs)
    result = {}
    with torch.no_grad():
        for name, chained, context in (("self", chain, seen["hidden"]), ("cross", chain, seen["text"]),
                                       ("cross_reversed", chain[::-1], seen["text"])):
            result[name + ".key"], result[name + ".value"] = H.apply_hypernetworks(chained, context)
    save_file({k: v.contiguous() for k, v in result.items()}, out)
    """
)


def _run(python: Path, cwd: Path, script: str, *args: str) -> None:
    done = subprocess.run(
        [str(python), "-c", script, *args], cwd=cwd, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, f"{python} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def test_forge_patch_gives_a1111s_key_and_value_inputs(host_manager: hh.HostManager, tmp_path: Path) -> None:
    """Forge's own BasicTransformerBlock and ModelPatcher run our patch (from the installed extension); A1111's own
    ``apply_hypernetworks`` (its venv, its tree) computes the same inputs from the same files: equal within fp32."""
    for kind in ("forge", "a1111"):
        if kind not in host_manager.dirs:
            pytest.skip(f"{kind} not prepared")
    forge_tree, a1111_tree = host_manager.dirs["forge"], host_manager.dirs["a1111"]
    files: list[str] = []
    for spec, strength in ((hh.HypernetworkSpec("hn_a", seed=1), "0.7"),
                           (hh.HypernetworkSpec("hn_b", seed=2, activation="relu"), "-0.4")):
        files += [str(hh.write_hypernetwork(tmp_path, spec)), strength]
    from safetensors.torch import load_file

    forge_out, a1111_out = tmp_path / "forge.safetensors", tmp_path / "a1111.safetensors"
    _run(forge_tree / "venv/bin/python", forge_tree, _FORGE_SIDE, str(forge_tree),
         str(forge_tree / "extensions" / "sdconcepts"), str(forge_out), *files)
    _run(a1111_tree / "venv/bin/python", a1111_tree, _A1111_SIDE, str(a1111_tree), str(forge_out), str(a1111_out), *files)
    ours, oracle = load_file(forge_out), load_file(a1111_out)
    for attn, kind in (("attn1", "self"), ("attn2", "cross")):
        key, value = oracle[kind + ".key"], oracle[kind + ".value"]
        assert not torch.equal(key, ours["hidden" if kind == "self" else "text"])
        torch.testing.assert_close(ours[f"{attn}.to_k"], key, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours[f"{attn}.to_v"], value, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(oracle["cross_reversed.key"], ours["attn2.to_k"]), "order must matter"


def test_forge_hypernetworks_page_lists_files_and_click_toggles_the_tag(forge: hh.Host, page: Any) -> None:
    # A file that fits no layer of the loaded SD 1.5 model is marked on its card (a generation loads the model).
    hh.write_hypernetwork(forge.hypernetwork_dir, hh.HypernetworkSpec("hn_xl", seed=4, widths=(2048,)))
    hh.txt2img(forge, prompt=checks.prompt_with())
    page.goto(forge.url)
    prompt = page.wait_for_selector("#txt2img_prompt textarea")
    page.click("#txt2img_hypernetworks-button")
    cards = "#txt2img_hypernetworks_cards_html .card"
    page.wait_for_selector(f'{cards}[data-name="hn_a"]')
    names = page.eval_on_selector_all(cards, "els => els.map(e => e.dataset.name)")
    assert {spec.name for spec in hh.HYPERNETWORKS} <= set(names), names
    # Forge keeps the cards it listed at its first page load: its Refresh lists them again, with the loaded model.
    page.click("#txt2img_hypernetworks_extra_refresh")
    page.wait_for_function(
        "sel => (document.querySelector(sel)?.textContent || '').includes('Fits no attention layer')",
        arg=f'{cards}[data-name="hn_xl"]',
    )
    xl_text = page.locator(f'{cards}[data-name="hn_xl"]').first.text_content() or ""
    assert "of the loaded model" in xl_text and "[2048]" in xl_text, xl_text
    assert "Fits no" not in (page.locator(f'{cards}[data-name="hn_a"]').first.text_content() or "")
    page.wait_for_timeout(2000)  # the host binds the cards' clicks after rendering them
    page.click(f'{cards}[data-name="hn_a"]')
    page.wait_for_function("el => el.value.includes('<hypernet:hn_a:')", arg=prompt)
    multiplier = page.evaluate("() => String(opts.extra_networks_default_multiplier)")  # the host's setting
    assert f"<hypernet:hn_a:{multiplier}>" in prompt.input_value(), (multiplier, prompt.input_value())
    page.click(f'{cards}[data-name="hn_a"]')
    page.wait_for_function("el => !el.value.includes('<hypernet:hn_a')", arg=prompt)
    # Search narrows the cards like the host's other pages.
    page.fill("#txt2img_hypernetworks_extra_search", "hn_768")
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].filter(e => e.offsetParent !== null).map(e => e.dataset.name).join() === 'hn_768'",
        arg=cards,
    )
    # Generate from the page: the warning for an unknown name shows under the picture (the comments, #html_log_).
    page.fill("#txt2img_prompt textarea", "a red circle <hypernet:missing:1>")
    page.locator("#tab_txt2img").get_by_role("tab", name="Generation").click()  # the sliders live there
    for slider, value in (("width", "64"), ("height", "64"), ("steps", "2")):
        field = page.locator(f"#txt2img_{slider} input[type=number]")
        field.fill(value)
        field.press("Enter")
    page.click("#txt2img_generate")
    page.wait_for_function(
        "() => (document.querySelector('#html_log_txt2img')?.innerText || '').includes(\"unknown hypernet 'missing'\")"
    )


_TOO_MANY = "Too many arguments provided for the endpoint"


def test_forge_console_gets_no_argument_warnings_from_our_events(forge: hh.Host, page: Any) -> None:
    """Forge's gradio 4 page logs "Too many arguments..." once per submitted event that carries data and that /info
    does not describe by id: Forge's own events do (e.g. its checkpoint dropdown's change), ours (open our tab,
    Refresh models, Train, Inspect) must not. So during each of our actions the warnings must not outnumber the
    data-carrying submissions of events that are not ours (ours: an input whose elem_id starts with sdconcepts_).
    Train and Inspect are sent without a file chosen so they answer at once (one line) instead of training; the
    events are submitted all the same."""
    config = forge.request("/config")
    elem_ids = {c["id"]: str(c.get("props", {}).get("elem_id") or "") for c in config["components"]}
    ours = {d["id"] for d in config["dependencies"] if any(elem_ids.get(i, "").startswith("sdconcepts_") for i in d["inputs"])}
    submitted: list[tuple[int, int]] = []

    def on_request(request: Any) -> None:
        if request.method == "POST" and "/queue/join" in request.url:
            body = json.loads(request.post_data or "{}")
            submitted.append((int(body.get("fn_index", -1)), len(body.get("data") or [])))

    page.on("request", on_request)
    page.goto(forge.url)
    page.wait_for_selector("#txt2img_prompt textarea")
    page.wait_for_timeout(5000)

    def count() -> int:
        return sum(_TOO_MANY in message for message in page.console_messages)

    def our(action: Any, wait_for: str | None = None, *, submits_ours: bool = True) -> None:
        before, sent = count(), len(submitted)
        action()
        if wait_for:
            page.wait_for_function(wait_for)
        page.wait_for_timeout(4000)
        window = submitted[sent:]
        assert not submits_ours or any(fn in ours for fn, _ in window), f"none of our events was submitted: {window}"
        others = sum(1 for fn, n in window if fn not in ours and n)
        assert count() - before <= others, (window, [m for m in page.console_messages if _TOO_MANY in m])

    # Opening the tab may or may not catch our page-load chain (cards, train names) still in flight.
    our(lambda: page.get_by_role("tab", name="sdconcepts").first.click(), submits_ours=False)
    our(lambda: page.click("#sdconcepts_model_refresh"))
    # Train with no embedding chosen, and Inspect with no name: both answer at once with one line.
    page.locator("#sdconcepts_tabs").get_by_role("tab", name="Train", exact=True).first.click()
    page.locator("#sdconcepts_train_tabs").get_by_role("tab", name="Train", exact=True).first.click()
    our(lambda: page.click("#sdconcepts_train_ti_button"),
        "() => [...document.querySelectorAll('#sdconcepts_train_message, [id^=sdconcepts_train_err_]')]"
        ".some(e => e.innerText.trim().length > 0)")
    page.locator("#sdconcepts_tabs").get_by_role("tab", name="Embedding tools").first.click()
    our(lambda: page.click("#sdconcepts_ti_tools_inspect"),
        "() => (document.querySelector('#sdconcepts_ti_tools_report')?.innerText || '').trim().length > 0")
