"""SD 1.x embeddings on SDXL models: a map from one text encoder's token table to another's, fitted on the tokens
the two share, and the conversion of an embedding's vectors through it.

Every CLIP text encoder of SD 1.x, SD 2.x and SDXL reads the same 49,408-token BPE vocabulary, so row ``i`` of one
token table and row ``i`` of another name the same token. ``fit_token_map`` fits an affine map ``y = x W + b`` from
the source table's rows to the target's by ridge regression on the shared tokens, its strength chosen by 5-fold
cross-validation on held-out tokens (docs/sdxl-conversion.md has the figures). Rows a text encoder never learned
keep their random initial values and carry no relation to the other table; a small model (the embedded toy models
learn about 50 words) has almost only such rows, and they would shrink the map towards zero, so when a table has
such an untrained bulk (``learned_tokens``) only the tokens both tables learned are fitted. A vector is converted
anchored (``TokenMap.apply``): its nearest fitted token is taken exactly from the target table and only its offset
from that token goes through the map.

When the source table *is* the target table (a real SD 1.x embedding on SDXL: both use CLIP ViT-L/14), the map is
the identity and the vectors are copied exactly. ``nearest_token_vectors`` is SD.Next's way (each vector replaced by
its nearest source token's rows), kept for comparison.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor

from sdconcepts.atomic_files import atomic_path
from sdconcepts.embeddings.embedding import SDXL_ENCODERS, Embedding
from sdconcepts.hash_cache import default_cache_dir

log = logging.getLogger(__name__)

__all__ = [
    "ConversionError",
    "MapCache",
    "TokenMap",
    "convert_embedding",
    "convert_vectors",
    "default_map_cache",
    "fit_token_map",
    "learned_tokens",
    "nearest_token_vectors",
    "table_hash",
]

FOLDS = 5
# Ridge strengths, as multiples of the mean diagonal of XᵀX (scale-free: the same grid fits any table's scale).
ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0)
# Fewer shared learned tokens than this cannot fix a map worth using.
MIN_TOKENS = 16
# CLIP's start and end tokens, the same ids in every SD text encoder's vocabulary: never an anchor for a word.
CLIP_SPECIAL_IDS = (49406, 49407)


class ConversionError(ValueError):
    """A conversion that cannot be made (no shared vocabulary, too few learned tokens, wrong widths)."""


@dataclass(frozen=True)
class TokenMap:
    """The ridge map ``x @ weight + bias`` from a source table's width to a target's, fitted on ``token_ids``;
    ``identity`` when the tables are equal.

    ``alpha``: the ridge strength cross-validation chose; ``heldout_cosine``: the mean cosine between mapped and true
    target rows of held-out tokens (1.0 for identity); ``seconds``: the fitting time.
    """

    weight: Tensor
    bias: Tensor
    token_ids: Tensor
    alpha: float
    heldout_cosine: float
    seconds: float = 0.0
    identity: bool = False

    @property
    def tokens(self) -> int:
        return int(self.token_ids.numel())

    def apply(self, vectors: Tensor, source: Tensor | None = None, target: Tensor | None = None) -> Tensor:
        """``vectors`` mapped. With the two tables, anchored: each vector's nearest fitted token (cosine) is taken
        exactly from the target table and only the vector's offset from that token goes through the map,
        ``target[t] + (x - source[t]) @ weight``, so a vector equal to a token's row becomes exactly that token's
        row in the target (the global map alone misses even the tokens it was fitted on; docs/sdxl-conversion.md
        measures both). Without the tables: the global map ``x @ weight + bias``."""
        if self.identity:
            return vectors.detach().float().cpu().clone()
        x = vectors.detach().double().cpu()
        weight = self.weight.double()
        if source is None or target is None:
            return (x @ weight + self.bias.double()).float().contiguous()
        anchors = self.token_ids[~torch.isin(self.token_ids, torch.tensor(CLIP_SPECIAL_IDS))]
        rows = source.detach().cpu()[anchors].float()
        query = vectors.detach().float().cpu()
        cosines = (query / query.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (
            rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
        nearest = anchors[cosines.argmax(dim=1)]
        start, end = source.detach().cpu()[nearest].double(), target.detach().cpu()[nearest].double()
        return (end + (x - start) @ weight).float().contiguous()

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.weight.float().contiguous(), "bias": self.bias.float().contiguous(),
                "token_ids": self.token_ids.long().contiguous()}


def table_hash(table: Tensor) -> str:
    """SHA-256 of a token table's float32 values: the key the fitted maps are cached under."""
    data = table.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def learned_tokens(table: Tensor) -> Tensor | None:
    """The rows of ``table`` that training moved away from their random start, or None when the table has no
    untrained bulk (every row is used).

    A row never trained is ``d`` independent Gaussian values, whose norm lies within about ``1/sqrt(2d)`` (relative)
    of the typical norm. A table where 90 % of the rows lie within 3 such spreads of the median norm is mostly
    untrained; its learned rows are those more than 5 spreads above the median (the embedded toy models: about 50
    rows of 49,408). A trained model's rows have widely spread norms and are all kept.
    """
    norms = table.detach().double().cpu().norm(dim=1)
    median = float(norms.median())
    spread = 1.0 / math.sqrt(2 * table.shape[1])
    relative = norms / max(median, 1e-12)
    if float(((relative - 1).abs() <= 3 * spread).double().mean()) < 0.9:
        return None
    learned: Tensor = (relative > 1 + 5 * spread).nonzero().flatten()
    return learned


