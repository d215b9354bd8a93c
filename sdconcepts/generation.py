"""Generation parameters, seeds and A1111's infotext: the pure half of txt2img."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

from sdconcepts.limits import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_IMAGE_SIDE, MAX_PROMPT_CHARS

# A1111's sampler names, in the order its UI lists them; each maps to a diffusers scheduler in the backend.
SAMPLERS: tuple[str, ...] = (
    "Euler a",
    "Euler",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DDIM",
    "PLMS",
    "UniPC",
)
# A random seed is drawn below 2**32, as A1111's get_fixed_seed. A1111 does not wrap the seeds that follow
# (image i gets seed + i, written as such into its infotext) and takes any integer back, so a typed or pasted seed
# may go higher: up to 2**53 - 1, the largest integer a browser's number field keeps exact (torch takes < 2**64).
MAX_SEED = 2**32 - 1
SEED_LIMIT = 2**53 - 1


def engine_sampler(sampler: str | None, schedule: str | None = None) -> str | None:
    """The name this engine knows for A1111's sampler and schedule type, or None when it has no such sampler.

    A1111 1.9+ keeps the schedule apart (sampler "DPM++ 2M", schedule type "Karras"; "Automatic" is the sampler's
    own); before, and here, it is part of the name ("DPM++ 2M Karras").
    """
    if not sampler:
        return None
    if schedule and f"{sampler} {schedule}" in SAMPLERS:
        return f"{sampler} {schedule}"
    return sampler if sampler in SAMPLERS else None


class GenerationError(ValueError):
    """A request that cannot be generated as given (bad size, unknown sampler, ...)."""


@dataclass(frozen=True)
class GenerationParams:
    """One txt2img request, with A1111's field meanings (seed -1 picks a random seed)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    def validated(self, *, size_limits: bool = True) -> GenerationParams:
        """Return a copy with the seed resolved, or raise GenerationError naming the bad field.

        ``size_limits``: refuse sizes and batches over the web UI's maxima (``sdconcepts.limits``); the command
        line's ``--no-size-limits`` turns this off (the memory check in the backend still applies).
        """
        if self.sampler not in SAMPLERS:
            raise GenerationError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if not 1 <= self.steps <= 150:
            raise GenerationError(f"steps must be between 1 and 150, got {self.steps}")
        if self.batch_size < 1 or self.batch_count < 1:
            raise GenerationError("batch size and batch count must be at least 1")
        if self.clip_skip < 1:
            raise GenerationError(f"clip skip must be at least 1, got {self.clip_skip}")
        if not math.isfinite(self.cfg_scale):
            raise GenerationError(f"CFG scale must be a finite number, got {self.cfg_scale}")
        for label, text in (("prompt", self.prompt), ("negative prompt", self.negative_prompt)):
            if len(text) > MAX_PROMPT_CHARS:
                raise GenerationError(f"the {label} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are read")
        if size_limits:
            for label, value, limit in (
                ("width", self.width, MAX_IMAGE_SIDE),
                ("height", self.height, MAX_IMAGE_SIDE),
                ("batch size", self.batch_size, MAX_BATCH_SIZE),
                ("batch count", self.batch_count, MAX_BATCH_COUNT),
            ):
                if value is not None and value > limit:
                    raise GenerationError(
                        f"{label} must be at most {limit}, got {value} (the web UI's limit; "
                        "--no-size-limits lifts it on the command line)"
                    )
        seed = self.seed
        if seed < 0:
            seed = random.randrange(MAX_SEED)
        elif seed > SEED_LIMIT:
            raise GenerationError(f"seed must be at most {SEED_LIMIT}, got {seed}")
        return replace(self, seed=seed)

    def image_seeds(self) -> list[list[int]]:
        """Seeds per batch: A1111 gives image i of the whole run the seed ``seed + i``."""
        n = self.batch_size
        return [[self.seed + b * n + i for i in range(n)] for b in range(self.batch_count)]


def format_infotext(
    params: GenerationParams,
    *,
    prompt: str,
    negative_prompt: str,
    seed: int,
    width: int,
    height: int,
    model_name: str,
    model_hash: str | None,
    extra: dict[str, str] | None = None,
) -> str:
    """A1111's ``parameters`` text: prompt, ``Negative prompt:`` line, then ``key: value`` pairs.

    A1111 quotes a value that contains ``,``, ``:`` or ``"`` (json-style) so that PNG Info can split the line.
    """
    fields: dict[str, str | None] = {
        "Steps": str(params.steps),
        "Sampler": params.sampler,
        "CFG scale": _number(params.cfg_scale),
        "Seed": str(seed),
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
    }
    if params.clip_skip > 1:
        fields["Clip skip"] = str(params.clip_skip)
    fields.update(extra or {})
    fields.update(params.extra)
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None and v != "")
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return f"{text}\n{line}"


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split an infotext into (prompt, negative prompt, fields), the inverse of :func:`format_infotext`."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    fields = _parse_fields(last)
    body = lines[:-1] if len(fields) >= 3 else lines
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in body:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        target.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), fields if len(fields) >= 3 else {}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _quote(value: str) -> str:
    if "," not in value and ":" not in value and '"' not in value and "\n" not in value:
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _parse_fields(line: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    i = 0
    n = len(line)
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            break
        key = line[i:colon].strip()
        j = colon + 1
        while j < n and line[j] == " ":
            j += 1
        if j < n and line[j] == '"':
            j += 1
            chars: list[str] = []
            while j < n and line[j] != '"':
                if line[j] == "\\" and j + 1 < n:
                    j += 1
                    chars.append("\n" if line[j] == "n" else line[j])
                else:
                    chars.append(line[j])
                j += 1
            value = "".join(chars)
            end = line.find(",", j)
        else:
            end = line.find(",", j)
            value = line[j : end if end >= 0 else n].strip()
        fields[key] = value
        if end < 0:
            break
        i = end + 1
    return fields
