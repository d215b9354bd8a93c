"""Forge on an SD 2.1 checkpoint: our Train tab trains an embedding and a hypernetwork on Forge's loaded SD 2 model
(issue 12), as it does on SD 1.5 (see host_training.py): no second copy, the host's picture unchanged, and the host's
own txt2img uses the new files at once.

Forge holds SD 2's text encoder in the transformers layout (``clip_h``), not in A1111's OpenCLIP one; our view reads
it where it is. The checkpoint is a random-weight SD 2.1 file (tests/hosts/random_checkpoint.py), 1024-wide text.
"""

from __future__ import annotations

from typing import Any

import host_harness as hh
import host_training as ht

from sdconcepts.embeddings.files import load_embedding
from sdconcepts.hypernetworks.files import load_hypernetwork

SD2_WIDTH = 1024


def test_forge_sd2_train_embedding_on_the_hosts_model(forge_sd2: hh.Host, page: Any) -> None:
    _, info = hh.txt2img(forge_sd2)
    assert "Model: sd21-random" in info, info  # the host really runs the SD 2 file
    figures, before = ht.train_in_our_tab(forge_sd2, page, "hostsd2")
    vectors = load_embedding(forge_sd2.dest / "embeddings" / "hostsd2.pt").vectors
    assert vectors.shape[-1] == SD2_WIDTH, vectors.shape
    ht.check_after_training(forge_sd2, "hostsd2", figures, before, "TI: ")


def test_forge_sd2_train_hypernetwork_on_the_hosts_model(forge_sd2: hh.Host, page: Any) -> None:
    before, _ = hh.txt2img(forge_sd2)
    seconds = ht.train_hypernetwork_in_our_tab(forge_sd2, page, "hostsd2hn")
    trained = load_hypernetwork(forge_sd2.dest / "models" / "hypernetworks" / "hostsd2hn.pt")
    # The form's modules (A1111's default 768/320/640/1280 until our view of the host's model exists, then the
    # model's own widths): those the SD 2 UNet reads were trained.
    assert trained.step == 2 and set(trained.widths) & {320, 640, 1280, SD2_WIDTH}, (trained.step, trained.widths)
    ht.check_hypernetwork_in_host(forge_sd2, "hostsd2hn", before)
    ht.report_figures(f"[forge sd2] hypernetwork: 2 steps + preview + saves {seconds:.0f} s")
