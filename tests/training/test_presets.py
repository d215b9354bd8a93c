"""Training presets: the shipped defaults and A1111's, as the CLI and the bench read them; the bench's pure helpers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from sdconcepts.cli.main import build_parser
from sdconcepts.training.config import EmbeddingTrainingConfig
from sdconcepts.training.presets import DEFAULT_PRESET, PRESETS, preset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_time_to_concept as ttc  # noqa: E402


def test_a1111_preset_is_the_train_tab_of_a1111() -> None:
    a1111 = preset("a1111")
    assert (a1111.learn_rate, a1111.batch_size, a1111.vectors, a1111.init_text) == ("0.005", 1, 1, "*")
    # EmbeddingTrainingConfig keeps A1111's field defaults (a1111-compat §4.3): the preset says the same.
    assert EmbeddingTrainingConfig.learn_rate == a1111.learn_rate and EmbeddingTrainingConfig.batch_size == 1


def test_unknown_preset_is_one_line_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="a1111") as caught:
        preset("kohya")
    assert "\n" not in str(caught.value)
    assert preset(None) is PRESETS[DEFAULT_PRESET] and preset(" A1111 ") is PRESETS["a1111"]


def _parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_cli_takes_its_defaults_from_the_preset_and_the_user_wins(name: str) -> None:
    from sdconcepts.cli.training_commands import preset_value

    args = _parsed("train-embedding", "x", "--dataset", "d", "--preset", name)
    chosen = PRESETS[name]
    assert (preset_value(args, "learn_rate"), preset_value(args, "batch_size")) == (chosen.learn_rate,
                                                                                   chosen.batch_size)
    args = _parsed("create-embedding", "x", "--preset", name)
    assert (preset_value(args, "vectors"), preset_value(args, "init_text")) == (chosen.vectors, chosen.init_text)
    args = _parsed("train-embedding", "x", "--dataset", "d", "--preset", name, "--learn-rate", "0.1", "--batch-size", "2")
    assert (preset_value(args, "learn_rate"), preset_value(args, "batch_size")) == ("0.1", 2)
    # A hypernetwork has no preset: A1111's rate and batch size.
    args = _parsed("train-hypernetwork", "x", "--dataset", "d")
    assert preset_value(args, "learn_rate", "0.00001") == "0.00001" and preset_value(args, "batch_size", 1) == 1


def test_snapshot_points_grow_by_about_1_41_and_end_at_the_cap() -> None:
    points = ttc.snapshot_points(20, 12000)
    assert points[:4] == [20, 30, 40, 55] and points[-1] == 12000
    ratios = [b / a for a, b in zip(points[:-2], points[1:-1], strict=True)]
    assert all(1.3 <= r <= 1.55 for r in ratios), ratios
    assert ttc.snapshot_points(20, 25) == [20, 25]


def test_first_good_and_the_early_stop_verdict() -> None:
    snaps = [ttc.Snapshot(20, 4, 1.0, 0.5), ttc.Snapshot(30, 6, 1.5, 0.85), ttc.Snapshot(40, 8, 2.0, 0.9)]
    good = ttc.first_good(snaps, 0.8)
    assert good is snaps[1] and ttc.first_good(snaps, 0.95) is None
    assert ttc.early_stop_verdict(2.0, 1.5).startswith("within 1.5x (1.33x)")
    assert ttc.early_stop_verdict(3.0, 1.5).startswith("beyond 1.5x (2.00x)")
    assert ttc.early_stop_verdict(1.0, 1.5).startswith("too early")
    assert ttc.early_stop_verdict(None, 1.5).startswith("no stop")
    assert ttc.early_stop_verdict(1.0, None) == "stopped, concept never reached"
