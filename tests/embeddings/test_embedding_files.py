"""Embedding files: every layout A1111 reads, what we write, image carriers, A1111's safe unpickler, bad files."""

from __future__ import annotations

import base64
import collections
import io
import json
import pickle
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, ImageDraw, PngImagePlugin

from sdconcepts import Embedding, load_embedding, save_embedding
from sdconcepts.embeddings.files import EmbeddingFileError, NoEmbeddedData, describe_embedding, file_sha256

WIDTH = 48


def _vectors(n: int = 3, width: int = WIDTH, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------
# A1111's documented layouts, re-implemented here from a1111-compat.md (independent of the code under test)
# ---------------------------------------------------------------------------------------------------------------


def a1111_pt_dict(vec: torch.Tensor, name: str) -> dict[str, object]:
    return {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": name,
        "step": 1200,
        "sd_checkpoint": "abcdef0123",
        "sd_checkpoint_name": "v1-5-pruned",
    }


def reference_lcg(count: int) -> np.ndarray:
    """§1.5: a=1664525, c=1013904223, m=2^32, seed 0; each output is state % 255."""
    state, out = 0, []
    for _ in range(count):
        state = (1664525 * state + 1013904223) % 2**32
        out.append(state % 255)
    return np.array(out, dtype=np.uint8)


def reference_json(data: dict[str, object]) -> bytes:
    def default(obj: object) -> object:
        assert isinstance(obj, torch.Tensor)
        return {"TORCHTENSOR": obj.numpy().tolist()}

    return json.dumps(data, default=default).encode()


def reference_strips(picture: Image.Image, data: dict[str, object]) -> Image.Image:
    """§1.5 encoding steps 1-8, written from the spec."""
    raw = np.frombuffer(zlib.compress(reference_json(data), 9), dtype=np.uint8)
    h = picture.size[1]
    n = len(raw) + (h - len(raw) % h)
    n = n + (h * 3 - n % (h * 3))
    vec = next(iter(data["string_to_param"].values()))  # type: ignore[attr-defined]
    first = np.abs(np.array(vec.numpy().tolist()[0][:1024]))
    shades = (first / first.max() * 255).astype(np.uint8)

    def strip(nibbles: np.ndarray, sequence: np.ndarray) -> np.ndarray:
        block = np.resize(nibbles, n).reshape(h, -1, 3)
        pattern = Image.new("RGB", (block.shape[1], h))
        draw = ImageDraw.Draw(pattern)
        k = 0
        for x in range(-6, block.shape[1], 8):
            for row, y in enumerate(range(-6, h, 8)):
                dx = 4 if row % 2 == 0 else 0
                s = int(sequence[k % len(sequence)])
                k += 1
                draw.ellipse((x + dx, y, x + 6 + dx, y + 6), fill=(s, s, s))
        block = block ^ (np.asarray(pattern) & 0xF0)
        key = (reference_lcg(block.size) & 0x0F).reshape(block.shape)
        return (block ^ key).astype(np.uint8)

    low, high = strip(raw & 0x0F, shades), strip(raw >> 4, shades[::-1])
    wl, wh = low.shape[1], high.shape[1]
    canvas = Image.new("RGB", (wl + 1 + picture.size[0] + 1 + wh, h))
    canvas.paste(Image.fromarray(low), (0, 0))
    canvas.paste(picture, (wl + 1, 0))
    canvas.paste(Image.fromarray(high), (wl + 1 + picture.size[0] + 1, 0))
    return canvas


def reference_decode(image: Image.Image) -> dict[str, object]:
    """§1.5 decoding steps 1-7."""
    px = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = (px > 0).all(axis=2)
    cols, rows = np.flatnonzero(lit.any(axis=0)), np.flatnonzero(lit.any(axis=1))
    px = px[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    black = np.flatnonzero(px.sum(axis=(0, 2)) == 0)
    assert len(black) >= 2, "no embedded information"
    lower, upper = px[:, : black.min()], px[:, black.max() + 1 :]
    lower = lower ^ (reference_lcg(lower.size) & 0x0F).reshape(lower.shape)
    upper = upper ^ (reference_lcg(upper.size) & 0x0F).reshape(upper.shape)
    data = zlib.decompressobj().decompress(((upper << 4) | lower).astype(np.uint8).tobytes())
    return json.loads(data, object_hook=lambda d: torch.tensor(d["TORCHTENSOR"]) if "TORCHTENSOR" in d else d)


def test_reference_lcg_matches_a1111_pinned_values() -> None:
    values = reference_lcg(100_100)
    assert values[:4].tolist() == [253, 242, 127, 44]
    assert int(values[100:].astype(np.int64).sum()) == 12731374


# A1111 modules/safe.py, restated from §1.9: the allowed globals and zip member names.
_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                              "ByteStorage", "float32", "BFloat16Storage")),
    ("torch.nn.modules.container", "ParameterDict"),
    ("__builtin__", "set"),
}
_ZIP_NAMES_1_9 = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")
_ZIP_NAMES_1_10 = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|(\.data/serialization_id)|(data\.pkl))$")


