"""Embedding files in every layout A1111 reads, and the formats we write: ``.pt``, ``.bin``, ``.safetensors``, PNG/WEBP.

Layouts are read in A1111's order (a1111-compat §1.2): ``string_to_param``, SDXL ``clip_l`` + ``clip_g``, then any
dict with exactly one tensor. Images carry an embedding in a ``sd-ti-embedding`` text chunk or in pixel strips
beside the picture (§1.5). Pickles are only ever read through the restricted loader in ``safe_load``.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from sdconcepts.atomic_files import atomic_path, save_torch_file
from sdconcepts.embeddings.embedding import SDXL_ENCODERS, Embedding, EmbeddingError
from sdconcepts.embeddings.image_codec import (
    decode_json,
    default_picture,
    embed_in_pixels,
    encode_json,
    extract_from_pixels,
)
from sdconcepts.safe_load import (
    TensorInfo,
    UnsafeFileError,
    describe_foreign,
    file_sha256,
    load_torch_file,
    open_regular,
    read_metadata,
)

__all__ = [
    "EMBEDDING_SUFFIXES",
    "IMAGE_SUFFIXES",
    "EmbeddingFileError",
    "EmbeddingInfo",
    "NoEmbeddedData",
    "a1111_data",
    "describe_embedding",
    "embedding_from_data",
    "file_sha256",
    "load_embedding",
    "read_embedding_info",
    "read_safetensors_tensors",
    "save_embedding",
]

PICKLE_SUFFIXES = (".pt", ".bin")
IMAGE_SUFFIXES = (".png", ".webp")
EMBEDDING_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", *IMAGE_SUFFIXES)

TEXT_CHUNK_KEY = "sd-ti-embedding"
# A1111 writes CLIP's id for "*" as the (unused) token of its one term.
_STAR_TOKEN_ID = 265


class EmbeddingFileError(ValueError):
    """A file that is not a readable embedding; the message names the file and the reason, in one line."""


class NoEmbeddedData(EmbeddingFileError):
    """An image without an embedding in it: A1111 treats it as a preview picture and ignores it silently."""


@dataclass(frozen=True)
class _Parsed:
    embedding: Embedding
    layout: str
    carrier: str | None


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------


def load_embedding(path: str | os.PathLike[str]) -> Embedding:
    """Read any embedding file A1111 reads; raise EmbeddingFileError naming the file and the reason otherwise.

    The prompt word is the file stem for ``.pt``/``.bin``/``.safetensors`` (a ``name`` inside is ignored, as in
    A1111) and the stored name first for images. ``hash`` is the SHA-256 of the whole file.
    """
    return _read(Path(path)).embedding


@dataclass(frozen=True)
class EmbeddingInfo:
    """What a card shows about an embedding file, read without its vectors: the prompt word, the vector count and
    A1111's width (clip_l + clip_g for SDXL); ``hash`` is the file's SHA-256 when it was cheap to compute."""

    name: str
    vectors: int
    width: int
    sdxl: bool
    hash: str | None


# Embeddings are a few KiB (75 vectors of 2048 floats is 600 KiB): hashing one at listing costs about what opening
# it does. A bigger file is hashed when a prompt first uses it, so a huge misnamed file never stalls a listing.
HASH_AT_LISTING_BYTES = 4 << 20
_MAX_SAFETENSORS_HEADER = 16 << 20


def read_embedding_info(path: str | os.PathLike[str], *, hash: bool = True) -> EmbeddingInfo:
    """An embedding file's name, vector count and width from its header alone (the pickle of a ``.pt``/``.bin``,
    the JSON header of a ``.safetensors``); images are read whole (their data is in the picture).

    Whatever the header alone cannot settle (an unusual pickle, a damaged header, a layout that fits nothing) is
    read the way ``load_embedding`` reads it, so a file is refused with the same one-line reason either way.
    Values (NaN, integer vectors) are checked only when the file is loaded for a prompt. ``hash=False`` leaves
    ``hash`` None when the header sufficed (a caller that keeps hashes across runs asks for it only when needed).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix not in EMBEDDING_SUFFIXES:
        return _info_of(_read(p).embedding)
    try:
        with open_regular(p) as handle:
            size = os.fstat(handle.fileno()).st_size
            header: object = _safetensors_header(handle, size) if suffix == ".safetensors" else None
    except UnsafeFileError as exc:
        raise EmbeddingFileError(str(exc)) from None
    if size == 0:
        raise EmbeddingFileError(f"{p}: empty file (0 bytes)")
    if header is None and suffix in PICKLE_SUFFIXES:
        try:
            header = read_metadata(p)
        except UnsafeFileError:
            header = None
    shape = _shape_of(header) if header is not None else None
    if shape is None:
        return _info_of(_read(p).embedding)
    vectors, width, sdxl = shape
    digest = file_sha256(p) if hash and size <= HASH_AT_LISTING_BYTES else None
    return EmbeddingInfo(name=p.stem, vectors=vectors, width=width, sdxl=sdxl, hash=digest)


