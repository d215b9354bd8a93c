"""The img2img, Inpaint and PNG Info handlers on real images and the tiny real model; standalone vs hosted layout."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sdconcepts.generation import GenerationParams
from sdconcepts.images import read_infotext
from sdconcepts.img2img import Img2ImgOptions
from sdconcepts.ui import handlers
from sdconcepts.ui import img2img_handlers as i2i
from sdconcepts.ui.ui_session import UiConfig, UiError, UiSession

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "browser"))
from library_files import write_library  # noqa: E402

WIDTH = 48  # the tiny test model's text width


@pytest.fixture()
def session(tmp_path: Path, tiny_model_dir: Path) -> UiSession:
    embeddings, hypernetworks = write_library(tmp_path, WIDTH)
    return UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[embeddings], hypernetworks_dirs=[hypernetworks],
                              outputs_dir=tmp_path / "outputs", img2img_outputs_dir=tmp_path / "img2img-images",
                              device="cpu"))


def _picture(size: int) -> Image.Image:
    """A picture with structure everywhere, so that any pixel the paste-back missed would show."""
    y, x = np.mgrid[0:size, 0:size]
    array = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def _png_bytes(image: Image.Image, parameters: str | None = None, **other: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    for key, value in other.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


# -- the editor's value in each gradio version ---------------------------------------------------------------


def test_editor_value_of_gradio_3_sketch_gives_its_mask() -> None:
    image = _picture(16)
    mask = Image.new("RGB", (16, 16))
    mask.paste((255, 255, 255), (4, 4, 8, 8))
    got_image, got_mask = i2i.editor_parts({"image": image, "mask": mask})
    assert got_image is image and got_mask is not None and got_mask.mode == "L"
    assert got_mask.getbbox() == (4, 4, 8, 8)


def test_editor_value_of_gradio_4_image_editor_is_the_drawn_layers_alpha() -> None:
    background = _picture(16)
    first = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    first.paste((255, 255, 255, 255), (0, 0, 4, 4))
    second = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    second.paste((10, 200, 30, 255), (10, 10, 12, 16))  # any colour counts: the mask is where it is drawn
    image, mask = i2i.editor_parts({"background": background, "layers": [first, second], "composite": background})
    assert image is background and mask is not None
    drawn = np.asarray(mask) > 128
    expected = np.zeros((16, 16), bool)
    expected[0:4, 0:4] = True
    expected[10:16, 10:12] = True
    assert (drawn == expected).all()
    assert i2i.editor_parts(None) == (None, None)
    assert i2i.editor_parts({"background": background, "layers": [], "composite": background})[1] is None


def test_the_sub_tab_decides_image_and_mask_or_says_what_is_missing() -> None:
    image = _picture(16)
    mask = Image.new("L", (16, 16))
    options = Img2ImgOptions()
    assert i2i.image_source("img2img", image, None, None, None, options).mask is None
    with pytest.raises(UiError, match="img2img: upload an image first"):
        i2i.image_source("img2img", None, None, None, None, options)
    with pytest.raises(UiError, match="draw the mask"):
        i2i.image_source("Inpaint", None, {"image": image, "mask": mask.convert("RGB")}, None, None, options)
    with pytest.raises(UiError, match="upload a mask too"):
        i2i.image_source("Inpaint upload", None, None, image, None, options)
    mask.paste(255, (2, 2, 5, 5))
    source = i2i.image_source("Inpaint upload", None, None, image, mask, options)
    assert source.image is image and source.mask is mask and source.options is options


def test_form_settings_become_a1111s_img2img_options_or_a_clear_error() -> None:
    options = i2i.img2img_options(0.4, "Crop and resize", 0.0, "latent noise", "Only masked", 16, True)
    assert options == Img2ImgOptions(denoising_strength=0.4, resize_mode="Crop and resize", mask_blur=0,
                                     inpainting_fill="latent noise", inpaint_full_res=True, inpaint_padding=16,
                                     invert_mask=True)
    assert not i2i.img2img_options(0.75, "Just resize", 4, "original", "Whole picture", 32, False).inpaint_full_res
    with pytest.raises(UiError, match="denoising strength must be between 0 and 1"):
        i2i.img2img_options(1.5, "Just resize", 4, "original", "Whole picture", 32, False)
    with pytest.raises(UiError, match="unknown masked content"):
        i2i.img2img_options(0.5, "Just resize", 4, "nothing", "Whole picture", 32, False)
    with pytest.raises(UiError, match="whole numbers"):
        i2i.img2img_options(0.5, "Just resize", 2.5, "original", "Whole picture", 32, False)


# -- generation through txt2img's path -----------------------------------------------------------------------


def test_inpaint_through_the_ui_handler_keeps_every_pixel_outside_the_mask(session: UiSession,
                                                                           tiny_model_dir: Path) -> None:
    label = str(tiny_model_dir)
    size = session.model(label).default_size
    init = _picture(size)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    box = (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    layer.paste((255, 255, 255, 255), box)
    options = i2i.img2img_options(0.9, "Just resize", 0, "original", "Whole picture", 32, False)
    source = i2i.image_source("Inpaint", None, {"background": init, "layers": [layer], "composite": init},
                              None, None, options)
    params = handlers.generation_params("toy-style <hypernet:toy-hypernet:1>", "", "Euler a", 3, 7, 5, 0, 0, 1, 1)
    out = handlers.generate(session, label, params, source=source)
    result = np.asarray(out.images[0].convert("RGB"), dtype=np.int16)
    original = np.asarray(init, dtype=np.int16)
    outside = np.ones((size, size), bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    # Exact by construction: A1111's paste-back lays the untouched original over the result where the mask is 0.
    assert (result[outside] == original[outside]).all()
    assert np.abs(result[~outside] - original[~outside]).mean() > 5  # the masked square was regenerated
    info = out.infotexts[0]
    assert "Denoising strength: 0.9" in info and "Seed: 5" in info and "TI hashes" in info
    assert "Mask blur" not in info  # 0: A1111 writes it only when it blurs
    assert read_infotext(out.saved[0]) == info
    assert out.saved[0].parent == session.config.img2img_outputs_dir  # A1111's img2img-images, not txt2img's folder


def test_standalone_app_folders_follow_a1111_and_keep_the_working_folder_clean() -> None:
    """img2img results go to outputs/img2img-images; the Train tab's logs under ./outputs (git-ignored), not in a
    ./textual_inversion of whatever folder the app was started in (issue 26 item 8)."""
    from sdconcepts.cli.main import build_parser
    from sdconcepts.cli.web_ui_command import web_ui_config

    config = web_ui_config(build_parser().parse_args([]))
    assert config.outputs_dir == Path("outputs") / "txt2img-images"
    assert config.img2img_outputs_dir == Path("outputs") / "img2img-images"
    assert Path(config.train_log_dir).parts[0] == "outputs"
    ignored = (Path(__file__).resolve().parents[2] / ".gitignore").read_text().split()
    assert "/outputs/" in ignored and "/textual_inversion/" in ignored


def test_img2img_reports_bad_requests_as_one_line(session: UiSession, tiny_model_dir: Path) -> None:
    source = i2i.image_source("img2img", _picture(64), None, None, None, Img2ImgOptions())
    with pytest.raises(UiError, match="multiples of"):
        handlers.generate(session, str(tiny_model_dir), GenerationParams(steps=2, width=60, height=64),
                          source=source)


# -- infotext: paste and PNG Info ----------------------------------------------------------------------------


A1111_INFOTEXT = (
    "a red circle, <hypernet:toy:0.8>\nNegative prompt: blurry, lineart\n"
    "Steps: 24, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 512x768, "
    'Model hash: abc123, Model: sd15, Denoising strength: 0.55, Mask blur: 2, Version: v1.10.1'
)


def test_an_a1111_infotext_fills_both_forms() -> None:
    fields = i2i.paste_fields(A1111_INFOTEXT)
    assert (fields.prompt, fields.negative_prompt) == ("a red circle, <hypernet:toy:0.8>", "blurry, lineart")
    assert (fields.sampler, fields.steps, fields.cfg_scale, fields.seed) == ("DPM++ 2M Karras", 24, 6.5, 1234)
    assert (fields.width, fields.height, fields.denoising_strength, fields.mask_blur) == (512, 768, 0.55, 2)
    assert fields.notes == ()
    other = i2i.paste_fields(A1111_INFOTEXT.replace("DPM++ 2M, Schedule type: Karras", "DPM++ SDE"))
    assert other.sampler is None and "'DPM++ SDE' is not available" in other.notes[0]
    assert i2i.paste_fields("") == i2i.PastedFields()


def test_png_info_reads_ours_and_a1111s_and_refuses_what_is_not_an_image(session: UiSession,
                                                                         tiny_model_dir: Path) -> None:
    out = handlers.generate(session, str(tiny_model_dir),
                            handlers.generation_params("a toy", "neg", "DDIM", 2, 7, 9, 0, 0, 1, 1))
    ours = i2i.read_png_info(out.saved[0])  # a path, as gradio 4+ may hand it over
    assert ours.infotext == out.infotexts[0] and ours.image is not None
    fields = i2i.paste_fields(ours.infotext)
    assert (fields.prompt, fields.negative_prompt, fields.sampler, fields.steps, fields.seed) == (
        "a toy", "neg", "DDIM", 2, 9)

    theirs = i2i.read_png_info(_png_bytes(_picture(8), A1111_INFOTEXT, Software="other"))
    assert theirs.infotext == A1111_INFOTEXT
    assert "Software" in theirs.html and "&lt;hypernet:toy:0.8&gt;" in theirs.html  # escaped

    bare = i2i.read_png_info(_png_bytes(_picture(8)))
    assert bare.infotext == "" and "no generation parameters" in bare.html
    with pytest.raises(UiError, match="not an image"):
        i2i.read_png_info(b"not a png at all")
    assert i2i.read_png_info(None).image is None


def test_png_info_refuses_bombs_and_parameters_no_generation_writes() -> None:
    from forged_images import forged_png

    from sdconcepts.limits import MAX_INFOTEXT_CHARS

    with pytest.raises(UiError, match=r"^PNG Info: image too large: 12000×12000 > \d+ pixels$"):
        i2i.read_png_info(forged_png(12_000, 12_000))  # PIL's raw message, or a 2.3 GB decode below PIL's limit
    # An upload gradio decoded already (1 bit a pixel here, 11 MB) is refused before img2img resizes it.
    with pytest.raises(UiError, match=r"^image too large: 9500×9500 > \d+ pixels$"):
        i2i.editor_parts(Image.new("1", (9500, 9500)))
    fits = i2i.read_png_info(_png_bytes(_picture(8), "p" * MAX_INFOTEXT_CHARS))
    assert len(fits.infotext) == MAX_INFOTEXT_CHARS
    with pytest.raises(UiError, match=f"more than the {MAX_INFOTEXT_CHARS} a generation writes; not read$"):
        i2i.read_png_info(_png_bytes(_picture(8), "p" * (MAX_INFOTEXT_CHARS + 1)))  # a 60 MB chunk was fed on


# -- layout ------------------------------------------------------------------------------------------------------


def _element_ids(blocks: object) -> set[str]:
    return {c.get("props", {}).get("elem_id") for c in blocks.config["components"]} - {None}  # type: ignore[attr-defined]


def test_the_standalone_app_has_img2img_and_png_info_and_the_hosted_tab_does_not(session: UiSession) -> None:
    from sdconcepts.host.a1111 import build_tabs
    from sdconcepts.ui.app import build_ui

    mine = {"sdconcepts_img2img_prompt", "sdconcepts_img2img_inpaint_editor", "sdconcepts_png_info_file",
            "sdconcepts_send_to_img2img", "sdconcepts_send_to_inpaint", "sdconcepts_main_tabs",
            "sdconcepts_cpu_threads"}  # the standalone app's CPU threads setting (a host keeps its own)
    session.config.cpu_threads = "auto"  # as web_ui_command configures the standalone app
    standalone = _element_ids(build_ui(session))
    assert mine <= standalone
    hosted = _element_ids(build_tabs(session)[0][0])
    assert not mine & hosted and not any("img2img" in i or "png_info" in i for i in hosted)
    # Inside a host our tab holds what the host lacks; prompts, pictures and card pages are the host's own.
    assert {"sdconcepts_model", "sdconcepts_train_root", "sdconcepts_ti_tools"} <= hosted
    assert not hosted & {"sdconcepts_prompt", "sdconcepts_gallery", "sdconcepts_ti_cards", "sdconcepts_hn_cards"}
    assert {"sdconcepts_prompt", "sdconcepts_gallery", "sdconcepts_ti_cards"} <= standalone


def test_png_info_text_blocks_wrap() -> None:
    """The parameters block ran off to the right of its column (issue 26 item 10): its <pre> wraps."""
    info = i2i.read_png_info(_png_bytes(_picture(8), "a " * 400 + "\nSteps: 20"))
    assert '<div class="sdconcepts-png-info">' in info.html and "<pre>" in info.html
    css = re.sub(r"/\*.*?\*/", "", (Path(__file__).resolve().parents[2] / "style.css").read_text(), flags=re.S)
    rules = {selector.strip(): body for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css)
             for selector in selectors.split(",")}
    body = rules["#sdconcepts_root .sdconcepts-png-info pre"]
    assert "white-space: pre-wrap" in body and "overflow-wrap: anywhere" in body


def test_mask_brush_fits_the_model_size(tmp_path: Path) -> None:
    """The default brush (8) covered half of the embedded model's 32 px picture (issue 26 item 10)."""
    from sdconcepts.ui.img2img_tab import brush_size

    assert brush_size(UiSession(UiConfig())) == 2  # the embedded toy-world model, 32 px
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "big.ckpt").write_bytes(b"not read")
    unknown = UiSession(UiConfig(ckpt=tmp_path / "models" / "big.ckpt", models_dir=tmp_path / "models"))
    assert brush_size(unknown) == 8  # a .ckpt's size is not known without loading it
