"""Training datasets as A1111 builds them (a1111-compat §4.6): images, file words, prompt text, cached latents.

Images are every readable image directly in the folder, converted to RGB and stretched to W x H with bicubic
resampling unless sizes are kept (then batches are grouped by size). File words come from a same-name ``.txt`` or
from the file name. Latents are encoded once: ``once`` caches one sample, ``deterministic`` the mean, ``random``
the distribution (re-sampled at every use). The PNG alpha channel can weight the loss (normalised to mean 1).

Randomness is a function of (seed, step): the batch order of an epoch, a re-sampled latent or a shuffled caption
never depends on how many steps ran before in this process, so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex  # type: ignore[import-untyped]
import torch
from PIL import Image
from torch import Tensor

from sdconcepts.images import ImageProblem, open_image
from sdconcepts.limits import MAX_IMAGE_SIDE, MAX_PROMPT_CHARS
from sdconcepts.safe_load import UnsafeFileError, open_regular
from sdconcepts.training.templates import fill_template

log = logging.getLogger(__name__)

__all__ = [
    "DatasetError",
    "ImageRecord",
    "LatentSampling",
    "TrainingBatch",
    "TrainingDataset",
    "filename_matches",
    "filewords_for",
    "read_caption",
    "read_images",
]

LatentSampling = str  # "once" | "deterministic" | "random"
LATENT_SAMPLING = ("once", "deterministic", "random")
# (pixels [B, 3, H, W] in [-1, 1]) -> (mean, std) of the latent distribution, both already times the VAE's scale.
EncodeImages = Callable[[Tensor], tuple[Tensor, Tensor]]


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on (missing, no images)."""


def read_caption(path: Path) -> tuple[str, str | None]:
    """A caption file's text, and a warning when it is not UTF-8.

    A1111 reads captions as UTF-8 and stops the whole run on one that is not. A caption that is not UTF-8 is almost
    always legacy Windows text, so it is read as Windows-1252 (Latin-1 where that leaves a byte undefined): its
    words reach the prompt intact and the warning says so. A UTF-8 byte-order mark is dropped. A caption over
    ``MAX_PROMPT_CHARS`` (a prompt's bound) or a file that is not a regular file is an ImageProblem: its picture is
    skipped with the reason, before the text is read whole (a 10 MB caption took 6.6 GB to encode).
    """
    try:
        with open_regular(path) as handle:
            data = handle.read(4 * MAX_PROMPT_CHARS + 4)
    except UnsafeFileError as exc:
        raise ImageProblem(f"caption {str(exc).removeprefix(f'{path}: ')}") from None
    if len(data) > MAX_PROMPT_CHARS and len(data.decode("utf-8", "replace")) > MAX_PROMPT_CHARS:
        raise ImageProblem(f"caption {path.name} longer than {MAX_PROMPT_CHARS} characters")
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError as exc:
        try:
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
        return text, f"{path.name} (caption not UTF-8 at byte {exc.start}; read as Windows-1252/Latin-1)"


@dataclass(frozen=True)
class ImageRecord:
    """One training image: RGB pixels ``[3, H, W]`` in [-1, 1], its alpha ``[H0, W0]`` in [0, 1] or None, file words."""

    path: Path
    pixels: Tensor
    alpha: Tensor | None
    filewords: str

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])


@dataclass(frozen=True)
class TrainingBatch:
    """What one micro-step trains on: latents ``[B, C, h, w]``, prompt texts, optional loss weights like latents."""

    latents: Tensor
    texts: tuple[str, ...]
    weights: Tensor | None = None


def filewords_for(path: Path, *, filename_regex: str = "", join_string: str = " ") -> str:
    """A1111's file words: the same-name ``.txt`` if present, else the stem without leading numbering, optionally
    reduced to the regex's ``findall`` matches joined with ``join_string``."""
    caption = path.with_suffix(".txt")
    if caption.is_file():
        text, warning = read_caption(caption)
        if warning:
            log.warning("%s", warning)
        return text
    text = re.sub(r"^[-\d]+\s*", "", path.stem)
    if filename_regex:
        text = join_string.join(filename_matches(filename_regex, text))
    return text


# A1111 runs the user's regex with ``re``, which cannot be stopped: ``(a+)+$`` on a long name backtracks for ever.
# The ``regex`` module (a dependency of transformers; ``re``'s syntax in its default VERSION0) takes a timeout.
REGEX_TIMEOUT_S = 0.5  # a sane pattern takes microseconds on a file name (at most 255 bytes)


def filename_matches(pattern: str, text: str) -> list[str]:
    """``re.findall(pattern, text)``, or DatasetError when the pattern is invalid or runs over REGEX_TIMEOUT_S."""
    try:
        found: list[str] = regex.findall(pattern, text, timeout=REGEX_TIMEOUT_S)
    except regex.error as exc:
        raise DatasetError(f"filename regex {pattern!r} is invalid: {exc}") from None
    except TimeoutError:
        raise DatasetError(
            f"filename regex {pattern!r} ran for over {REGEX_TIMEOUT_S:g} s on the name {text[:60]!r} (it backtracks "
            "without end on some names); simplify it"
        ) from None
    return found