class _A1111Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        # A1111 hands back the real object; a stand-in that accepts any arguments is enough to walk the pickle.
        return collections.OrderedDict if name == "OrderedDict" else (lambda *args, **kwargs: None)

    def persistent_load(self, pid: object) -> object:
        assert isinstance(pid, tuple) and pid[0] == "storage"
        return None


def a1111_check_pt(path: Path, names: re.Pattern[str]) -> None:
    """A1111's check_pt: a zip with only allowed members, or a legacy file of five restricted pickles."""
    try:
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if not names.match(member):
                    raise ValueError(f"bad file inside {path}: {member}")
            (pkl,) = [m for m in z.namelist() if m.endswith("/data.pkl")]
            with z.open(pkl) as handle:
                _A1111Unpickler(handle).load()
    except zipfile.BadZipFile:
        with open(path, "rb") as handle:
            unpickler = _A1111Unpickler(handle)
            for _ in range(5):
                unpickler.load()


# ---------------------------------------------------------------------------------------------------------------
# Writing and round trips
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors", ".png", ".webp"])
def test_round_trip_every_format(tmp_path: Path, suffix: str) -> None:
    emb = Embedding("subject", _vectors(), step=42, sd_checkpoint="0123456789", sd_checkpoint_name="base")
    path = save_embedding(emb, tmp_path / f"subject{suffix}")
    back = load_embedding(path)
    assert back.name == "subject"
    assert back.vectors.dtype == torch.float32 and torch.equal(back.tensor(), emb.tensor())
    if suffix != ".bin":  # diffusers' {token: tensor} has nowhere to keep training facts
        assert (back.step, back.sd_checkpoint, back.sd_checkpoint_name) == (42, "0123456789", "base")
    assert back.hash == file_sha256(path) and back.short_hash == back.hash[:12]  # type: ignore[index]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_sdxl_pair_round_trips(tmp_path: Path, suffix: str) -> None:
    pair = {"clip_l": _vectors(2, 768), "clip_g": _vectors(2, 1280, seed=1)}
    back = load_embedding(save_embedding(Embedding("xl", pair), tmp_path / f"xl{suffix}"))
    assert back.is_sdxl and back.vector_count == 2 and back.width == 2048
    assert not isinstance(back.vectors, torch.Tensor)
    assert torch.equal(back.vectors["clip_g"], pair["clip_g"]) and torch.equal(back.vectors["clip_l"], pair["clip_l"])


def test_sdxl_cannot_go_into_an_image_and_a_failed_save_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "xl.png"
    target.write_bytes(b"old")
    pair = {"clip_l": _vectors(1, 768), "clip_g": _vectors(1, 1280)}
    with pytest.raises(EmbeddingFileError, match="xl.png.*SDXL"):
        save_embedding(Embedding("xl", pair), target)
    assert target.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_unknown_extension_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingFileError, match=r"emb\.txt"):
        save_embedding(Embedding("emb", _vectors()), tmp_path / "emb.txt")


def test_pt_is_a1111s_exact_dict(tmp_path: Path) -> None:
    emb = Embedding("mine", _vectors(2), step=7)
    data = torch.load(save_embedding(emb, tmp_path / "mine.pt"), weights_only=True)
    assert list(data) == ["string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"]
    assert data["string_to_token"] == {"*": 265} and data["name"] == "mine" and data["step"] == 7
    vec = data["string_to_param"]["*"]
    assert vec.dtype == torch.float32 and vec.device.type == "cpu" and torch.equal(vec, emb.tensor())
    assert data["sd_checkpoint"] is None and data["sd_checkpoint_name"] is None


