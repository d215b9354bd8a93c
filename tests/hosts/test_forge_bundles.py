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
    ht.report_figures(bc.check_in_forge_family(forge))
