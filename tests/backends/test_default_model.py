"""The embedded toy-world model as the engine's default, and its A1111 single-file round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from closeness import assert_images_close, assert_owned_weights, pixels

from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, load_model
from sdconcepts.backends.sampling import txt2img
from sdconcepts.generation import GenerationParams
from sdconcepts.toyworld.probe import classify


@pytest.fixture(scope="module")
def default_model():  # type: ignore[no-untyped-def]
    return load_model(None, device="cpu")



def test_no_checkpoint_means_the_embedded_model(default_model) -> None:  # type: ignore[no-untyped-def]
    assert default_model.path == DEFAULT_MODEL_DIR and default_model.name == "toyworld"
    assert default_model.family == "sd1" and default_model.default_size == 32
    result = txt2img(default_model, GenerationParams(prompt="a green square on a brown background", steps=20,
                                                     sampler="DDIM", cfg_scale=5, seed=11, batch_size=4))
    attrs = classify(result.images)
    assert sum(a["shape"] == "square" and a["colour"] == "green" for a in attrs) >= 3, attrs
    assert "Model: toyworld" in result.infotexts[0]


def test_embedded_model_round_trips_through_a1111_single_file(default_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler

    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.checkpoints.files import read_checkpoint

    components = {"unet": default_model.unet, "vae": default_model.vae, "text_encoder": default_model.text_encoder,
                  "scheduler": DDIMScheduler.from_config(default_model.scheduler_config)}
    path = save_single_file(components, tmp_path / "toyworld.safetensors")
    keys = read_checkpoint(path)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    reloaded = load_model(path, device="cpu")
    params = GenerationParams(prompt="a (purple:1.1) ring, [on a gray background|on a teal background]",
                              negative_prompt="red", steps=8, sampler="Euler a", cfg_scale=6, seed=5, batch_size=2)
    for name in ("unet", "vae", "text_encoder"):
        assert_owned_weights(getattr(reloaded, name))
    assert_images_close(pixels(txt2img(reloaded, params)), pixels(txt2img(default_model, params)))
