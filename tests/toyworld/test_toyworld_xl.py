"""The SDXL-layout toy-world model: its training recipe at tiny size, its conditioning, and the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdconcepts.toyworld import models

SHIPPED = models.XL_MODEL_DIR
needs_shipped = pytest.mark.skipif(
    not (SHIPPED / "model_index.json").is_file(), reason="the embedded SDXL toy-world model is missing"
)


def test_training_conditioning_is_diffusers_sdxl_encode_prompt() -> None:
    """What the model is trained on is what diffusers (and so the engine, tested equal to it) feeds it."""
    from diffusers import StableDiffusionXLPipeline

    from sdconcepts.toyworld.model_training import Conditioning

    torch.manual_seed(0)
    encoders = {name: module.eval() for name, module in models.build_text_encoders("sdxl").items()}
    pipe = StableDiffusionXLPipeline(
        **models.as_pipeline({"unet": models.build_unet("sdxl"), "vae": models.build_vae(), **encoders}).components,
        add_watermarker=False,
    )
    condition = Conditioning("sdxl", encoders, torch.device("cpu"))
    with torch.no_grad():
        context, added = condition(["a red circle on a teal background", "", "a photo of a ring"])
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            ["a red circle on a teal background", "a photo of a ring"],
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
        )
    assert added is not None
    assert context.shape == (3, 77, 80) and added["text_embeds"].shape == (3, models.XL_POOLED_DIM)
    torch.testing.assert_close(context[[0, 2]], cond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(added["text_embeds"][[0, 2]], pooled, rtol=1e-5, atol=1e-5)
    # The empty caption (classifier-free dropout) is zeros, as diffusers' and A1111's empty negative prompt.
    assert not context[1].any() and not added["text_embeds"][1].any()
    assert not uncond.any() and not pooled_uncond.any()
    assert added["time_ids"].tolist() == [list(models.XL_TIME_IDS)] * 3


def test_sdxl_toy_training_is_deterministic_distils_and_loads(tmp_path: Path) -> None:
    """The recipe at tiny size: VAE reused, teacher distillation, snapshots equal shorter runs, folder loads as SDXL."""
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.toyworld.model_training import TrainConfig, train

    small = {"family": "sdxl", "seed": 3, "batch": 2, "threads": 1, "vae": str(models.MODEL_DIR)}
    train(TrainConfig(steps=2, save_every=1, teacher=str(models.MODEL_DIR), **small), tmp_path / "long")
    summary = train(TrainConfig(steps=1, teacher=str(models.MODEL_DIR), **small), tmp_path / "short")
    plain = train(TrainConfig(steps=1, **small), tmp_path / "plain")
    assert summary["vae_seconds"] < 5 and summary["cpu_seconds"] > 0
    unet = "unet/diffusion_pytorch_model.safetensors"
    for part in (unet, "text_encoder/model.safetensors", "text_encoder_2/model.safetensors"):
        assert (tmp_path / "long-step1" / part).read_bytes() == (tmp_path / "short" / part).read_bytes()
    # The teacher changes the target, so the weights; the VAE is the SD-1 toy model's.
    assert (tmp_path / "plain" / unet).read_bytes() != (tmp_path / "short" / unet).read_bytes()
    assert plain["scaling_factor"] == json.loads((models.MODEL_DIR / "vae" / "config.json").read_text())[
        "scaling_factor"
    ]
    assert models.family_of(tmp_path / "long") == "sdxl"
    model = load_model(tmp_path / "long", device="cpu")
    assert model.is_sdxl and model.context_width == 80
    assert model.tokenizer_2 is not None and model.tokenizer_2.pad_token_id == 0
    images = models.generate(tmp_path / "long", ["a red circle", "a blue ring"], [1, 2], steps=2)
    assert [image.size for image in images] == [(32, 32)] * 2


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    from sdconcepts.toyworld.model_training import TrainConfig, train

    with pytest.raises(ValueError, match="unknown family"):
        train(TrainConfig(family="sd3", steps=1, batch=2, vae=str(models.MODEL_DIR)), tmp_path / "x")


def test_toyworld_xl_is_selectable_by_name() -> None:
    from sdconcepts.cli.arguments import existing_path
    from sdconcepts.ui.ui_session import XL_MODEL_LABEL, UiConfig, UiSession

    assert existing_path("toyworld-xl") == SHIPPED
    if (SHIPPED / "model_index.json").is_file():
        assert UiSession(UiConfig()).model_choices()[XL_MODEL_LABEL] == SHIPPED


@needs_shipped
def test_shipped_toyworld_xl_generates_what_the_prompt_names_in_the_engine() -> None:
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.toyworld.probe import classify

    model = load_model(SHIPPED, device="cpu")
    assert model.is_sdxl and model.name == "toyworld-xl" and model.default_size == 32
    prompts = ["a red circle on a teal background", "a yellow square on a black background"]
    found = []
    for prompt in prompts:
        result = txt2img(
            model, GenerationParams(prompt=prompt, steps=20, sampler="DDIM", cfg_scale=5, seed=11, batch_size=4)
        )
        assert [image.size for image in result.images] == [(32, 32)] * 4
        found.append(classify(result.images))
    # Colour and shape meet their bars on the eval (99.6 %, 98.8 %; the named background does not, see its
    # MODEL_CARD.md); one miss each is left for another CPU's rounding.
    assert sum(f["colour"] == "red" for f in found[0]) + sum(f["colour"] == "yellow" for f in found[1]) >= 7
    assert sum(f["shape"] == "circle" for f in found[0]) + sum(f["shape"] == "square" for f in found[1]) >= 6