def test_our_pt_passes_a1111_safe_unpickler_but_torch_default_save_does_not(tmp_path: Path) -> None:
    ours = save_embedding(Embedding("mine", _vectors(2)), tmp_path / "mine.pt")
    for names in (_ZIP_NAMES_1_9, _ZIP_NAMES_1_10):
        a1111_check_pt(ours, names)
    # The check is real: torch's current zip format carries records A1111 1.10 still rejects (§1.9).
    plain = tmp_path / "plain.pt"
    torch.save(a1111_pt_dict(_vectors(2), "plain"), plain)
    with pytest.raises(ValueError, match=r"bad file inside .*(format_version|storage_alignment)"):
        a1111_check_pt(plain, _ZIP_NAMES_1_10)


def test_safetensors_key_is_the_name_and_metadata_keeps_training_facts(tmp_path: Path) -> None:
    path = save_embedding(Embedding("glint", _vectors(2), step=3), tmp_path / "glint.safetensors")
    tensors = safetensors.torch.load_file(str(path))
    assert list(tensors) == ["glint"] and tensors["glint"].shape == (2, WIDTH)


# ---------------------------------------------------------------------------------------------------------------
# Reading files made by A1111, diffusers, kohya
# ---------------------------------------------------------------------------------------------------------------


def test_a1111_pt_name_is_the_file_stem_not_the_stored_name(tmp_path: Path) -> None:
    vec = _vectors(4).requires_grad_(True)
    torch.save(a1111_pt_dict(vec, "stored-name"), tmp_path / "Stem Name.pt")
    emb = load_embedding(tmp_path / "Stem Name.pt")
    assert emb.name == "Stem Name" and emb.vector_count == 4 and emb.width == WIDTH
    assert (emb.step, emb.sd_checkpoint, emb.sd_checkpoint_name) == (1200, "abcdef0123", "v1-5-pruned")
    assert torch.equal(emb.tensor(), vec.detach()) and not emb.tensor().requires_grad
    info = describe_embedding(tmp_path / "Stem Name.pt")
    assert info["layout"] == "string_to_param" and info["vectors"] == 4 and len(info["checksum"]) == 4


def test_legacy_parameterdict_string_to_param(tmp_path: Path) -> None:
    vec = _vectors(2)
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
    torch.save({"string_to_token": {"*": 265}, "string_to_param": params, "name": "old"}, tmp_path / "legacy.pt")
    assert torch.equal(load_embedding(tmp_path / "legacy.pt").tensor(), vec)


def test_diffusers_learned_embeds_bin_single_vector_is_unsqueezed(tmp_path: Path) -> None:
    vec = _vectors(1)[0]
    torch.save({"<cat-toy>": vec}, tmp_path / "learned_embeds.bin")
    emb = load_embedding(tmp_path / "learned_embeds.bin")
    assert emb.name == "learned_embeds" and emb.tensor().shape == (1, WIDTH)  # the key is ignored, as in A1111


def test_kohya_safetensors_emb_params_and_sdxl(tmp_path: Path) -> None:
    safetensors.torch.save_file({"emb_params": _vectors(5).half()}, str(tmp_path / "kohya.safetensors"))
    emb = load_embedding(tmp_path / "kohya.safetensors")
    assert emb.vector_count == 5 and emb.vectors.dtype == torch.float32
    safetensors.torch.save_file(
        {"clip_g": _vectors(2, 1280), "clip_l": _vectors(2, 768)}, str(tmp_path / "xl.safetensors")
    )
    assert load_embedding(tmp_path / "xl.safetensors").width == 2048


def test_multiple_terms_are_refused(tmp_path: Path) -> None:
    torch.save({"string_to_param": {"*": _vectors(), "+": _vectors()}}, tmp_path / "two.pt")
    safetensors.torch.save_file({"a": _vectors(), "b": _vectors()}, str(tmp_path / "two.safetensors"))
    for name in ("two.pt", "two.safetensors"):
        with pytest.raises(EmbeddingFileError, match=f"{name}.*(exactly one term|multiple terms)"):
            load_embedding(tmp_path / name)


