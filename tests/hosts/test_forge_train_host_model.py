"""Forge: our Train tab (Forge has none of its own) trains an embedding on Forge's loaded model (issue 12); see host_training.py."""

from __future__ import annotations

from typing import Any

import host_harness as hh
import host_training as ht


def test_forge_train_embedding_on_the_hosts_model(forge: hh.Host, page: Any) -> None:
    figures, before = ht.train_in_our_tab(forge, page, "hosttrained")
    ht.check_after_training(forge, "hosttrained", figures, before, "TI: ")
