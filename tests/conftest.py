"""Shared fixtures: real diffusers/transformers components at tiny size, seeded, on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every test model is tiny: a second intra-op thread gains nothing, and on a shared 2-core machine OpenMP threads
# wait on each other (5-10x slower). One setting here instead of a fixture per test file.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _hash_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """UI sessions (and the apps the browser tests start) keep file hashes in a test folder, not the user's cache."""
    from sdconcepts.hash_cache import CACHE_DIR_ENV

    if CACHE_DIR_ENV not in os.environ:
        os.environ[CACHE_DIR_ENV] = str(tmp_path_factory.mktemp("hash-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SD-1.x model saved as a diffusers folder."""
    from sdconcepts.backends.tiny import save_tiny_sd1

    return save_tiny_sd1(tmp_path_factory.mktemp("tiny") / "tiny-sd1")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):  # type: ignore[no-untyped-def]
    from sdconcepts.backends.model_loading import load_model

    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight SDXL model saved as a diffusers folder (StableDiffusionXLPipeline layout)."""
    from sdconcepts.backends.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_dir: Path):  # type: ignore[no-untyped-def]
    """The tiny SDXL model loaded by the engine (both text encoders, float32, CPU)."""
    from sdconcepts.backends.model_loading import load_model

    return load_model(tiny_sdxl_dir, device="cpu")


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def tiny_family_file(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(family, path) of a tiny SD 1.x / SD 2.x / SDXL single file written by our writer (A1111's LDM/SGM layout)."""
    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.backends.tiny import build_tiny_sd1, build_tiny_sd2, build_tiny_sdxl

    family = str(request.param)
    build = {"sd1": build_tiny_sd1, "sd2": build_tiny_sd2, "sdxl": build_tiny_sdxl}[family]
    path = tmp_path_factory.mktemp(family) / f"tiny-{family}.safetensors"
    save_single_file({**build(seed=3), "family": family}, path)
    return family, path
