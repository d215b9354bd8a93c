"""An embedding inside a picture, as A1111 stores it: JSON whose tensors are ``TORCHTENSOR`` lists, zlib-packed
into pixel strips on the picture's sides with A1111's keystream and dot pattern (a1111-compat §1.5), and the
default picture drawn for an embedding saved as an image without one. Reading the file is ``embeddings.files``.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from sdconcepts.embeddings.embedding import Embedding, EmbeddingError

__all__ = ["TENSOR_KEY", "decode_json", "default_picture", "embed_in_pixels", "encode_json", "extract_from_pixels"]

TENSOR_KEY = "TORCHTENSOR"
# An embedding's JSON is at most a few MB (75 vectors of 1280 floats); refuse a zlib stream that inflates past this.
_MAX_JSON_BYTES = 64 << 20
_DEFAULT_PICTURE_SIZE = 256


def encode_json(data: Mapping[str, Any]) -> bytes:
    """A1111's embedding JSON: tensors as ``{TORCHTENSOR: nested lists}``."""

    def default(obj: object) -> object:
        if isinstance(obj, Tensor):
            return {TENSOR_KEY: obj.detach().cpu().numpy().tolist()}
        raise TypeError(f"cannot store {type(obj).__name__} in an embedding image")

    return json.dumps(data, default=default).encode()


def decode_json(raw: bytes) -> dict[str, Any]:
    """The embedding data of A1111's JSON, ``TORCHTENSOR`` lists back as tensors; ValueError when it is no object."""

    def hook(obj: dict[str, Any]) -> object:
        if TENSOR_KEY in obj:
            array = np.asarray(obj[TENSOR_KEY], dtype=np.float64)
            return torch.from_numpy(array)
        return obj

    data = json.loads(raw, object_hook=hook)
    if not isinstance(data, dict):
        raise ValueError("the embedded JSON is not an object")
    return data


def _keystream(count: int) -> np.ndarray:
    """A1111's xor_block key: LCG (a=1664525, c=1013904223, m=2^32, seed 0), each state ``% 255``, masked to 4 bits."""
    a, c, mask = 1664525, 1013904223, 0xFFFFFFFF
    block = 4096
    states = np.empty(block, dtype=np.uint64)
    state = 0
    for i in range(block):
        state = (a * state + c) & mask
        states[i] = state
    # Jump a whole block at once: s[k + block] = A * s[k] + C (mod 2^32), with A, C the block-fold of (a, c).
    jump_a, jump_c = 1, 0
    for _ in range(block):
        jump_a, jump_c = (a * jump_a) & mask, (a * jump_c + c) & mask
    blocks = [states]
    total = block
    while total < count:
        states = (np.uint64(jump_a) * states + np.uint64(jump_c)) & np.uint64(mask)
        blocks.append(states)
        total += block
    stream = np.concatenate(blocks)[:count]
    return np.asarray((stream % np.uint64(255)).astype(np.uint8) & np.uint8(0x0F), dtype=np.uint8)


def _xor(block: np.ndarray) -> np.ndarray:
    key = _keystream(int(block.size)).reshape(block.shape)
    return np.asarray(np.bitwise_xor(block.astype(np.uint8), key), dtype=np.uint8)


def _dot_pattern(block: np.ndarray, shades: np.ndarray) -> np.ndarray:
    """Grey 6-px dots on an 8-px grid (alternate rows shifted 4 px), XOR-ed into the high nibble only (A1111's style_block)."""
    height, width = block.shape[:2]
    canvas = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(canvas)
    index = 0
    for x in range(-6, width, 8):
        for row, y in enumerate(range(-6, height, 8)):
            shift = 4 if row % 2 == 0 else 0
            shade = int(shades[index % len(shades)])
            index += 1
            draw.ellipse((x + shift, y, x + 6 + shift, y + 6), fill=(shade, shade, shade))
    return np.asarray(block ^ (np.asarray(canvas, dtype=np.uint8) & 0xF0), dtype=np.uint8)