def read_images(
    folder: str | Path,
    *,
    width: int,
    height: int,
    keep_size: bool = False,
    use_alpha: bool = False,
    filename_regex: str = "",
    join_string: str = " ",
    max_side: int | None = MAX_IMAGE_SIDE,
) -> list[ImageRecord]:
    """Every image directly in ``folder`` (name order).

    Files that are not images, or are too large or broken, are skipped with their reason logged (A1111 skips the
    first kind silently and stops on the others); when nothing is left the error lists the reasons. With
    ``keep_size`` an image is trained at its own size, so one with a side over ``max_side`` (None: no limit) is
    skipped too.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"{root}: the dataset folder does not exist")
    if filename_regex:
        try:
            regex.compile(filename_regex)
        except regex.error as exc:
            raise DatasetError(f"filename regex {filename_regex!r} is invalid: {exc}") from None
    records = []
    skipped: list[str] = []
    for path in sorted(root.iterdir()):
        if not path.is_file() or path.suffix.lower() == ".txt":
            continue
        try:
            image = open_image(path)
        except ImageProblem as exc:
            skipped.append(f"{path.name} ({exc})")
            # Other files beside the images are normal in a dataset folder; a broken or huge image is worth a warning.
            log.log(logging.INFO if "PIL can read" in str(exc) else logging.WARNING, "skipped %s: %s", path, exc)
            continue
        if keep_size and max_side is not None and max(image.size) > max_side:
            reason = f"{image.width}×{image.height} is over {max_side} pixels on a side, and sizes are kept"
            skipped.append(f"{path.name} ({reason})")
            log.warning("skipped %s: %s", path, reason)
            continue
        try:
            filewords = filewords_for(path, filename_regex=filename_regex, join_string=join_string)
        except ImageProblem as exc:
            skipped.append(f"{path.name} ({exc})")
            log.warning("skipped %s: %s", path, exc)
            continue
        except OSError as exc:
            skipped.append(f"{path.name} (caption unreadable: {exc.strerror or exc})")
            log.warning("skipped %s: caption unreadable: %s", path, exc)
            continue
        alpha = None
        if use_alpha and "A" in image.getbands():
            alpha = torch.from_numpy(np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0)
        rgb = image.convert("RGB")
        if not keep_size and rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
        records.append(ImageRecord(path, pixels, alpha, filewords))
    if not records:
        reasons = f" (skipped: {'; '.join(skipped)})" if skipped else ""
        raise DatasetError(f"{root}: no images in the dataset folder{reasons}")
    return records


def _alpha_weight(alpha: Tensor | None, latent_shape: torch.Size) -> Tensor:
    channels, h, w = latent_shape
    if alpha is None:
        return torch.ones(channels, h, w)
    picture = Image.fromarray((alpha.numpy() * 255).round().astype(np.uint8), mode="L")
    small = torch.from_numpy(np.asarray(picture.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32))
    weight = small.unsqueeze(0).repeat(channels, 1, 1)
    weight = weight - weight.min()
    mean = weight.mean()
    return weight / mean if float(mean) > 0 else torch.ones_like(weight)


def _seeded(*parts: object) -> int:
    """A 63-bit seed derived from ``parts`` (stable across processes, unlike ``hash``)."""
    return random.Random(repr(parts)).getrandbits(63)


class TrainingDataset:
    """Images with cached latents and prompt texts, and the stateless batch order A1111's grouped sampler gives."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        encode: EncodeImages,
        *,
        name: str,
        template_lines: Sequence[str],
        batch_size: int = 1,
        gradient_accumulation: int = 1,
        latent_sampling: LatentSampling = "once",
        shuffle_tags: bool = False,
        tag_dropout: float = 0.0,
        use_alpha: bool = False,
        seed: int = 0,
        encode_batch_size: int = 1,
        lazy: bool = False,
    ) -> None:
        if latent_sampling not in LATENT_SAMPLING:
            raise DatasetError(f"latent sampling must be one of {', '.join(LATENT_SAMPLING)}, got {latent_sampling!r}")
        if not records:
            raise DatasetError("the dataset has no images")
        self.records = list(records)
        self.name = name
        self.lines = list(template_lines)
        self.latent_sampling = latent_sampling
        self.shuffle_tags = shuffle_tags
        self.tag_dropout = tag_dropout
        self.seed = seed
        n = len(self.records)
        # A1111: batch = min(batch, N); accumulation = min(accumulation, N // batch).
        self.batch_size = min(batch_size, n)
        self.gradient_accumulation = min(gradient_accumulation, n // self.batch_size)
        self.batches_per_epoch = n // self.batch_size
        self.usable_batches = self.batches_per_epoch - self.batches_per_epoch % self.gradient_accumulation
        self.steps_per_epoch = self.usable_batches // self.gradient_accumulation
        groups: dict[tuple[int, int], list[int]] = {}
        for index, record in enumerate(self.records):
            groups.setdefault(record.size, []).append(index)
        self.groups = list(groups.values())
        self._means: list[Tensor] = []
        self._stds: list[Tensor] = []
        self._use_alpha = use_alpha
        self._encode = encode
        self._chunk = encode_batch_size
        self.weights: list[Tensor] | None = None
        self.fixed_texts: list[str] | None = None
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        if not lazy:
            for _ in self.encoding():
                pass

    def encoding(self) -> Iterator[tuple[int, int]]:
        """Encode every image's latents (once: a dataset built with ``lazy=True`` is usable after this ends),
        yielding (images encoded, images) before each chunk and at the end: a caller reports progress and may stop
        before the next chunk (10,000 pictures take a minute, and an interrupt waited for all of them)."""
        if self._means:
            return
        # One image at a time by default: the VAE encoder's activations at full resolution are the peak of a run.
        means: dict[int, Tensor] = {}
        stds: dict[int, Tensor] = {}
        total = len(self.records)
        for group in self.groups:
            for start in range(0, len(group), self._chunk):
                yield len(means), total
                part = group[start : start + self._chunk]
                with torch.no_grad():
                    mean, std = self._encode(torch.stack([self.records[i].pixels for i in part]))
                for i, m, s in zip(part, mean, std, strict=True):
                    means[i], stds[i] = m.detach().float().cpu(), s.detach().float().cpu()
        yield total, total
        generator = torch.Generator().manual_seed(_seeded(self.seed, "latents"))
        for i in range(total):
            mean, std = means[i], stds[i]
            if self.latent_sampling == "once":
                mean = mean + std * torch.randn(mean.shape, generator=generator)
            self._means.append(mean)
            self._stds.append(std)
        self.weights = (
            [_alpha_weight(r.alpha, m.shape) for r, m in zip(self.records, self._means, strict=True)]
            if self._use_alpha else None
        )
        # Without shuffling or dropout A1111 fixes each image's text when the dataset is built.
        rng = random.Random(_seeded(self.seed, "texts"))
        self.fixed_texts = (
            None
            if self.shuffle_tags or self.tag_dropout
            else [fill_template(rng.choice(self.lines), name=self.name, filewords=r.filewords) for r in self.records]
        )

    def __len__(self) -> int:
        return len(self.records)

    def text_for(self, index: int, step: int) -> str:
        if self.fixed_texts is not None:
            return self.fixed_texts[index]
        rng = random.Random(_seeded(self.seed, "text", step, index))
        return fill_template(
            rng.choice(self.lines),
            name=self.name,
            filewords=self.records[index].filewords,
            rng=rng,
            shuffle_tags=self.shuffle_tags,
            tag_dropout=self.tag_dropout,
        )

    def latent_for(self, index: int, step: int) -> Tensor:
        if self.latent_sampling != "random":
            return self._means[index]
        generator = torch.Generator().manual_seed(_seeded(self.seed, "sample", step, index))
        return self._means[index] + self._stds[index] * torch.randn(self._means[index].shape, generator=generator)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """A1111's GroupedBatchSampler for one epoch: shuffled full batches per size group, then batches drawn with
        replacement from groups weighted by their leftovers, in shuffled order."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = random.Random(_seeded(self.seed, "epoch", epoch))
        b, n = self.batch_size, len(self.records)
        groups = [list(g) for g in self.groups]
        expected = [len(g) / n * self.batches_per_epoch * b for g in groups]
        random_batches = self.batches_per_epoch - sum(int(e) // b for e in expected)
        probs = [e % b / random_batches / b if random_batches > 0 else 0 for e in expected]
        for g in groups:
            rng.shuffle(g)
        batches = [g[i * b : (i + 1) * b] for g in groups for i in range(len(g) // b)]
        for _ in range(max(0, self.batches_per_epoch - len(batches))):
            group = rng.choices(groups, probs)[0] if any(probs) else rng.choice(groups)
            batches.append(rng.choices(group, k=b))
        rng.shuffle(batches)
        batches = batches[: self.usable_batches]
        self._epoch_cache = (epoch, batches)
        return batches

    def batch(self, step: int, micro: int, per_step: int | None = None) -> TrainingBatch:
        """Micro-batch ``micro`` of optimizer step ``step`` (the step count before the update); ``per_step`` is the
        number of micro-batches per step over all processes (default: the gradient accumulation)."""
        k = step * (per_step or self.gradient_accumulation) + micro
        indices = self.epoch_batches(k // self.usable_batches)[k % self.usable_batches]
        latents = torch.stack([self.latent_for(i, step) for i in indices])
        weights = torch.stack([self.weights[i] for i in indices]) if self.weights is not None else None
        return TrainingBatch(latents, tuple(self.text_for(i, step) for i in indices), weights)

    def epoch_of(self, step: int) -> tuple[int, int]:
        """A1111's (epoch, step within epoch) for a completed step count."""
        return step // self.steps_per_epoch, step % self.steps_per_epoch
