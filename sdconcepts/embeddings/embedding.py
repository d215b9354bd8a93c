"""A textual inversion embedding as a value: its prompt word, its vectors and the facts A1111 keeps beside them.

File layouts live in ``embeddings.files``; this module knows nothing about disk.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import Tensor

__all__ = [
    "SDXL_ENCODERS",
    "Embedding",
    "EmbeddingError",
    "kind_mismatch",
    "kind_mismatch_reason",
    "names_in_prompt",
    "sdxl_width",
]

# SDXL files carry one tensor per text encoder; A1111's width for them is the sum (768 + 1280 = 2048).
SDXL_ENCODERS = ("clip_l", "clip_g")


class EmbeddingError(ValueError):
    """Vectors that cannot form an embedding (wrong rank, non-float, NaN, mismatched SDXL pair)."""


def sdxl_width(vectors: Mapping[str, Tensor]) -> int:
    return sum(int(vectors[key].shape[-1]) for key in SDXL_ENCODERS)


@dataclass(frozen=True, eq=False)
class Embedding:
    """An embedding: ``vectors`` is float32 ``[n, width]``, or for SDXL a mapping ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``.

    ``name`` is the prompt word. ``step``, ``sd_checkpoint`` (a checkpoint's short hash) and ``sd_checkpoint_name``
    are A1111's training facts, ``None`` when the file has none. ``hash`` is the SHA-256 of the file it came from
    (A1111 hashes whole files), ``None`` for an embedding that has not been read from disk.
    """

    name: str
    vectors: Tensor | Mapping[str, Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    hash: str | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.vectors, Tensor):
            object.__setattr__(self, "vectors", _checked(self.vectors, self.name))
            return
        missing = [key for key in SDXL_ENCODERS if key not in self.vectors]
        if missing:
            raise EmbeddingError(
                f"embedding {self.name!r}: per-encoder vectors need both clip_l and clip_g (missing {', '.join(missing)})"
            )
        pair = {key: _checked(self.vectors[key], f"{self.name}[{key}]") for key in SDXL_ENCODERS}
        counts = {int(t.shape[0]) for t in pair.values()}
        if len(counts) != 1:
            raise EmbeddingError(f"embedding {self.name!r}: clip_l and clip_g have different vector counts")
        object.__setattr__(self, "vectors", MappingProxyType(pair))

    @property
    def is_sdxl(self) -> bool:
        return not isinstance(self.vectors, Tensor)

    @property
    def vector_count(self) -> int:
        """Prompt positions the embedding takes (A1111's ``vectors``)."""
        if isinstance(self.vectors, Tensor):
            return int(self.vectors.shape[0])
        return int(self.vectors["clip_g"].shape[0])

    @property
    def width(self) -> int:
        """A1111's ``shape``: the vector width, or clip_l + clip_g for SDXL (2048); compared to the model's width."""
        if isinstance(self.vectors, Tensor):
            return int(self.vectors.shape[-1])
        return sdxl_width(self.vectors)

    @property
    def short_hash(self) -> str | None:
        """A1111's TI short hash: the first 12 hex digits of the file's SHA-256."""
        return self.hash[:12] if self.hash else None

    def tensor(self) -> Tensor:
        """The ``[n, width]`` vectors of a single-encoder embedding."""
        if not isinstance(self.vectors, Tensor):
            raise EmbeddingError(f"embedding {self.name!r} holds SDXL per-encoder vectors, not one tensor")
        return self.vectors

    def joined(self) -> Tensor:
        """The vectors as the model's text conditioning lays its width out: the one tensor, or for SDXL
        ``clip_l`` then ``clip_g`` side by side ``[n, 768 + 1280]`` (the order sgm's conditioner concatenates)."""
        if isinstance(self.vectors, Tensor):
            return self.vectors
        return torch.cat([self.vectors[key] for key in SDXL_ENCODERS], dim=-1)

    def checksum(self) -> str:
        """A1111's legacy 4-hex checksum (links ``.optim`` files): fold ``int(v * 100)`` over the flat vectors
        (SDXL: over clip_l and clip_g side by side; A1111 never trains SDXL embeddings, so this is ours)."""
        flat = self.joined().reshape(-1) * 100
        result = 0
        for value in flat.tolist():
            result = ((result * 281) ^ (math.trunc(value) * 997)) & 0xFFFFFFFF
        return f"{result & 0xFFFF:04x}"


def _checked(vectors: Tensor, label: str) -> Tensor:
    if not isinstance(vectors, Tensor):
        raise EmbeddingError(f"embedding {label!r}: expected a tensor, got {type(vectors).__name__}")
    if not (vectors.dtype.is_floating_point):
        raise EmbeddingError(f"embedding {label!r}: expected floating-point vectors, got {vectors.dtype}")
    if vectors.ndim == 1:
        # A1111 reads a single vector [dim] as [1, dim] (diffusers' learned_embeds.bin).
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise EmbeddingError(f"embedding {label!r}: expected vectors shaped [n, width], got {list(vectors.shape)}")
    out = vectors.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not bool(torch.isfinite(out).all()):
        raise EmbeddingError(f"embedding {label!r}: the vectors contain NaN or infinite values")
    return out


def kind_mismatch(embedding: Embedding, *, sdxl: bool, encoder_widths: Sequence[int] | None = None) -> str | None:
    """Why an embedding cannot apply to an SDXL (``sdxl``) or SD 1/2 model whatever its width, or None.

    ``encoder_widths`` (an SDXL model's clip_l and clip_g widths): each half must be as wide as its own encoder; a
    pair whose total fits but whose halves are swapped would give each encoder parts of the other's half.
    """
    reason = kind_mismatch_reason(embedding.is_sdxl, embedding.width, sdxl=sdxl)
    if reason is None and embedding.is_sdxl and encoder_widths is not None and len(encoder_widths) == 2:
        halves = [int(embedding.vectors[key].shape[-1]) for key in SDXL_ENCODERS]  # type: ignore[index]
        if halves != [int(w) for w in encoder_widths]:
            return (f"its halves are clip_l {halves[0]} and clip_g {halves[1]} wide, the model's encoders "
                    f"{encoder_widths[0]} and {encoder_widths[1]}"
                    + (" (the halves are swapped)" if halves[::-1] == [int(w) for w in encoder_widths] else ""))
    return reason


def kind_mismatch_reason(embedding_sdxl: bool, width: int, *, sdxl: bool) -> str | None:
    """``kind_mismatch`` from what a file's header says (the cards list files without reading their vectors)."""
    if embedding_sdxl and not sdxl:
        return "an SDXL embedding (clip_l + clip_g) needs an SDXL model"
    if sdxl and not embedding_sdxl:
        return f"a single-encoder embedding (width {width}, SD 1.x/2.x) does not fit an SDXL model"
    return None


def names_in_prompt(prompt: str, names: Iterable[str]) -> list[str]:
    """The names that occur in ``prompt`` as whole words, case-insensitively (as A1111's token matching sees them)."""
    found = []
    for name in names:
        if name and re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", prompt, flags=re.IGNORECASE):
            found.append(name)
    return found