def _info_of(embedding: Embedding) -> EmbeddingInfo:
    return EmbeddingInfo(
        name=embedding.name, vectors=embedding.vector_count, width=embedding.width, sdxl=embedding.is_sdxl,
        hash=embedding.hash,
    )


def _safetensors_header(handle: Any, size: int) -> dict[str, Any] | None:
    """The tensors a safetensors header declares, as TensorInfo; None when the header is not plainly valid."""
    head = handle.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < length <= min(size - 8, _MAX_SAFETENSORS_HEADER):
        return None
    try:
        header = json.loads(handle.read(length))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    tensors: dict[str, Any] = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (
            not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets)
            or offsets[1] > size - 8 - length
        ):
            return None
        tensors[key] = TensorInfo(tuple(shape), str(entry.get("dtype", "")))
    return tensors


def _shape_of(data: object) -> tuple[int, int, bool] | None:
    """(vectors, width, sdxl) in ``_from_data``'s layout order, from tensor shapes; None when unsure."""
    if not isinstance(data, Mapping):
        return None
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            return None
        return _vectors_shape(next(iter(params.values())))
    if "clip_l" in data and "clip_g" in data:
        if not all(isinstance(v, TensorInfo) for v in data.values()):
            return None
        pair = [_vectors_shape(data[key]) for key in SDXL_ENCODERS]
        if pair[0] is None or pair[1] is None or pair[0][0] != pair[1][0]:
            return None
        return pair[1][0], pair[0][1] + pair[1][1], True
    if len(data) == 1:
        return _vectors_shape(next(iter(data.values())))
    return None


def _vectors_shape(value: object) -> tuple[int, int, bool] | None:
    if not isinstance(value, TensorInfo):
        return None
    shape = value.shape if len(value.shape) != 1 else (1, *value.shape)
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        return None
    return shape[0], shape[1], False


