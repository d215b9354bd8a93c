"""Named sets of training defaults: ours (chosen by bench/bench_time_to_concept.py) and A1111's Train tab's.

A preset fills the learning rate, batch size, and the new embedding's vectors and initialization text; any field the
user sets wins. docs/training.md ("Defaults and presets") has the measurement behind ``sdconcepts``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "preset"]


@dataclass(frozen=True)
class Preset:
    name: str
    learn_rate: str
    batch_size: int
    vectors: int
    init_text: str
    description: str


PRESETS = {
    p.name: p
    for p in (
        Preset("sdconcepts", "0.01:200, 0.005", 5, 4, "*",
               "ours: the fastest to a usable concept in bench/bench_time_to_concept.py"),
        Preset("a1111", "0.005", 1, 1, "*", "AUTOMATIC1111's Train tab defaults"),
    )
}
DEFAULT_PRESET = "sdconcepts"


def preset(name: str | None) -> Preset:
    """The preset called ``name`` (None: the default); ValueError naming the choices for an unknown one."""
    key = (name or DEFAULT_PRESET).strip().lower()
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]
