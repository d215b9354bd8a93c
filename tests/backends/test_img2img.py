"""img2img and inpainting: A1111's step arithmetic, resize modes, mask handling, paste-back and infotext, on tiny models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from closeness import assert_images_close, pixels
from PIL import Image

from sdconcepts.backends.model_loading import load_model
from sdconcepts.backends.sampler_start import InitLatents, is_inpainting_model, keep_denoised
from sdconcepts.backends.sampling import img2img, make_scheduler, txt2img
from sdconcepts.generation import GenerationError, GenerationParams, parse_infotext
from sdconcepts.img2img import (
    Img2ImgOptions,
    binary_mask,
    blur_mask,
    crop_region,
    expand_crop_region,
    gaussian_kernel,
    img2img_steps,
    prepare_init,
    resize_image,
)


def _noise_image(size: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _box_mask(size: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (size, size))
    mask.paste(255, box)
    return mask


def _params(**kwargs: Any) -> GenerationParams:
    kwargs = {"prompt": "a red circle", "steps": 4, "seed": 3, "sampler": "Euler", "cfg_scale": 5.0, **kwargs}
    return GenerationParams(**kwargs)


# ---- the pure half -----------------------------------------------------------------------------------------------


def test_step_arithmetic_is_a1111s() -> None:
    # (first step, steps run): A1111 runs int(min(strength, 0.999) * steps) + 1 of a `steps` schedule.
    assert img2img_steps(20, 0.75) == (4, 16)
    assert img2img_steps(20, 1.0) == (0, 20)
    assert img2img_steps(20, 0.0) == (19, 1)
    assert img2img_steps(10, 0.5) == (4, 6)
    assert img2img_steps(7, 0.3) == (4, 3)


def test_resize_modes_against_hand_computed_results() -> None:
    # A 4x2 image whose four columns have distinct colours.
    columns = np.array([[10, 0, 0], [20, 0, 0], [30, 0, 0], [40, 0, 0]], dtype=np.uint8)
    wide = Image.fromarray(np.repeat(columns[None], 2, axis=0))
    assert wide.size == (4, 2)
    # Crop and resize to 2x2: the height fits, the width stays 4 and the centre two columns remain.
    cropped = np.asarray(resize_image(wide, 2, 2, "Crop and resize"))
    assert np.array_equal(cropped, np.asarray(wide)[:, 1:3])
    # Resize and fill a 2x4 (tall) image to 4x4: centred, the margins repeat the outer columns.
    tall = Image.fromarray(np.repeat(np.array([[[5, 0, 0], [9, 0, 0]]], dtype=np.uint8), 4, axis=0))
    filled = np.asarray(resize_image(tall, 4, 4, "Resize and fill"))
    red = filled[:, :, 0].astype(int)
    assert red[:, :3].tolist() == [[5, 5, 9]] * 4
    # The right margin is Lanczos sampled at the image's far edge (zero-width box, as A1111): the edge, +-1 ringing.
    assert np.abs(red[:, 3] - 9).max() <= 1
    # Just resize to the same size is the image itself; other sizes stretch.
    assert np.array_equal(np.asarray(resize_image(wide, 4, 2, "Just resize")), np.asarray(wide))
    assert resize_image(wide, 8, 8, "Just resize").size == (8, 8)
    # Crop and resize of a 100x50 image to 64x64 scales it to 128x64 and keeps the middle.
    halves = Image.new("RGB", (100, 50), (255, 0, 0))
    halves.paste((0, 0, 255), (50, 0, 100, 50))
    middle = np.asarray(resize_image(halves, 64, 64, "Crop and resize"))
    assert middle.shape == (64, 64, 3)
    assert tuple(middle[32, 5]) == (255, 0, 0) and tuple(middle[32, 58]) == (0, 0, 255)
    with pytest.raises(GenerationError, match="unknown resize mode"):
        resize_image(wide, 4, 4, "Stretch")


def test_extreme_aspect_ratios_resize_without_a_huge_intermediate() -> None:
    # A 1×2,000,000 picture (4 KB as a PNG) "Crop and resize"d to 64×64 went through a 64×128,000,000 intermediate
    # and ran out of memory; only the visible window is resampled now. Its pixels are the middle rows of the picture.
    rows = np.zeros((2_000_000, 1, 3), dtype=np.uint8)
    rows[:1_000_000] = (200, 0, 0)
    rows[1_000_000:] = (0, 0, 200)
    tall = Image.fromarray(rows)
    out = np.asarray(resize_image(tall, 64, 64, "Crop and resize")).astype(int)
    assert out.shape == (64, 64, 3)
    # The window is one source row each side of the red/blue boundary, magnified 64 times: red above, blue below.
    assert out[0, :, 0].min() >= 190 and out[-1, :, 2].min() >= 190 and out[0, :, 2].max() <= 10
    # The window path gives what resizing the whole picture gives, where both can run: on noise (the worst case for
    # the rounding between PIL's two passes) the mean difference is under one grey level.
    mid = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1500, 7, 3), dtype=np.uint8))
    whole = mid.resize((32, 1500 * 32 // 7), resample=Image.Resampling.LANCZOS)
    top = (1500 * 32 // 7) // 2 - 16
    expected = np.asarray(whole.crop((0, top, 32, top + 32))).astype(int)
    assert np.abs(np.asarray(resize_image(mid, 32, 32, "Crop and resize")).astype(int) - expected).mean() < 1.0
    # "Resize and fill" of a 1×5000 picture was 0 pixels wide (a traceback): one column, stretched into the margins.
    filled = resize_image(Image.new("RGB", (1, 5000), (9, 99, 199)), 64, 64, "Resize and fill")
    assert filled.size == (64, 64) and np.abs(np.asarray(filled).astype(int) - (9, 99, 199)).max() <= 1


def test_mask_blur_is_bounded_by_a1111s_slider() -> None:
    assert Img2ImgOptions(mask_blur=64).validated().mask_blur == 64
    with pytest.raises(GenerationError, match="mask blur must be between 0 and 64"):
        Img2ImgOptions(mask_blur=200_000).validated()  # 77 s and 2 GB; 1e9 asked for 37 GiB


def test_mask_binarisation_blur_and_crop_region() -> None:
    # A drawn mask (RGBA with transparency) is its alpha thresholded at 128; an opaque one is its luminance.
    drawn = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    drawn.putpixel((1, 0), (0, 0, 0, 128))
    drawn.putpixel((2, 0), (0, 0, 0, 129))
    assert np.asarray(binary_mask(drawn)).ravel().tolist() == [0, 0, 255, 0]
    assert np.asarray(binary_mask(Image.new("RGB", (2, 1), (100, 100, 100)))).ravel().tolist() == [100, 100]
    # OpenCV's kernel: size 2 * int(2.5 * sigma + 0.5) + 1.
    assert len(gaussian_kernel(4)) == 21 and len(gaussian_kernel(1)) == 7
    assert gaussian_kernel(1)[3] == pytest.approx(1 / np.sum(np.exp(-(np.arange(-3, 4) ** 2) / 2)))
    dot = _box_mask(15, (7, 7, 8, 8))
    assert blur_mask(dot, 0) is dot
    blurred = np.asarray(blur_mask(dot, 1), dtype=np.int32)
    assert blurred[7, 7] == blurred.max() and np.array_equal(blurred, blurred.T)
    assert np.array_equal(blurred, blurred[::-1, ::-1])
    # A1111: bounding box plus padding, clipped; then grown to the processing aspect ratio.
    mask = _box_mask(64, (10, 20, 20, 25))
    assert crop_region(mask, 4) == (6, 16, 24, 29)
    assert expand_crop_region((6, 16, 24, 29), 32, 32, 64, 64) == (6, 14, 24, 32)
    assert expand_crop_region((0, 60, 10, 64), 32, 32, 64, 64) == (0, 54, 10, 64)  # grown to 10 high, slid back inside
    assert crop_region(Image.new("L", (8, 8)), 4) is None


def test_prepare_writes_a1111s_infotext_fields_only_when_it_does() -> None:
    image, mask = _noise_image(64), _box_mask(64, (20, 20, 40, 40))
    plain = prepare_init(image, None, 32, 32, Img2ImgOptions(denoising_strength=0.5))
    assert plain.infotext == {"Denoising strength": "0.5"} and plain.mask is None and plain.image.size == (32, 32)
    default = prepare_init(image, mask, 32, 32, Img2ImgOptions())
    assert default.infotext == {"Denoising strength": "0.75", "Mask blur": "4"}
    every = prepare_init(image, mask, 32, 32, Img2ImgOptions(
        denoising_strength=1, mask_blur=2, invert_mask=True, inpaint_full_res=True, inpaint_padding=8,
        inpainting_fill="latent nothing"))
    assert every.infotext == {
        "Denoising strength": "1.0", "Mask mode": "Inpaint not masked", "Mask blur": "2",
        "Inpaint area": "Only masked", "Masked area padding": "8", "Masked content": "latent nothing",
    }
    filled = prepare_init(image, mask, 32, 32, Img2ImgOptions(mask_blur=0, inpainting_fill="fill"))
    assert filled.infotext["Masked content"] == "fill"
    # The fill changes the masked area only.
    before, after = np.asarray(resize_image(image, 32, 32, "Just resize")), np.asarray(filled.image)
    inside = np.asarray(filled.mask) > 0
    assert np.array_equal(before[~inside], after[~inside]) and not np.array_equal(before[inside], after[inside])
    blank = prepare_init(image, Image.new("L", (64, 64)), 32, 32, Img2ImgOptions(inpaint_full_res=True))
    assert blank.mask is None and blank.warnings


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"denoising_strength": 1.5}, "denoising strength"),
        ({"resize_mode": "Stretch"}, "resize mode"),
        ({"inpainting_fill": "blur"}, "masked content"),
        ({"mask_blur": -1}, "mask blur"),
        ({"inpaint_padding": -2}, "padding"),
    ],
)
def test_bad_options_are_one_line_errors(bad: dict[str, Any], message: str) -> None:
    with pytest.raises(GenerationError, match=message) as info:
        Img2ImgOptions(**bad).validated()
    assert "\n" not in str(info.value)


# ---- sampling ----------------------------------------------------------------------------------------------------


def test_strength_sets_the_steps_run_and_how_far_from_the_init(tiny_model: Any) -> None:
    from sdconcepts.backends.sampler_start import encode_pixels, image_pixels
    from sdconcepts.backends.sampling import decode_latents

    image = _noise_image()
    calls: list[int] = []
    result = img2img(tiny_model, _params(steps=20), image, options=Img2ImgOptions(denoising_strength=0.75),
                     progress=lambda done, total: calls.append(total))
    assert len(calls) == 16 and calls[0] == 16
    assert parse_infotext(result.infotexts[0])[2]["Denoising strength"] == "0.75"
    assert parse_infotext(result.infotexts[0])[2]["Steps"] == "20"
    # Strength 0 runs one step at the smallest noise level: much nearer the VAE round trip of the init image than
    # strength 1 (the tiny VAE's latents are small, so even the smallest noise level shows).
    round_trip = np.asarray(decode_latents(tiny_model, encode_pixels(tiny_model, image_pixels(image, tiny_model)))[0],
                            dtype=np.int16)
    distance = {}
    for strength in (0.0, 1.0):
        out = img2img(tiny_model, _params(steps=10), image, options=Img2ImgOptions(denoising_strength=strength))
        distance[strength] = float(np.abs(pixels(out)[0] - round_trip).mean())
    assert distance[0.0] < 0.6 * distance[1.0]


def test_seeds_and_batches_as_txt2img(tiny_model: Any) -> None:
    image = _noise_image()
    options = Img2ImgOptions(denoising_strength=0.6)
    batch = img2img(tiny_model, _params(seed=10, batch_size=2, sampler="Euler a"), image, options=options)
    assert batch.seeds == [10, 11]
    single = img2img(tiny_model, _params(seed=11, sampler="Euler a"), image, options=options)
    assert_images_close(pixels(single)[0], pixels(batch)[1])
    other = img2img(tiny_model, _params(seed=12, sampler="Euler a"), image, options=options)
    assert np.abs(pixels(other)[0] - pixels(single)[0]).max() > 0


@pytest.mark.parametrize("sampler", ["Euler a", "Euler", "Heun", "DPM2", "DPM++ 2M", "DDIM", "PLMS", "UniPC"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_each_step_keeps_the_init_latents_outside_the_mask(tiny_model: Any, sampler: str, prediction_type: str) -> None:
    """The blended output's denoised estimate (as the scheduler itself computes it) is the init latents there."""
    scheduler = make_scheduler(tiny_model, sampler)
    scheduler.register_to_config(prediction_type=prediction_type)
    scheduler.set_timesteps(10)
    torch.manual_seed(0)
    init_latents = torch.randn(1, 4, 8, 8)
    keep = torch.zeros(1, 1, 8, 8)
    keep[..., :4] = 1
    init = InitLatents(init_latents, first_step=3, keep=keep)
    from sdconcepts.backends.sampler_start import noised_init

    latents, timesteps = noised_init(scheduler, init, torch.randn(1, 4, 8, 8))
    t = timesteps[0]
    output = torch.randn(1, 4, 8, 8)
    scheduler.scale_model_input(latents, t)
    blended = keep_denoised(scheduler, t, latents, output, init, prediction_type)
    assert torch.equal(blended[..., 4:], output[..., 4:])
    if sampler in ("PLMS", "DPM++ 2M", "UniPC"):
        # These schedulers do not report their estimate; convert as the deterministic DDIM formula does.
        alpha = scheduler.alphas_cumprod[int(t)] if sampler == "PLMS" else \
            1 / (1 + scheduler.sigmas[scheduler.begin_index] ** 2)
        a, b = alpha.sqrt(), (1 - alpha).sqrt()
        x0 = (latents - b * blended) / a if prediction_type == "epsilon" else a * latents - b * blended
    else:
        x0 = scheduler.step(blended, t, latents).pred_original_sample
    torch.testing.assert_close(x0[..., :4], init_latents[..., :4], rtol=1e-4, atol=1e-4)


