"""Hostile inputs found by an outside attack run: each is refused with one clear line before anything big is
allocated or any file is written, or (in a batch of files) skipped with its reason while the rest go on."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdconcepts.generation import GenerationError, GenerationParams
from sdconcepts.limits import MAX_SOURCE_PIXELS, available_memory, hypernetwork_parameters
from sdconcepts.prompts.network_tags import hypernetwork_tags, parse_extra_network_tags
from sdconcepts.ui import handlers, train_handlers
from sdconcepts.ui.train_preprocess import PreprocessSettings
from sdconcepts.ui.ui_session import UiConfig, UiError, UiSession

MEMORY_KNOWN = available_memory("cpu") is not None


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "sdconcepts", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    return proc, time.monotonic() - started


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if "error:" in line]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, width: int, height: int, *, truncated: bool = False) -> Path:
    """A real 1-bit greyscale PNG of zeros: a 20000 x 20000 one is about 50 KB; ``truncated`` keeps only the header
    and the start of the pixel data (decoding it would fail, so a "too large" verdict proves nothing was decoded)."""
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    if truncated:
        data = data[:64]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
                     + (b"" if truncated else png_chunk(b"IEND", b"")))
    return path


@pytest.fixture(scope="module")
def session(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> UiSession:
    root = tmp_path_factory.mktemp("ui")
    for folder in ("embeddings", "hypernetworks"):
        (root / folder).mkdir()
    return UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[root / "embeddings"],
                              hypernetworks_dirs=[root / "hypernetworks"], train_roots=[root]))


# -- 1. clip skip ------------------------------------------------------------------------------------------------


def test_clip_skip_past_the_text_encoder_is_refused_with_its_range(tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img

    layers = tiny_model.text_encoder_layers
    with pytest.raises(GenerationError, match=f"clip skip must be between 1 and {layers} .*got 99"):
        txt2img(tiny_model, GenerationParams(prompt="x", steps=1, clip_skip=99))
    result = txt2img(tiny_model, GenerationParams(prompt="x", steps=1, seed=1, clip_skip=layers))
    assert len(result.images) == 1


def test_clip_skip_on_the_command_line_and_in_the_ui(tiny_model_dir: Path, tmp_path: Path, session: UiSession) -> None:
    proc, _ = run_cli("generate", "--prompt", "x", "--steps", "1", "--clip-skip", "99", "--ckpt", str(tiny_model_dir),
                      "--output", str(tmp_path / "out"))
    assert "clip skip must be between 1 and" in one_line_error(proc)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UiError, match="clip skip must be between 1 and"):
        handlers.generate(session, session.default_choice(), GenerationParams(prompt="x", steps=1, clip_skip=99))


# -- 2. sizes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "expected"), [
    (("--width", "100000", "--height", "100000"), "width must be at most 2048, got 100000"),
    (("--batch-size", "10000"), "batch size must be at most 8, got 10000"),
])
def test_generate_over_the_ui_limits_fails_fast(flags: tuple[str, ...], expected: str, tmp_path: Path) -> None:
    proc, seconds = run_cli("generate", "--prompt", "x", "--steps", "1", *flags, "--output", str(tmp_path / "out"))
    assert expected in one_line_error(proc)
    assert "--no-size-limits" in proc.stderr
    assert seconds < 60  # measured 7-9 s on a loaded 2-core machine: refused before the model loads
    assert not (tmp_path / "out").exists()


def test_ui_generate_over_the_limits_is_refused(session: UiSession) -> None:
    params = handlers.generation_params("x", "", "Euler a", 1, 7, 1, 100000, 100000, 1, 1)
    with pytest.raises(UiError, match="width must be at most 2048"):
        handlers.generate(session, session.default_choice(), params)
    params = handlers.generation_params("x", "", "Euler a", 1, 7, 1, 0, 0, 10000, 1)
    with pytest.raises(UiError, match="batch size must be at most 8"):
        handlers.generate(session, session.default_choice(), params)


@pytest.mark.skipif(not MEMORY_KNOWN, reason="this platform does not say how much memory is available")
def test_without_limits_a_request_that_cannot_fit_is_refused_before_allocating(tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img

    side = tiny_model.size_multiple * 2000  # 1.3 TiB of activations at the least for the tiny model
    params = GenerationParams(prompt="x", steps=1, width=side, height=side)
    started = time.monotonic()
    with pytest.raises(GenerationError, match=r"needs at least .* of memory, but only .* is available"):
        txt2img(tiny_model, params, size_limits=False)
    assert time.monotonic() - started < 5
    # A normal size passes the same check.
    assert len(txt2img(tiny_model, GenerationParams(prompt="x", steps=1, seed=1), size_limits=False).images) == 1


def test_create_hypernetwork_with_a_huge_layer_is_refused_without_a_file(tmp_path: Path, session: UiSession) -> None:
    folder = tmp_path / "hypernetworks"
    # SD 1.x's widths (the default is the model's: the embedded one's 48/32/64 would make only a 6 GB file)
    proc, seconds = run_cli("create-hypernetwork", "big", "--layer-structure", "1, 100000, 1", "--sizes", "sd1",
                            "--hypernetworks-dir", str(folder))
    assert "has a factor over 16" in one_line_error(proc)
    assert seconds < 60
    if MEMORY_KNOWN:
        proc, _ = run_cli("create-hypernetwork", "big", "--layer-structure", "1, 100000, 1", "--no-size-limits",
                          "--sizes", "sd1", "--hypernetworks-dir", str(folder))
        assert "needs at least" in one_line_error(proc)
    assert not folder.exists() or not any(folder.iterdir())

    ui_folder = train_handlers.hypernetworks_folder(session)
    before = set(ui_folder.iterdir())
    with pytest.raises(UiError, match="layer structure: .*factor over 16"):
        train_handlers.create_hypernetwork(session, "big", ["768"], "1, 100000, 1", "linear", "Normal", False, False, "",
                                  False)
    # Within the factor limit but over the file size limit: the size is in the message.
    with pytest.raises(UiError, match=r"layer structure: .* makes a [0-9.]+ GiB file, over the limit of 1\.0 GiB"):
        train_handlers.create_hypernetwork(session, "big", ["1280", "1024"], "1, 16, 16, 1", "linear", "Normal", False, False,
                                  "", False)
    assert set(ui_folder.iterdir()) == before
    created = train_handlers.create_hypernetwork(session, "fine", ["32"], "1, 16, 1", "linear", "Normal", False, False, "",
                                        False)
    assert created.is_file()


def test_hypernetwork_size_counts_every_parameter() -> None:
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork

    for structure, layer_norm in (((1, 2, 1), False), ((1, 1.5, 3, 1), True)):
        built = create_hypernetwork("x", [32, 48], layer_structure=structure, layer_norm=layer_norm)
        assert hypernetwork_parameters([32, 48], structure, layer_norm=layer_norm) == sum(
            p.numel() for p in built.parameters())


def test_training_sizes_get_the_same_limits(tmp_path: Path, session: UiSession) -> None:
    dataset = tmp_path / "data"
    dataset.mkdir()
    Image.new("RGB", (32, 32)).save(dataset / "a.png")
    base = {"dataset": str(dataset), "template": "subject", "log_directory": str(tmp_path / "log")}
    for field, value, key in (("batch_size", 10000, "batch_size"), ("gradient_accumulation", 100000,
                                                                       "gradient_accumulation"),
                              ("width", 100000, "size"), ("height", 4096, "size")):
        config, errors = train_handlers.training_config("embedding", "x", {**base, field: value})
        assert config is None and "at most" in errors[key], (field, errors)
    from sdconcepts.training.config import EmbeddingTrainingConfig

    EmbeddingTrainingConfig(**base, batch_size=10000, width=4096, size_limits=False).validated()


@pytest.mark.skipif(not MEMORY_KNOWN, reason="this platform does not say how much memory is available")
def test_training_that_cannot_fit_is_refused_before_reading_images(tiny_model: Any, tmp_path: Path) -> None:
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.trainables import TrainingError
    from sdconcepts.training.training_model import TrainingModel

    dataset = tmp_path / "data"
    dataset.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (i * 60, 0, 0)).save(dataset / f"{i}.png")
    path = create_embedding_file(tmp_path, "toy", TrainingModel(tiny_model).token_rows("x", 1))
    side = tiny_model.size_multiple * 1000
    config = EmbeddingTrainingConfig(dataset=str(dataset), template="subject", width=side, height=side,
                                     log_directory=str(tmp_path / "log"), max_steps=1, size_limits=False)
    with pytest.raises(TrainingError, match=f"training on 4 images of {side}x{side} .*needs at least"):
        next(iter(train_embedding(tiny_model, path, config, embeddings_dir=None)))
    assert not (tmp_path / "log").exists()


# -- 3. one bad file in a batch ----------------------------------------------------------------------------------


def _mixed_source(folder: Path) -> Path:
    folder.mkdir()
    Image.new("RGB", (40, 40), (200, 10, 10)).save(folder / "a_good.png")
    (folder / "a_good.txt").write_bytes("café crème, naïve".encode("latin-1"))
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "b_good.png")
    (folder / "b_good.txt").write_text("green square", encoding="utf-8")
    write_png(folder / "c_huge.png", 20000, 20000)
    write_png(folder / "d_tall.png", 12000, 12000, truncated=True)
    (folder / "e_broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder


def test_preprocess_skips_bad_files_with_reasons_and_keeps_going(session: UiSession) -> None:
    root = session.train_roots()[0]
    source = _mixed_source(root / "mixed")
    assert (source / "c_huge.png").stat().st_size < 200_000  # a real PNG whose header says 20000 x 20000
    settings = PreprocessSettings(width=32, height=32, caption_action="copy")
    message = train_handlers.preprocess(session, str(source), str(root / "mixed-out"), settings)
    assert message.startswith("Preprocessing finished: 2 images from 2 files")
    assert "skipped 3:" in message
    assert "c_huge.png (image too large: 400000000 pixels" in message
    # Refused from the header: decoding the truncated data would have failed with another reason.
    assert f"d_tall.png (image too large: 12000×12000 > {MAX_SOURCE_PIXELS} pixels)" in message
    assert "e_broken.png (" in message
    assert "a_good.txt (caption not UTF-8" in message
    captions = sorted(p.read_text(encoding="utf-8") for p in (root / "mixed-out").glob("*.txt"))
    assert captions == ["café crème, naïve\n", "green square\n"]


def test_the_training_dataset_skips_bad_images_too(tmp_path: Path) -> None:
    from sdconcepts.training.dataset import DatasetError, read_images

    source = _mixed_source(tmp_path / "data")
    records = read_images(source, width=16, height=16)
    assert [(r.path.name, r.filewords) for r in records] == [("a_good.png", "café crème, naïve"),
                                                             ("b_good.png", "green square")]
    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    write_png(only_bad / "huge.png", 20000, 20000)
    with pytest.raises(DatasetError, match=r"no images in the dataset folder \(skipped: huge.png \(image too large"):
        read_images(only_bad, width=16, height=16)


# -- 4. paths from the web form ----------------------------------------------------------------------------------


def test_web_form_paths_stay_inside_the_server_folders(session: UiSession, tmp_path: Path) -> None:
    root = session.train_roots()[0]
    source = root / "inside"
    source.mkdir(exist_ok=True)
    Image.new("RGB", (40, 40)).save(source / "x.png")
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (40, 40)).save(outside / "y.png")
    (root / "link").symlink_to(outside, target_is_directory=True)
    settings = PreprocessSettings(width=32, height=32)
    for src, dst in (("/etc", str(root / "o1")), ("../x", str(root / "o2")), (str(root / "link"), str(root / "o3")),
                     (str(source), "/tmp/sdconcepts-escape"), (str(source), str(root / "link" / "out")),
                     (str(source), str(root / ".." / "escape"))):
        with pytest.raises(UiError, match="is outside the folders this server may use .*--train-root"):
            train_handlers.preprocess(session, src, dst, settings)
    assert not Path("/tmp/sdconcepts-escape").exists() and not (outside / "out").exists()
    assert not any((root / name).exists() for name in ("o1", "o2", "o3"))
    assert train_handlers.preprocess(session, str(source), str(root / "ok"), settings).startswith(
        "Preprocessing finished: 1 images")

    dataset = root / "inside"
    good = {"dataset": str(dataset), "template": "subject", "log_directory": str(root / "logs")}
    config, errors = train_handlers.training_config("embedding", "x", good, roots=session.train_roots())
    assert config is not None and not errors
    for field, value in (("dataset", "/etc"), ("dataset", str(root / "link")), ("log_directory", "../logs"),
                         ("log_directory", "/tmp/logs"), ("template", "/etc/passwd")):
        config, errors = train_handlers.training_config("embedding", "x", {**good, field: value}, roots=session.train_roots())
        assert config is None and "is outside the folders" in errors[field], (field, value, errors)


def test_the_default_roots_are_the_working_folder_and_the_data_folders(tmp_path: Path) -> None:
    session = UiSession(UiConfig(embeddings_dirs=[tmp_path / "e"], outputs_dir=tmp_path / "o"))
    assert session.train_roots() == [Path.cwd(), tmp_path / "e", tmp_path / "o"]


# -- 5. non-finite hypernetwork strengths ------------------------------------------------------------------------


@pytest.mark.parametrize("strength", ["inf", "nan", "-inf", "1e999"])
def test_non_finite_hypernetwork_strength_is_named(strength: str, tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork
    from sdconcepts.hypernetworks.tags import resolve_in_memory

    tag = f"<hypernet:toy:{strength}>"
    with pytest.raises(ValueError, match=f"{tag} has strength '{strength}'; expected a finite number"):
        hypernetwork_tags(parse_extra_network_tags(f"a {tag}")[1])
    hypernetwork = create_hypernetwork("toy", [tiny_model.context_width])
    with pytest.raises(GenerationError, match="expected a finite number") as caught:
        txt2img(tiny_model, GenerationParams(prompt=f"a {tag}", steps=1),
                hypernetworks=resolve_in_memory(f"a {tag}", {"toy": hypernetwork}, tiny_model.unet))
    assert "sampler" not in str(caught.value)


def test_preprocess_sizes_and_extreme_strips_are_bounded(session: UiSession) -> None:
    root = session.train_roots()[0]
    source = root / "strips"
    source.mkdir()
    Image.new("RGB", (1, 4000)).save(source / "strip.png")  # covering 512x512 would mean 512 x 2048000 pixels
    Image.new("RGB", (40, 40)).save(source / "square.png")
    message = train_handlers.preprocess(session, str(source), str(root / "strips-out"), PreprocessSettings(width=512, height=512))
    assert message.startswith("Preprocessing finished: 1 images from 1 files")
    assert "strip.png (aspect ratio too extreme: resizing to 512×2048000" in message
    with pytest.raises(UiError, match="width must be between 8 and 2048, got 100000"):
        train_handlers.preprocess(session, str(source), str(root / "strips-big"), PreprocessSettings(width=100000, height=64))
    assert not (root / "strips-big").exists()


def test_kept_sizes_in_a_dataset_have_the_side_limit(tmp_path: Path) -> None:
    from sdconcepts.training.dataset import read_images

    Image.new("L", (2100, 8)).save(tmp_path / "wide.png")
    Image.new("RGB", (32, 16)).save(tmp_path / "small.png")
    records = read_images(tmp_path, width=16, height=16, keep_size=True)
    assert [(r.path.name, r.size) for r in records] == [("small.png", (32, 16))]
    assert len(read_images(tmp_path, width=16, height=16, keep_size=True, max_side=None)) == 2
    assert len(read_images(tmp_path, width=16, height=16)) == 2  # resized images are not limited by their source size