def embed_in_pixels(picture: Image.Image, data: Mapping[str, Any]) -> Image.Image:
    """Return ``picture`` with the data's two nibble strips beside it, as A1111's ``insert_image_data_embed`` lays out."""
    params = data.get("string_to_param")
    if not isinstance(params, Mapping) or not params:
        raise EmbeddingError("only string_to_param embeddings can be stored in images (as in A1111)")
    payload = np.frombuffer(zlib.compress(encode_json(data), level=9), dtype=np.uint8)
    height, depth = picture.size[1], 3
    # A1111 rounds up to a multiple of h, then of h*3, adding a whole h (h*3) when already exact.
    size = len(payload) + (height - len(payload) % height)
    size += height * depth - size % (height * depth)
    # np.resize repeats the bytes cyclically; zlib stops at its end marker and ignores the rest.
    low = np.resize(payload & 0x0F, size).reshape(height, -1, depth)
    high = np.resize(payload >> 4, size).reshape(height, -1, depth)

    first = next(iter(params.values()))
    sample = np.abs(np.asarray(first.detach().cpu().reshape(first.shape[0], -1)[0].tolist()[:1024], dtype=np.float64))
    peak = float(sample.max()) if sample.size else 0.0
    shades = (sample / peak * 255).astype(np.uint8) if peak > 0 else np.zeros(max(sample.size, 1), dtype=np.uint8)

    low_strip = Image.fromarray(_xor(_dot_pattern(low, shades)), mode="RGB")
    high_strip = Image.fromarray(_xor(_dot_pattern(high, shades[::-1])), mode="RGB")
    canvas = Image.new("RGB", (low_strip.size[0] + 1 + picture.size[0] + 1 + high_strip.size[0], height), (0, 0, 0))
    canvas.paste(low_strip, (0, 0))
    canvas.paste(picture.convert("RGB"), (low_strip.size[0] + 1, 0))
    canvas.paste(high_strip, (low_strip.size[0] + 1 + picture.size[0] + 1, 0))
    return canvas


def extract_from_pixels(image: Image.Image) -> dict[str, Any] | None:
    """Decode the pixel strips (A1111's ``extract_image_data_embed``); ``None`` when the image carries none."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    lit = np.all(pixels > 0, axis=2)
    if not bool(np.any(lit)):
        return None
    cols, rows = np.flatnonzero(np.any(lit, axis=0)), np.flatnonzero(np.any(lit, axis=1))
    nibbles = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] & 0x0F
    dark = np.flatnonzero(nibbles.sum(axis=(0, 2)) == 0)
    if len(dark) < 2:
        return None
    lower = _xor(nibbles[:, : dark[0]])
    upper = _xor(nibbles[:, dark[-1] + 1 :])
    if lower.shape != upper.shape or lower.size == 0:
        return None
    stream = ((upper << 4) | lower).astype(np.uint8).tobytes()
    inflate = zlib.decompressobj()
    try:
        raw = inflate.decompress(stream, _MAX_JSON_BYTES)
        if inflate.unconsumed_tail or not inflate.eof:
            return None
        return decode_json(raw)
    except (zlib.error, ValueError):
        return None


def default_picture(embedding: Embedding) -> Image.Image:
    """A plain picture for an image carrier when none is given: a soft gradient tinted by the vectors."""
    vec = embedding.tensor()[0]
    tint = (vec[:3].abs() / (vec.abs().max() + 1e-12) * 127).tolist() + [0.0] * 3
    size = _DEFAULT_PICTURE_SIZE
    ramp = np.linspace(64, 192, size, dtype=np.float64)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    for channel in range(3):
        pixels[:, :, channel] = np.clip(ramp[:, None] * 0.5 + ramp[None, :] * 0.5 + tint[channel] - 32, 1, 255)
    return Image.fromarray(pixels, mode="RGB")
