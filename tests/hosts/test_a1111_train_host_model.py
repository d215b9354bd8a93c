"""A1111 1.10.1: our Train tab trains an embedding on A1111's loaded model (issue 12); see host_training.py."""

from __future__ import annotations

from typing import Any

import host_harness as hh
import host_training as ht


def test_a1111_train_embedding_on_the_hosts_model(a1111: hh.Host, page: Any) -> None:
    figures, before = ht.train_in_our_tab(a1111, page, "hosttrained")
    ht.check_after_training(a1111, "hosttrained", figures, before, "TI hashes: ")