# ---------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------


def _picture(w: int = 40, h: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(30, 220, (h, w, 3), dtype=np.uint8))


def _a1111_png(path: Path, data: dict[str, object], *, with_text: bool = True) -> None:
    info = PngImagePlugin.PngInfo()
    if with_text:
        info.add_text("sd-ti-embedding", base64.b64encode(reference_json(data)).decode())
    reference_strips(_picture(), data).save(path, pnginfo=info)


def test_reads_a1111_image_with_text_chunk_and_the_stored_name_wins(tmp_path: Path) -> None:
    vec = _vectors(2)
    _a1111_png(tmp_path / "file-stem.png", a1111_pt_dict(vec, "stored"))
    emb = load_embedding(tmp_path / "file-stem.png")
    assert emb.name == "stored" and emb.step == 1200
    assert torch.allclose(emb.tensor(), vec, atol=0, rtol=0)  # float32 -> JSON float64 -> float32 is exact
    assert describe_embedding(tmp_path / "file-stem.png")["carrier"] == "text chunk"


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_reads_a1111_pixel_strips_without_text_chunk(tmp_path: Path, suffix: str) -> None:
    vec = _vectors(3)
    image = reference_strips(_picture(), a1111_pt_dict(vec, "strips"))
    path = tmp_path / f"stripped{suffix}"
    image.save(path, lossless=True) if suffix == ".webp" else image.save(path)
    emb = load_embedding(path)
    assert emb.name == "strips" and torch.equal(emb.tensor(), vec)
    assert describe_embedding(path)["carrier"] == "pixels"


def test_our_images_decode_under_a1111_layout_and_match_it_pixel_for_pixel(tmp_path: Path) -> None:
    emb = Embedding("ours", _vectors(2), step=5)
    png = save_embedding(emb, tmp_path / "ours.png", picture=_picture())
    webp = save_embedding(emb, tmp_path / "ours.webp", picture=_picture())
    with Image.open(png) as image:
        text = json.loads(base64.b64decode(image.text["sd-ti-embedding"]))
        assert text["name"] == "ours" and text["string_to_token"] == {"*": 265}
        decoded = reference_decode(image)
        expected = reference_strips(_picture(), {**a1111_data_for(emb)})
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert torch.equal(decoded["string_to_param"]["*"].float(), emb.tensor())  # type: ignore[index]
    with Image.open(webp) as image:
        assert torch.equal(reference_decode(image)["string_to_param"]["*"].float(), emb.tensor())  # type: ignore[index]
    # Strip the metadata (as image hosts do): the pixel carrier still holds it.
    with Image.open(png) as image:
        bare = Image.new("RGB", image.size)
        bare.paste(image)
    bare.save(tmp_path / "bare.png")
    assert torch.equal(load_embedding(tmp_path / "bare.png").tensor(), emb.tensor())


def a1111_data_for(emb: Embedding) -> dict[str, object]:
    return {
        "string_to_token": {"*": 265}, "string_to_param": {"*": emb.tensor()}, "name": emb.name, "step": emb.step,
        "sd_checkpoint": None, "sd_checkpoint_name": None,
    }


def test_default_picture_and_a_large_embedding(tmp_path: Path) -> None:
    emb = Embedding("big", _vectors(75, 768))
    back = load_embedding(save_embedding(emb, tmp_path / "big.webp"))
    assert torch.equal(back.tensor(), emb.tensor())


def test_plain_picture_is_not_an_embedding(tmp_path: Path) -> None:
    _picture().save(tmp_path / "photo.png")
    with pytest.raises(NoEmbeddedData, match="photo.png"):
        load_embedding(tmp_path / "photo.png")


# ---------------------------------------------------------------------------------------------------------------
# Bad and hostile files
# ---------------------------------------------------------------------------------------------------------------