def test_inpaint_pastes_back_the_original_exactly_outside_the_mask(tiny_model: Any) -> None:
    image = _noise_image(64, seed=1)
    mask = _box_mask(64, (16, 16, 40, 40))
    outside = np.asarray(mask) == 0
    for full_res in (False, True):
        options = Img2ImgOptions(mask_blur=0, inpainting_fill="original", inpaint_full_res=full_res,
                                 inpaint_padding=4, denoising_strength=0.9)
        result = img2img(tiny_model, _params(width=64, height=64) if not full_res else _params(), image, mask=mask,
                         options=options)
        got = np.asarray(result.images[0])
        assert got.shape == (64, 64, 3)
        assert np.array_equal(got[outside], np.asarray(image)[outside]), f"only masked: {full_res}"
        assert np.abs(got[~outside].astype(int) - np.asarray(image)[~outside]).mean() > 10
    # Inverting the mask regenerates the outside and keeps the inside.
    inverted = img2img(tiny_model, _params(width=64, height=64), image, mask=mask,
                       options=Img2ImgOptions(mask_blur=0, invert_mask=True))
    assert np.array_equal(np.asarray(inverted.images[0])[~outside], np.asarray(image)[~outside])


@pytest.mark.parametrize("fill", ["fill", "latent noise", "latent nothing"])
def test_masked_content_modes_run_and_are_recorded(tiny_model: Any, fill: str) -> None:
    image, mask = _noise_image(), _box_mask(32, (8, 8, 24, 24))
    options = Img2ImgOptions(mask_blur=0, inpainting_fill=fill)
    result = img2img(tiny_model, _params(batch_size=2), image, mask=mask, options=options)
    original = img2img(tiny_model, _params(batch_size=2), image, mask=mask, options=Img2ImgOptions(mask_blur=0))
    assert parse_infotext(result.infotexts[1])[2]["Masked content"] == fill
    assert "Masked content" not in parse_infotext(original.infotexts[0])[2]
    assert np.abs(pixels(result) - pixels(original)).max() > 0


