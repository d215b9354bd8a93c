"""The slow tier's style hypernetwork: one recipe, trained once per session (``toyworld_style_hypernetwork`` in
tests/conftest.py) for tests/training/test_training_learns.py and tests/backends/test_img2img_toyworld.py, which
used to train the very same file each. Training is seeded and deterministic on the CPU, so each sees the file it
would have trained itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

# 40 toy pictures with a teal background (seed 77), captions naming shape and colour; widths of the toy model.
STYLE_HYPERNETWORK: dict[str, Any] = {"name": "bgstyle", "background": "teal", "images": 40, "batch": 20,
                                      "steps": 400, "learn_rate": "0.002", "widths": (48, 32, 64)}


def train_style_hypernetwork(work: Path) -> tuple[Path, float]:
    """Train ``STYLE_HYPERNETWORK`` on the embedded toy model in ``work``: (the file, training seconds)."""
    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, load_model
    from sdconcepts.toyworld.concept import write_concept
    from sdconcepts.training import HypernetworkTrainingConfig, create_hypernetwork_file, train_hypernetwork

    spec = STYLE_HYPERNETWORK
    model = load_model(DEFAULT_MODEL_DIR, device="cpu")
    write_concept(work / "style", count=spec["images"], seed=77, background=spec["background"])
    create_hypernetwork_file(work / "hypernetworks", spec["name"], widths=spec["widths"], seed=0)
    config = HypernetworkTrainingConfig(dataset=str(work / "style"), template="filewords", width=32, height=32,
                                        batch_size=spec["batch"], max_steps=spec["steps"],
                                        learn_rate=spec["learn_rate"], save_every=0, preview_every=0,
                                        log_directory=str(work / "log"))
    start = time.perf_counter()
    list(train_hypernetwork(model, spec["name"], config, hypernetworks_dir=work / "hypernetworks"))
    return work / "hypernetworks" / f"{spec['name']}.pt", time.perf_counter() - start
