"""A1111 1.10.1: our Train tab trains a hypernetwork on A1111's loaded model (issue 12), and an embedding that it
interrupts and resumes, then A1111's txt2img uses (no second copy, its picture unchanged); see host_training.py."""

from __future__ import annotations

from typing import Any

import host_harness as hh
import host_training as ht
import numpy as np


def test_a1111_train_hypernetwork_on_the_hosts_model(a1111: hh.Host, page: Any) -> None:
    before, _ = hh.txt2img(a1111)
    seconds = ht.train_hypernetwork_in_our_tab(a1111, page, "hosthn")
    after, _ = hh.txt2img(a1111)
    assert after.tobytes() == before.tobytes(), "the host's picture changed after training a hypernetwork on its model"
    # A1111's own list knows the new file at once (we made it rescan its folder after the save).
    assert "hosthn" in [item["name"] for item in a1111.request("/sdapi/v1/hypernetworks")]
    tagged, info = hh.txt2img(a1111, prompt=f"{hh.DEFAULT_TXT2IMG['prompt']} <hypernet:hosthn:1>")
    hh.assert_finite_picture(tagged)
    assert "<hypernet:hosthn:1>" in info and not np.array_equal(tagged, after), info
    print(f"[a1111] hypernetwork: 2 steps + preview + saves {seconds:.0f} s")


def test_a1111_train_interrupt_resume_an_embedding_on_the_hosts_model(a1111: hh.Host, page: Any) -> None:
    ht.report_figures(ht.interrupt_resume_and_use(a1111, page, "hostresumed", "TI hashes: "))