def test_a_mask_of_another_size_is_resized(tiny_model: Any) -> None:
    image = _noise_image(32)
    mask = _box_mask(64, (0, 0, 32, 64))  # the left half, at twice the size
    result = img2img(tiny_model, _params(), image, mask=mask, options=Img2ImgOptions(mask_blur=0))
    got, want = np.asarray(result.images[0]), np.asarray(image)
    # Lanczos rings a few pixels past the resized edge; beyond that the original is pasted back exactly.
    assert np.array_equal(got[:, 20:], want[:, 20:]) and not np.array_equal(got[:, :14], want[:, :14])


def test_embeddings_and_hypernetworks_apply_in_img2img(tiny_model: Any) -> None:
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork
    from sdconcepts.hypernetworks.tags import resolve_in_memory

    image, mask = _noise_image(), _box_mask(32, (8, 8, 24, 24))
    vectors = {name: torch.randn(2, 48, generator=torch.Generator().manual_seed(i)) * 0.02
               for i, name in enumerate(("glowword", "darkword"))}
    hypernetworks = {"style": create_hypernetwork("style", (48, 32, 64), generator_seed=5, weight_init="XavierNormal")}

    def run(prompt: str, embeddings: dict[str, torch.Tensor]) -> Any:
        return img2img(tiny_model, _params(prompt=prompt), image, mask=mask, options=Img2ImgOptions(mask_blur=0),
                       embeddings={"myword": embeddings["myword"]},
                       hypernetworks=resolve_in_memory(prompt, hypernetworks, tiny_model.unet))

    one = run("a myword circle", {"myword": vectors["glowword"]})
    two = run("a myword circle", {"myword": vectors["darkword"]})
    assert np.abs(pixels(one) - pixels(two)).max() > 0
    styled = run("a myword circle <hypernet:style:1>", {"myword": vectors["glowword"]})
    assert np.abs(pixels(styled) - pixels(one)).max() > 0 and not styled.warnings
    assert "<hypernet:style:1>" in styled.infotexts[0]
    outside = np.asarray(mask) == 0
    assert np.array_equal(pixels(styled)[0][outside], pixels(one)[0][outside])
    assert all(len(m._forward_pre_hooks) == 0 for m in tiny_model.unet.modules())


