"""Forge: our Train tab (Forge has none of its own) trains a hypernetwork on Forge's loaded model (issue 12), and an
embedding that it interrupts and resumes, then Forge's txt2img uses (no second copy, its picture unchanged); see
host_training.py."""

from __future__ import annotations

from typing import Any

import host_harness as hh
import host_training as ht


def test_forge_train_hypernetwork_on_the_hosts_model(forge: hh.Host, page: Any) -> None:
    before, _ = hh.txt2img(forge)
    seconds = ht.train_hypernetwork_in_our_tab(forge, page, "hosthn")
    # Forge's txt2img applies it through our Forge adapter.
    ht.check_hypernetwork_in_host(forge, "hosthn", before)
    print(f"[forge] hypernetwork: 2 steps + preview + saves {seconds:.0f} s")


def test_forge_train_interrupt_resume_an_embedding_on_the_hosts_model(forge: hh.Host, page: Any) -> None:
    ht.report_figures(ht.interrupt_resume_and_use(forge, page, "hostresumed", "TI: "))
