"""Embeddings bundled in LoRA files in Forge's own txt2img (Forge #345, issue 23): with ``<lora:file:w>`` in the prompt
the file's ``bundle_emb.*`` words are the bundle's vectors, the embeddings folder's word of the same name wins, the
words are gone after the generation, the infotext gets A1111's ``TI hashes`` entry, and a NaN bundle is one console
line. Files and checks: bundle_checks.py. Five 64x64 2-step pictures plus two, on the Forge launch the other Forge
tests share."""

from __future__ import annotations

import bundle_checks as bc
import host_harness as hh
import host_training as ht


def test_forge_uses_embeddings_bundled_in_the_lora_of_the_prompt(forge: hh.Host) -> None:
    logged_before = len(forge.log_text())
    results = {name: hh.txt2img(forge, **body) for name, body in bc.bundle_requests().items()}
    figures = bc.check_bundled_words(forge, results, ti_hashes=True)
    assert "Traceback" not in forge.log_text()[logged_before:], forge.log_tail()
    bc.check_bundle_lifetime_and_bad_input(forge, results["word, no lora"][0])
    ht.report_figures("[forge] bundled word mean |diff|: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