def test_bad_inputs_are_one_line_errors(tiny_model: Any) -> None:
    image = _noise_image()
    with pytest.raises(GenerationError, match="denoising strength") as info:
        img2img(tiny_model, _params(), image, options=Img2ImgOptions(denoising_strength=-0.1))
    assert "\n" not in str(info.value)
    with pytest.raises(GenerationError, match="init image"):
        img2img(tiny_model, _params(), None)  # type: ignore[arg-type]
    with pytest.raises(GenerationError, match="multiples of 32"):
        img2img(tiny_model, _params(width=40), image)


# ---- inpainting checkpoints --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpainting_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdconcepts.backends.tiny import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("inpaint") / "tiny-inpainting", in_channels=9)


def test_inpainting_checkpoint_is_detected_and_conditioned(inpainting_dir: Path, tmp_path: Path) -> None:
    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.backends.tiny import build_tiny_sd1

    model = load_model(inpainting_dir, device="cpu")
    assert is_inpainting_model(model) and int(model.unet.config.in_channels) == 9
    image, mask = _noise_image(), _box_mask(32, (8, 8, 24, 24))
    result = img2img(model, _params(), image, mask=mask, options=Img2ImgOptions(mask_blur=0))
    fields = parse_infotext(result.infotexts[0])[2]
    assert fields["Conditional mask weight"] == "1.0" and list(fields).index("Conditional mask weight") == \
        list(fields).index("Denoising strength") + 1
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result.images[0])[outside], np.asarray(image)[outside])
    # The mask reaches the UNet's extra channels: a lower mask weight shows more of the image under the mask.
    weaker = img2img(model, _params(), image, mask=mask, options=Img2ImgOptions(mask_blur=0, mask_weight=0.0))
    assert np.abs(pixels(weaker) - pixels(result)).max() > 0
    # txt2img on an inpainting checkpoint gets A1111's all-masked conditioning instead of failing.
    assert txt2img(model, _params()).images[0].size == (32, 32)
    # A single-file inpainting checkpoint is detected from its weights too.
    path = save_single_file(build_tiny_sd1(in_channels=9), tmp_path / "inpaint.safetensors")
    assert is_inpainting_model(load_model(path, device="cpu"))