def describe_embedding(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``inspect`` shows: name, layout, carrier, vector count, width, training facts and hashes."""
    parsed = _read(Path(path))
    emb = parsed.embedding
    info: dict[str, Any] = {
        "kind": "embedding",
        "path": str(path),
        "name": emb.name,
        "layout": parsed.layout,
        "vectors": emb.vector_count,
        "width": emb.width,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
        "sha256": emb.hash,
        "short_hash": emb.short_hash,
    }
    if parsed.carrier is not None:
        info["carrier"] = parsed.carrier
    if emb.is_sdxl:
        assert not isinstance(emb.vectors, Tensor)
        info["encoders"] = {key: int(emb.vectors[key].shape[-1]) for key in SDXL_ENCODERS}
    else:
        info["checksum"] = emb.checksum()
        info["norms"] = [round(float(v), 4) for v in emb.tensor().norm(dim=1)]
    return info


def _read(path: Path) -> _Parsed:
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingFileError(f"{path}: not an embedding file (expected {', '.join(EMBEDDING_SUFFIXES)})")
    try:
        # Never hand a FIFO, socket or device to a reader: opening a FIFO blocks until a writer comes.
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
    except UnsafeFileError as exc:
        raise EmbeddingFileError(str(exc)) from None
    if size == 0:
        raise EmbeddingFileError(f"{path}: empty file (0 bytes)")
    carrier = None
    name = path.stem
    if suffix in PICKLE_SUFFIXES:
        try:
            data: object = load_torch_file(path)
        except UnsafeFileError as exc:
            raise EmbeddingFileError(str(exc)) from None
    elif suffix == ".safetensors":
        data = _read_safetensors(path)
    else:
        data, carrier = _read_image(path)
        stored = data.get("name") if isinstance(data, Mapping) else None
        if isinstance(stored, str) and stored:
            name = stored
    try:
        embedding, layout = _from_data(data, name)
    except EmbeddingError as exc:
        raise EmbeddingFileError(f"{path}: {exc}") from None
    return _Parsed(replace(embedding, hash=file_sha256(path)), layout, carrier)


def read_safetensors_tensors(path: str | os.PathLike[str], wanted: Callable[[str], bool]) -> dict[str, Tensor]:
    """The tensors of a safetensors file whose keys ``wanted`` accepts (others are never read), with the checks
    every embedding read gets (regular file, a real safetensors header); ``EmbeddingFileError`` otherwise."""
    return {k: v for k, v in _read_safetensors(Path(path), wanted).items() if k != "__metadata__"}


def _read_safetensors(path: Path, wanted: Callable[[str], bool] | None = None) -> dict[str, Any]:
    try:
        with open_regular(path) as opened:
            _check_safetensors_header(opened, path)
            # safetensors opens by name: give it the descriptor already checked to be a regular file (Linux), so a
            # FIFO swapped in after the check is never opened.
            proc = f"/proc/self/fd/{opened.fileno()}"
            name = proc if os.path.exists(proc) else str(path)
            with safe_open(name, framework="pt", device="cpu") as handle:  # type: ignore[no-untyped-call]
                data: dict[str, Any] = {key: handle.get_tensor(key) for key in handle.keys()
                                        if wanted is None or wanted(key)}
                metadata = handle.metadata() or {}
    except EmbeddingFileError:
        raise
    except UnsafeFileError as exc:
        raise EmbeddingFileError(str(exc)) from None
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        reason = _first_line(exc).removeprefix("Error while deserializing header: ")
        raise EmbeddingFileError(f"{path}: not a readable safetensors file ({reason})") from None
    # A1111 reads no safetensors metadata; we keep our own training facts there and read them back.
    return {"__metadata__": metadata, **data} if metadata else data


def _check_safetensors_header(handle: Any, path: Path) -> None:
    """A safetensors file starts with the length of its JSON header, then ``{``: say what the file is otherwise."""
    head = handle.read(4096)
    size = os.fstat(handle.fileno()).st_size
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if len(head) < 10 or not 0 < length <= size - 8 or head[8:9] != b"{":
        if head[8:10] == b'{"':
            what = "a truncated safetensors file (shorter than its header says)"
        else:
            foreign = describe_foreign(head)
            what = foreign.replace("not a torch file", "not a safetensors file") if foreign else (
                "a torch pickle, not a safetensors file (rename it to .pt)"
            )
        raise EmbeddingFileError(f"{path}: {what}")
    handle.seek(0)


def embedding_from_data(data: object, name: str) -> Embedding:
    """Interpret a loaded object in A1111's layout order; raise EmbeddingError when it fits none."""
    return _from_data(data, name)[0]


def _from_data(data: object, name: str) -> tuple[Embedding, str]:
    metadata: Mapping[str, str] = {}
    if isinstance(data, Mapping) and "__metadata__" in data:
        metadata = data["__metadata__"]
        data = {k: v for k, v in data.items() if k != "__metadata__"}
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"expected a dict of tensors, got {type(data).__name__}")
    vectors: Tensor | dict[str, Tensor]
    if "string_to_param" in data:
        params: Any = data["string_to_param"]
        # Files saved by torch 1.11 hold an nn.ParameterDict; its tensors live in ``_parameters``.
        params = getattr(params, "_parameters", params)
        if not isinstance(params, Mapping) or len(params) != 1:
            count = len(params) if isinstance(params, Mapping) else 0
            raise EmbeddingError(f"string_to_param must hold exactly one term, found {count}")
        vectors = _tensor(next(iter(params.values())), "string_to_param")
        layout = "string_to_param"
    elif "clip_l" in data and "clip_g" in data:
        not_tensors = [str(k) for k, v in data.items() if not isinstance(v, Tensor)]
        if not_tensors:
            raise EmbeddingError(f"SDXL embedding values must all be tensors (not: {', '.join(not_tensors)})")
        vectors = {key: data[key] for key in SDXL_ENCODERS}
        layout = "sdxl clip_l+clip_g"
    elif data and isinstance(next(iter(data.values())), Tensor):
        if len(data) != 1:
            raise EmbeddingError(f"embedding file has multiple terms in it ({len(data)} keys)")
        key = next(iter(data))
        vectors = data[key]
        layout = f"single tensor {str(key)!r}"
    else:
        raise EmbeddingError(
            "neither a textual inversion embedding (string_to_param), an SDXL pair (clip_l, clip_g) nor a dict "
            "with one tensor"
        )
    step = _as_int(data.get("step", metadata.get("step")))
    checkpoint = data.get("sd_checkpoint", metadata.get("sd_checkpoint"))
    checkpoint_name = data.get("sd_checkpoint_name", metadata.get("sd_checkpoint_name"))
    embedding = Embedding(
        name=name,
        vectors=vectors,
        step=step,
        sd_checkpoint=checkpoint if isinstance(checkpoint, str) else None,
        sd_checkpoint_name=checkpoint_name if isinstance(checkpoint_name, str) else None,
    )
    return embedding, layout


def _tensor(value: object, where: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise EmbeddingError(f"{where} holds {type(value).__name__}, not a tensor")
    return value


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        return int(value.item())
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Images: the sd-ti-embedding text chunk and the pixel strips (a1111-compat §1.5)
# ---------------------------------------------------------------------------------------------------------------


def _read_image(path: Path) -> tuple[dict[str, Any], str]:
    try:
        with open_regular(path) as opened, Image.open(opened) as image:
            image.load()
            text = getattr(image, "text", None)
            # A1111 tries the text chunk first, and only on images that have text chunks (PNG).
            if isinstance(text, Mapping) and TEXT_CHUNK_KEY in text:
                try:
                    return decode_json(base64.b64decode(text[TEXT_CHUNK_KEY])), "text chunk"
                except (ValueError, TypeError) as exc:
                    raise EmbeddingFileError(f"{path}: bad {TEXT_CHUNK_KEY} text chunk ({_first_line(exc)})") from None
            data = extract_from_pixels(image)
    except EmbeddingFileError:
        raise
    except UnsafeFileError as exc:
        raise EmbeddingFileError(str(exc)) from None
    except UnidentifiedImageError:
        raise EmbeddingFileError(f"{path}: {_not_an_image(path)}") from None
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise EmbeddingFileError(f"{path}: not a readable image ({_first_line(exc)})") from None
    if data is None:
        raise NoEmbeddedData(f"{path}: the image carries no embedding (a preview picture)")
    return data, "pixels"


def _not_an_image(path: Path) -> str:
    """What a file PIL cannot identify is, from its first bytes (PIL's own message names only a file object)."""
    try:
        with open_regular(path) as handle:
            head = handle.read(4096)
    except UnsafeFileError as exc:
        return str(exc)
    foreign = describe_foreign(head)
    if foreign is None:
        return "a torch file, not an image (rename it to .pt)"
    if foreign.endswith("image, not a torch file"):
        return f"a damaged {foreign.removesuffix(', not a torch file').removeprefix('a ')}"
    return foreign.replace("not a torch file", "not an image")


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def a1111_data(embedding: Embedding) -> dict[str, Any]:
    """The dict A1111's ``Embedding.save`` writes (§1.8), or ``{clip_l, clip_g}`` for SDXL embeddings."""
    if not isinstance(embedding.vectors, Tensor):
        return {key: embedding.vectors[key].clone() for key in SDXL_ENCODERS}
    return {
        "string_to_token": {"*": _STAR_TOKEN_ID},
        "string_to_param": {"*": embedding.vectors.clone()},
        "name": embedding.name,
        "step": embedding.step,
        "sd_checkpoint": embedding.sd_checkpoint,
        "sd_checkpoint_name": embedding.sd_checkpoint_name,
    }


def save_embedding(
    embedding: Embedding,
    path: str | os.PathLike[str],
    *,
    picture: Image.Image | None = None,
    file_format: str | None = None,
) -> Path:
    """Write ``embedding`` atomically in the format the extension names; return the path.

    ``.safetensors`` (default choice): ``{name: [n, width]}`` (or ``clip_l``/``clip_g``) with the training facts in
    metadata; diffusers' ``load_textual_inversion`` takes the key as its token. ``.pt``: A1111's exact dict, in a
    pickle A1111's safe unpickler accepts. ``.bin``: diffusers' ``{name: tensor}``. ``.png``: ``picture`` (a plain
    one by default) with both A1111 carriers, the text chunk and the pixel strips; ``.webp``: the pixel strips,
    lossless. ``file_format`` (an extension) overrides the path's, to write a temporary file in a given format.
    """
    target = Path(path)
    suffix = (file_format or target.suffix).lower()
    try:
        if suffix == ".safetensors":
            _save_safetensors(embedding, target)
        elif suffix == ".pt":
            save_torch_file(a1111_data(embedding), target)
        elif suffix == ".bin":
            save_torch_file(_single_key_data(embedding), target)
        elif suffix in IMAGE_SUFFIXES:
            _save_image(embedding, target, picture, suffix)
        else:
            raise EmbeddingFileError(
                f"{target}: cannot choose a format for {suffix or 'no extension'} "
                f"(use {', '.join(EMBEDDING_SUFFIXES)})"
            )
    except EmbeddingError as exc:
        raise EmbeddingFileError(f"{target}: {exc}") from None
    return target


def _single_key_data(embedding: Embedding) -> dict[str, Tensor]:
    if not isinstance(embedding.vectors, Tensor):
        return {key: embedding.vectors[key].clone() for key in SDXL_ENCODERS}
    return {embedding.name: embedding.vectors.clone()}


def _save_safetensors(embedding: Embedding, target: Path) -> None:
    metadata = {"format": "pt"}
    for key in ("step", "sd_checkpoint", "sd_checkpoint_name"):
        value = getattr(embedding, key)
        if value is not None:
            metadata[key] = str(value)
    blob = save(_single_key_data(embedding), metadata=metadata)
    with atomic_path(target) as tmp:
        tmp.write_bytes(blob)


def _save_image(embedding: Embedding, target: Path, picture: Image.Image | None, suffix: str) -> None:
    if embedding.is_sdxl:
        raise EmbeddingError("SDXL embeddings (clip_l + clip_g) cannot be stored in images; A1111's carriers hold one tensor")
    if target.name.lower().endswith(tuple(f".preview{s}" for s in IMAGE_SUFFIXES)):
        raise EmbeddingError("A1111 treats *.preview images as preview pictures and never reads an embedding from them")
    data = a1111_data(embedding)
    canvas = embed_in_pixels(picture if picture is not None else default_picture(embedding), data)
    buffer = io.BytesIO()
    if suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text(TEXT_CHUNK_KEY, base64.b64encode(encode_json(data)).decode("ascii"))
        canvas.save(buffer, format="PNG", pnginfo=info)
    else:
        canvas.save(buffer, format="WEBP", lossless=True, quality=100, method=1, exact=True)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())