def _shared_tokens(source: Tensor, target: Tensor) -> Tensor:
    if source.shape[0] != target.shape[0]:
        raise ConversionError(f"the token tables have {source.shape[0]} and {target.shape[0]} rows: the text encoders "
                              "do not share one vocabulary")
    picks = [rows for rows in (learned_tokens(source), learned_tokens(target)) if rows is not None]
    if not picks:
        return torch.arange(source.shape[0])
    chosen = set(picks[0].tolist()).intersection(*(set(p.tolist()) for p in picks[1:]))
    if len(chosen) < MIN_TOKENS:
        raise ConversionError(f"the two text encoders share only {len(chosen)} learned tokens (at least {MIN_TOKENS} "
                              "are needed to fit a map between them)")
    return torch.tensor(sorted(chosen), dtype=torch.long)


@dataclass(frozen=True)
class _Sums:
    """What ridge regression needs of a set of rows: count, sums, and the products xᵀx, xᵀy, Σ|y|²."""

    n: int
    sx: Tensor
    sy: Tensor
    xx: Tensor
    xy: Tensor
    yy: float

    @classmethod
    def of(cls, x: Tensor, y: Tensor) -> _Sums:
        return cls(len(x), x.sum(0), y.sum(0), x.T @ x, x.T @ y, float((y * y).sum()))

    def __sub__(self, other: _Sums) -> _Sums:
        return _Sums(self.n - other.n, self.sx - other.sx, self.sy - other.sy, self.xx - other.xx,
                     self.xy - other.xy, self.yy - other.yy)

    def ridge(self, alpha: float) -> tuple[Tensor, Tensor]:
        """``(weight, bias)`` minimising the squared error plus ``alpha`` x the mean diagonal of the centred xᵀx
        times ``|weight|²`` (scale-free; the bias is not penalised)."""
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        gram = self.xx - self.n * torch.outer(mean_x, mean_x)
        scale = float(gram.diagonal().mean()) or 1.0
        eye = torch.eye(gram.shape[0], dtype=gram.dtype)
        weight = torch.linalg.solve(gram + alpha * scale * eye, self.xy - self.n * torch.outer(mean_x, mean_y))
        return weight, mean_y - mean_x @ weight

    def squared_error(self, weight: Tensor, bias: Tensor) -> float:
        """Σ|y - (x @ weight + bias)|² over these rows, from the sums alone."""
        fitted = float(((self.xx @ weight) * weight).sum()) + 2 * float(bias @ (self.sx @ weight)) + self.n * float(bias @ bias)
        return self.yy - 2 * (float((weight * self.xy).sum()) + float(bias @ self.sy)) + fitted


def fit_token_map(source: Tensor, target: Tensor, *, seed: int = 0) -> TokenMap:
    """The ridge map from ``source``'s rows to ``target``'s on their shared (learned) tokens, strength by 5-fold
    cross-validation (lowest held-out squared error); the identity when the tables are equal."""
    start = time.perf_counter()
    if source.shape == target.shape and torch.equal(source.detach().cpu(), target.detach().cpu()):
        eye = torch.eye(source.shape[1])
        return TokenMap(eye, torch.zeros(source.shape[1]), torch.arange(source.shape[0]), 0.0, 1.0, 0.0,
                        identity=True)
    tokens = _shared_tokens(source, target)
    x = source.detach().double().cpu()[tokens]
    y = target.detach().double().cpu()[tokens]
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    folds = [order[i::FOLDS] for i in range(FOLDS)]
    # Each fold's sums once; a fold's training sums are the total's minus its own.
    held = [_Sums.of(x[f], y[f]) for f in folds]
    total = held[0]
    for part in held[1:]:
        total = _Sums(total.n + part.n, total.sx + part.sx, total.sy + part.sy, total.xx + part.xx,
                      total.xy + part.xy, total.yy + part.yy)
    errors = {alpha: sum(h.squared_error(*(total - h).ridge(alpha)) for h in held) for alpha in ALPHAS}
    alpha = min(ALPHAS, key=lambda a: errors[a])
    cosines = []
    for rows, part in zip(folds, held, strict=True):
        weight, bias = (total - part).ridge(alpha)
        cosines.append(torch.nn.functional.cosine_similarity(x[rows] @ weight + bias, y[rows], dim=1))
    weight, bias = total.ridge(alpha)
    return TokenMap(weight.float(), bias.float(), tokens, alpha, round(float(torch.cat(cosines).mean()), 4),
                    round(time.perf_counter() - start, 3))