class _Hostile:
    """Unpickling this calls open(marker, 'w'): a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def write_hostile_files(folder: Path, marker: Path) -> list[Path]:
    paths = [folder / "evil.pt", folder / "evil_legacy.pt", folder / "evil_plain.bin"]
    torch.save({"string_to_param": {"*": _Hostile(marker)}}, paths[0])
    torch.save({"string_to_param": {"*": _Hostile(marker)}}, paths[1], _use_new_zipfile_serialization=False)
    paths[2].write_bytes(pickle.dumps({"x": _Hostile(marker)}, protocol=2))
    return paths


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files that must be refused, with the reason each refusal must mention."""
    good = io.BytesIO()
    torch.save(a1111_pt_dict(_vectors(), "x"), good)
    (folder / "truncated.pt").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "zero.pt").write_bytes(b"")
    torch.save({"string_to_param": {"*": "not a tensor"}}, folder / "text.pt")
    torch.save({"emb_params": torch.full((2, WIDTH), float("nan"))}, folder / "nan.pt")
    torch.save({"emb_params": torch.ones(2, WIDTH, dtype=torch.int64)}, folder / "ints.pt")
    (folder / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    return {
        "truncated.pt": "not a loadable torch file",
        "zero.pt": "empty",
        "text.pt": "not a tensor",
        "nan.pt": "NaN",
        "ints.pt": "floating-point",
        "junk.safetensors": "safetensors",
    }


def test_hostile_pickles_are_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for path in write_hostile_files(tmp_path, marker):
        with pytest.raises(EmbeddingFileError) as info:
            load_embedding(path)
        assert path.name in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


def test_bad_files_raise_one_line_errors_naming_file_and_reason(tmp_path: Path) -> None:
    for name, reason in write_bad_files(tmp_path).items():
        with pytest.raises(EmbeddingFileError) as info:
            load_embedding(tmp_path / name)
        message = str(info.value)
        assert name in message and reason in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------------------------
# CLI: inspect and convert
# ---------------------------------------------------------------------------------------------------------------


def test_cli_convert_chain_and_inspect_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdconcepts.cli import main

    torch.save(a1111_pt_dict(_vectors(2), "trained"), tmp_path / "trained.pt")
    chain = ["trained.pt", "a.safetensors", "b.png", "c.webp", "d.bin", "e.pt"]
    for src, dst in zip(chain[:-1], chain[1:], strict=True):
        assert main(["convert", str(tmp_path / src), str(tmp_path / dst)]) == 0
    final = load_embedding(tmp_path / "e.pt")
    assert final.name == "e" and torch.equal(final.tensor(), _vectors(2))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "b.png"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "b" and info["vectors"] == 2 and info["width"] == WIDTH and info["step"] == 1200
    assert info["carrier"] == "text chunk" and info["sha256"] == file_sha256(tmp_path / "b.png")


def test_cli_inspect_folder_lists_skipped_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdconcepts.cli import main

    save_embedding(Embedding("fits", _vectors()), tmp_path / "fits.pt")
    save_embedding(Embedding("wide", _vectors(1, 768)), tmp_path / "sub" / "wide.safetensors")
    (tmp_path / "zero.pt").write_bytes(b"")
    assert main(["inspect", str(tmp_path), "--width", str(WIDTH), "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["fits"]["skipped"] is None and rows["fits"]["vectors"] == 3
    assert "768" in rows["wide"]["skipped"] and "empty" in rows["zero"]["skipped"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdconcepts.cli import main

    (tmp_path / "notes.txt").write_text("hello")
    torch.save({"a": 1, "b": [2]}, tmp_path / "other.pt")
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert main(["inspect", str(tmp_path / "other.pt")]) == 2
    assert main(["convert", str(tmp_path / "other.pt"), str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("error:" in line for line in err)
    assert "not an embedding" in err[0] and "other.pt" in err[1] and not (tmp_path / "x.safetensors").exists()


def test_cli_inspect_describes_a_hypernetwork(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hypernetwork = pytest.importorskip("sdconcepts.hypernetworks.hypernetwork")
    files = pytest.importorskip("sdconcepts.hypernetworks.files")
    from sdconcepts.cli import main

    files.save_hypernetwork(hypernetwork.create_hypernetwork("hn", [WIDTH], generator_seed=0), tmp_path / "hn.pt")
    assert main(["inspect", str(tmp_path / "hn.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "hypernetwork" and info["name"] == "hn" and info["widths"] == [WIDTH]
