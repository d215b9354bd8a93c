"""SDXL conditioning and txt2img against diffusers' StableDiffusionXLPipeline on the same tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closeness import assert_outputs_close  # noqa: E402

from sdconcepts.backends.prompt_encoder import PromptEncoder  # noqa: E402
from sdconcepts.backends.sampling import make_scheduler, txt2img  # noqa: E402
from sdconcepts.generation import GenerationParams  # noqa: E402

PROMPT = "a red cube on green grass, studio light"
NEGATIVE = "blurry, dark"


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLPipeline

    m = tiny_sdxl
    return StableDiffusionXLPipeline(
        vae=m.vae,
        text_encoder=m.text_encoder,
        text_encoder_2=m.text_encoder_2,
        tokenizer=m.tokenizer,
        tokenizer_2=m.tokenizer_2,
        unet=m.unet,
        scheduler=make_scheduler(m, "DDIM"),
    )


def test_sdxl_conditioning_equals_diffusers_encode_prompt(tiny_sdxl, pipe) -> None:
    encoder = PromptEncoder(tiny_sdxl)
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
    ours = encoder.encode(PROMPT)
    assert ours.shape == (77, 32 + 48)
    assert_outputs_close(ours, cond[0])
    assert_outputs_close(encoder.encode(NEGATIVE), uncond[0])
    assert_outputs_close(encoder.pooled(PROMPT), pooled[0])
    assert_outputs_close(encoder.pooled(NEGATIVE), pooled_uncond[0])
    # Each encoder's half is its own penultimate layer: CLIP-L's 32 columns change when only CLIP-L's weights do.
    assert not torch.equal(ours[:, :32], ours[:, 32:64])


def test_sdxl_emphasis_is_applied_per_encoder(tiny_sdxl) -> None:
    """A1111 runs emphasis (weights, then mean restore) inside each encoder's own wrapper before concatenating."""
    encoder = PromptEncoder(tiny_sdxl)
    plain = encoder.encode("a red cube")
    weighted = encoder.encode("a (red:1.5) cube")
    for lo, hi in ((0, 32), (32, 80)):
        part = plain[:, lo:hi]
        expected = part.clone()
        expected[2] *= 1.5  # bos, "a", "red": the weight lands on the token "red"
        expected *= part.mean() / expected.mean()
        assert_outputs_close(weighted[:, lo:hi], expected)


def _ours(model, negative: str, seed: int = 11) -> np.ndarray:  # type: ignore[no-untyped-def]
    params = GenerationParams(
        prompt=PROMPT, negative_prompt=negative, steps=4, cfg_scale=6.0, seed=seed, width=64, height=64,
        sampler="DDIM",
    )
    result = txt2img(model, params)
    return np.asarray(result.images[0], dtype=np.float64) / 255


def _theirs(pipe, negative: str | None, seed: int = 11) -> np.ndarray:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        out = pipe(
            PROMPT, negative_prompt=negative, num_inference_steps=4, guidance_scale=6.0, width=64, height=64,
            generator=torch.Generator().manual_seed(seed), output_type="np",
        )
    return np.asarray(out.images[0], dtype=np.float64)


def test_sdxl_txt2img_equals_the_pipeline(tiny_sdxl, pipe) -> None:
    ours, theirs = _ours(tiny_sdxl, NEGATIVE), _theirs(pipe, NEGATIVE)
    assert ours.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= 2 / 255


def test_sdxl_empty_negative_prompt_is_zeroed(tiny_sdxl, pipe) -> None:
    """A1111 zeroes an empty negative prompt's conditioning on SDXL (diffusers does the same for no negative
    prompt, force_zeros_for_empty_prompt); encoding "" instead gives another image."""
    ours = _ours(tiny_sdxl, "")
    assert np.abs(ours - _theirs(pipe, None)).max() <= 2 / 255
    assert np.abs(ours - _theirs(pipe, "")).max() > 4 / 255


def test_sdxl_img2img_and_inpainting_run(tiny_sdxl) -> None:
    from PIL import Image

    from sdconcepts.backends.sampling import img2img

    init = Image.new("RGB", (64, 64), (200, 40, 40))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=4, cfg_scale=5.0, seed=2, width=64,
                              height=64, sampler="Euler")
    for m in (None, mask):
        result = img2img(tiny_sdxl, params, init, mask=m)
        assert result.images[0].size == (64, 64) and not result.warnings


def test_cli_generate_on_an_sdxl_single_file_with_an_sdxl_embedding(tiny_sdxl, tmp_path: Path) -> None:
    from sdconcepts import Embedding, save_embedding
    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.cli import main
    from sdconcepts.images import read_infotext

    m = tiny_sdxl
    ckpt = save_single_file(
        {"unet": m.unet, "vae": m.vae, "text_encoder": m.text_encoder, "text_encoder_2": m.text_encoder_2},
        tmp_path / "xl.safetensors",
    )
    embeddings = tmp_path / "embeddings"
    save_embedding(Embedding("xlemb", {"clip_l": torch.full((1, 32), 0.01), "clip_g": torch.full((1, 48), -0.01)}),
                   embeddings / "xlemb.safetensors")
    out = tmp_path / "out.png"
    code = main(["generate", "--ckpt", str(ckpt), "--prompt", "a xlemb cube", "--steps", "2", "--seed", "3",
                 "--width", "64", "--height", "64", "--embeddings-dir", str(embeddings), "--output", str(out),
                 "--device", "cpu"])
    assert code == 0
    info = read_infotext(out) or ""
    assert "TI hashes" in info and "xlemb" in info and "Model: xl" in info


def test_sdxl_half_precision_keeps_the_vae_in_float32(tiny_sdxl_dir: Path) -> None:
    from PIL import Image

    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.backends.sampling import img2img

    model = load_model(tiny_sdxl_dir, device="cpu", dtype=torch.float16)
    assert model.unet.dtype == torch.float16 and model.text_encoder_2.dtype == torch.float16
    assert model.vae.dtype == torch.float32  # SDXL's VAE overflows in float16
    params = GenerationParams(prompt=PROMPT, negative_prompt=NEGATIVE, steps=2, cfg_scale=5.0, seed=2, width=64,
                              height=64, sampler="Euler")
    assert txt2img(model, params).images[0].size == (64, 64)
    assert img2img(model, params, Image.new("RGB", (64, 64), (10, 200, 30))).images[0].size == (64, 64)
