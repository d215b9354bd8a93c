"""reForge (Panchovix, 3b56b268) with our extension, an old-Forge fork (gradio 3.41, ``ldm_patched`` + ``modules_forge``; issue 22):
hypernetworks in its own txt2img/img2img/hires pass (its own Hypernetworks page (A1111's code) lists the files; our ``hypernet`` network replaces its no-op one), and our Train tab training an embedding and a
hypernetwork on its loaded model (no second copy, its picture unchanged, its txt2img using the files at once),
interrupted and resumed; the embeddings bundled in LoRA files, which its Lora extension no longer loads, used while
the LoRA is in the prompt. See hypernetwork_checks.py, host_training.py and bundle_checks.py."""

from __future__ import annotations

from typing import Any

import bundle_checks as bc
import host_harness as hh
import host_training as ht
import hypernetwork_checks as checks


def test_reforge_starts_with_our_extension_and_applies_hypernet_tags(reforge: hh.Host) -> None:
    assert "sdconcepts" in hh.config_labels(reforge), "our tab is missing: the extension did not load"
    logged_before = len(reforge.log_text())
    figures = checks.check_tags_with_a1111s_meaning(reforge)
    checks.check_hires_pass_and_img2img(reforge)
    assert "Traceback" not in reforge.log_text()[logged_before:], reforge.log_tail()
    checks.check_warnings(reforge)
    ht.report_figures(f"[reforge] hypernet mean |diff|: one {figures['one']:.1f}, order {figures['order']:.1f}, "
                      f"negative {figures['negative']:.1f}")


def test_reforge_hypernetworks_page_click_and_warning(reforge: hh.Host, page: Any) -> None:
    checks.check_gradio3_card_page(reforge, page)


def test_reforge_train_hypernetwork_on_the_hosts_model(reforge: hh.Host, page: Any) -> None:
    before, _ = hh.txt2img(reforge)
    seconds = ht.train_hypernetwork_in_our_tab(reforge, page, "hosthn")
    ht.check_hypernetwork_in_host(reforge, "hosthn", before)
    ht.report_figures(f"[reforge] hypernetwork: 2 steps + preview + saves {seconds:.0f} s")


def test_reforge_train_interrupt_resume_an_embedding_on_the_hosts_model(reforge: hh.Host, page: Any) -> None:
    ht.report_figures(ht.interrupt_resume_and_use(reforge, page, "hostresumed", "TI hashes: "))


def test_reforge_uses_embeddings_bundled_in_the_lora_of_the_prompt(reforge: hh.Host) -> None:
    ht.report_figures(bc.check_in_forge_family(reforge))