# ---- the command line --------------------------------------------------------------------------------------------


def test_cli_img2img_inpaints_and_writes_infotext(tiny_model_dir: Path, tmp_path: Path) -> None:
    from cli_process import run_cli

    from sdconcepts.images import read_infotext

    image = _noise_image(48, seed=4)
    image.save(tmp_path / "init.png")
    _box_mask(96, (24, 24, 60, 60)).save(tmp_path / "mask.png")  # another size: resized as the image
    out = tmp_path / "out"
    proc = run_cli("img2img", "--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"), "--mask",
                   str(tmp_path / "mask.png"), "--mask-blur", "0", "--inpaint-full-res", "--inpaint-padding", "2",
                   "--inpainting-fill", "latent-nothing", "--denoising-strength", "0.5", "--steps", "4",
                   "--sampler", "DDIM", "--seed", "7", "--batch-size", "2", "--ckpt", str(tiny_model_dir),
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-7.png", "00001-8.png"]
    prompt, _, fields = parse_infotext(read_infotext(files[1]) or "")
    assert prompt == "a red circle" and fields["Seed"] == "8" and fields["Size"] == "32x32"
    assert fields["Denoising strength"] == "0.5" and fields["Inpaint area"] == "Only masked"
    assert fields["Masked area padding"] == "2" and fields["Masked content"] == "latent nothing"
    assert "Mask blur" not in fields
    with Image.open(files[0]) as result:
        got = np.asarray(result.convert("RGB"))
    assert got.shape == (48, 48, 3)  # "only masked" pastes back into the init image's size
    assert np.array_equal(got[:8], np.asarray(image)[:8])


def test_cli_img2img_help_and_one_line_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    from cli_process import run_cli

    proc = run_cli("img2img", "--help")
    for option in ("--prompt", "--steps", "--sampler", "--clip-skip", "--hypernetworks-dir", "--init-image", "--mask",
                   "--denoising-strength", "--resize-mode", "--mask-blur", "--inpainting-fill", "--inpaint-full-res",
                   "--inpaint-padding", "--invert-mask"):
        assert option in proc.stdout, option
    (tmp_path / "bad.png").write_bytes(b"not an image")
    _noise_image().save(tmp_path / "init.png")
    common = ["--prompt", "x", "--ckpt", str(tiny_model_dir), "--output", str(tmp_path / "out")]
    for extra, expected in (
        (["--init-image", str(tmp_path / "bad.png")], "bad.png: not an image PIL can read"),
        (["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "bad.png")], "bad.png"),
        (["--init-image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--init-image", str(tmp_path / "init.png"), "--denoising-strength", "1.5"], "between 0 and 1"),
        (["--init-image", str(tmp_path / "init.png"), "--resize-mode", "stretch"], "just-resize"),
    ):
        proc = run_cli("img2img", *common, *extra)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert expected in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
