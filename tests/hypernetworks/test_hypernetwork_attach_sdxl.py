"""Hypernetworks on a tiny SDXL: modules keyed by width, as A1111 keys them (the 2048-wide context on
cross-attention, 640/1280 on self-attention; 80 and 64/96 here), created for the model's widths from the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdconcepts.hypernetworks.attach import attach_hypernetworks, attention_layers
from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork


def test_sdxl_attention_widths_and_width_keyed_modules(tiny_sdxl: Any) -> None:
    layers = attention_layers(tiny_sdxl.unet)
    # Depths 1 and 2 on the two attention levels, down (2 layers each) and up (3 each), plus the mid block (2).
    assert len(layers) == 2 * (2 * 1 + 2 * 2 + 3 * 1 + 3 * 2 + 2)
    assert {(layer.cross, layer.width) for layer in layers} == {(True, 80), (False, 64), (False, 96)}
    cross = create_hypernetwork("text", (80,))
    with attach_hypernetworks(tiny_sdxl.unet, [(cross, 1.0)]) as handle:
        assert handle.layers and all(name.endswith("attn2") for name in handle.layers)
    sd1_sized = create_hypernetwork("sd1", (768, 320, 640, 1280))
    with attach_hypernetworks(tiny_sdxl.unet, [(sd1_sized, 1.0)]) as handle:
        assert handle.layers == ()


def _pixels(result: Any) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


@pytest.mark.parametrize("widths", [(80,), (64, 96)])
def test_sdxl_txt2img_applies_hypernetworks(tiny_sdxl: Any, widths: tuple[int, ...]) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.tags import resolve_in_memory

    style = create_hypernetwork("style", widths, activation="relu", weight_init="XavierNormal", generator_seed=3)

    def run(prompt: str) -> Any:
        params = GenerationParams(prompt=prompt, negative_prompt="blurry", steps=3, seed=5, sampler="Euler",
                                  cfg_scale=5.0, width=64, height=64)
        return txt2img(tiny_sdxl, params, hypernetworks=resolve_in_memory(prompt, {"style": style}, tiny_sdxl.unet))

    plain = run("a cat")
    tagged = run("a cat <hypernet:style:1>")
    assert np.abs(_pixels(tagged) - _pixels(plain)).max() > 0 and not tagged.warnings
    assert np.array_equal(_pixels(run("a cat <hypernet:style:0>")), _pixels(plain))
    assert np.array_equal(_pixels(run("a cat")), _pixels(plain))  # detached afterwards


def test_create_hypernetwork_offers_the_models_widths(tiny_sdxl_dir: Path, tmp_path: Path, capsys: Any) -> None:
    from sdconcepts.cli import main
    from sdconcepts.hypernetworks.files import load_hypernetwork

    folder = tmp_path / "hn"
    assert main(["create-hypernetwork", "xlstyle", "--sizes", "model", "--ckpt", str(tiny_sdxl_dir),
                 "--hypernetworks-dir", str(folder), "--device", "cpu"]) == 0
    made = load_hypernetwork(folder / "xlstyle.pt")
    assert sorted(made.widths) == [64, 80, 96]
    assert main(["create-hypernetwork", "realxl", "--sizes", "sdxl", "--hypernetworks-dir", str(folder)]) == 0
    assert sorted(load_hypernetwork(folder / "realxl.pt").widths) == [640, 1280, 2048]
    capsys.readouterr()