class MapCache:
    """Fitted maps kept per (source table hash, target table hash): in memory, and as small safetensors files in
    ``folder`` (None: memory only). A damaged cache file is ignored and refitted."""

    def __init__(self, folder: str | os.PathLike[str] | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._maps: dict[tuple[str, str], TokenMap] = {}
        # A table's hash while that very tensor lives unchanged (SDXL's clip_g table is 250 MB to hash; on-the-fly
        # conversion asks for it on every generation).
        self._hashes: dict[int, tuple[weakref.ref[Tensor], int, str]] = {}

    def _hash(self, table: Tensor) -> str:
        known = self._hashes.get(id(table))
        if known is not None and known[0]() is table and known[1] == table._version:
            return known[2]
        digest = table_hash(table)
        self._hashes = {k: v for k, v in self._hashes.items() if v[0]() is not None}
        self._hashes[id(table)] = (weakref.ref(table), table._version, digest)
        return digest

    def path(self, source_hash: str, target_hash: str) -> Path | None:
        return self.folder / f"{source_hash[:16]}-{target_hash[:16]}.safetensors" if self.folder else None

    def get(self, source: Tensor, target: Tensor) -> TokenMap:
        key = (self._hash(source), self._hash(target))
        if key in self._maps:
            return self._maps[key]
        token_map = self._read(*key) if key[0] != key[1] else None
        if token_map is None:
            token_map = fit_token_map(source, target)
            if not token_map.identity:
                self._write(*key, token_map)
        self._maps[key] = token_map
        return token_map

    def _read(self, source_hash: str, target_hash: str) -> TokenMap | None:
        path = self.path(source_hash, target_hash)
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            data = load_file(str(path))
            if meta.get("source") != source_hash or meta.get("target") != target_hash:
                return None
            return TokenMap(data["weight"], data["bias"], data["token_ids"], float(meta["alpha"]),
                            float(meta["heldout_cosine"]), float(meta.get("seconds", 0.0)))
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as exc:  # a damaged file: fit again
            log.warning("ignoring the damaged token-map cache %s (%s)", path, str(exc).splitlines()[0][:200])
            return None

    def _write(self, source_hash: str, target_hash: str, token_map: TokenMap) -> None:
        path = self.path(source_hash, target_hash)
        if path is None:
            return
        meta = {"source": source_hash, "target": target_hash,
                "alpha": str(token_map.alpha), "heldout_cosine": str(token_map.heldout_cosine),
                "seconds": str(token_map.seconds)}
        try:
            with atomic_path(path) as tmp:
                tmp.write_bytes(save(token_map.tensors(), metadata=meta))
        except OSError as exc:  # a cache that cannot be written costs a refit next time, nothing else
            log.warning("cannot cache the token map in %s: %s", path, exc)


def default_map_cache() -> MapCache:
    """The maps under the cache folder (``hash_cache.default_cache_dir()/token-maps``, beside ``hashes.json``)."""
    return MapCache(default_cache_dir() / "token-maps")


def convert_vectors(vectors: Tensor, source: Tensor, targets: Mapping[str, Tensor], cache: MapCache) -> dict[str, Tensor]:
    """``vectors`` ``[n, source width]`` through the fitted map to each target table (``{"clip_l": .., "clip_g": ..}``)."""
    if vectors.ndim != 2 or vectors.shape[1] != source.shape[1]:
        raise ConversionError(f"the vectors are {list(vectors.shape)} and the source model's tokens "
                              f"{source.shape[1]} wide: the embedding was not trained on that model")
    return {key: cache.get(source, table).apply(vectors, source, table) for key, table in targets.items()}


def nearest_token_vectors(vectors: Tensor, source: Tensor, targets: Mapping[str, Tensor],
                          hidden: Sequence[int] = ()) -> dict[str, Tensor]:
    """SD.Next's conversion: each vector replaced by the target rows of its nearest source token (cosine)."""
    unit = source.detach().float().cpu()
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    query = vectors.detach().float().cpu()
    cosines = (query / query.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ unit.T
    if hidden:
        cosines[:, torch.tensor(list(hidden), dtype=torch.long)] = -math.inf
    nearest = cosines.argmax(dim=1)
    return {key: table.detach().float().cpu()[nearest].clone() for key, table in targets.items()}


def convert_embedding(embedding: Embedding, source: Tensor, clip_l: Tensor, clip_g: Tensor, cache: MapCache) -> Embedding:
    """An SDXL embedding (``clip_l``, ``clip_g``) from a single-encoder one trained with the ``source`` table.

    Where ``source`` equals ``clip_l`` (real SD 1.x and SDXL share CLIP ViT-L/14) ``clip_l`` is the original
    vectors exactly; ``clip_g`` (and otherwise both halves) comes through the fitted map.
    """
    if embedding.is_sdxl:
        raise ConversionError(f"{embedding.name} is already an SDXL embedding (clip_l + clip_g)")
    pair = convert_vectors(embedding.tensor(), source, dict(zip(SDXL_ENCODERS, (clip_l, clip_g), strict=True)), cache)
    return Embedding(name=embedding.name, vectors=pair, step=embedding.step, sd_checkpoint=embedding.sd_checkpoint,
                     sd_checkpoint_name=embedding.sd_checkpoint_name)
