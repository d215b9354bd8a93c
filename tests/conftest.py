"""Shared fixtures: real diffusers/transformers components at tiny size, seeded, on the CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every test model is tiny: a second intra-op thread gains nothing, and on a shared 2-core machine OpenMP threads
# wait on each other (5-10x slower). One setting here instead of a fixture per test file.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Any:
    """Tests that run the CLI in-process (``sdconcepts.cli.main``) let it choose torch's threads as it does for a
    user (``sdconcepts.threads``); the next test starts from the one thread above again."""
    yield
    if torch.get_num_threads() != 1:
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


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training tests' dataset: 4 toy-world pictures of a yellow triangle on varied backgrounds (seed 3), each
    with a caption that names the background only. Read-only: runs write their logs and files elsewhere.

    One fixture for every package's training tests (tests/training, tests/host, tests/ui, tests/reliability). They
    used to write their own copy: 2 or 3 of these same pictures (a prefix of this seed's sequence), or 2 red circles
    (seed 5) in the host tests, whose runs check the host's weights and the saved files, never what was learned.
    tests/training/test_training_run.py counts its 4 pictures in the run's settings file.
    """
    from sdconcepts.toyworld.concept import write_concept

    folder = tmp_path_factory.mktemp("concept")
    write_concept(folder, count=4, seed=3, shape="triangle", colour="yellow")
    return folder


@pytest.fixture(scope="session")
def toyworld_style_hypernetwork(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The slow tier's teal-background style hypernetwork (``trained_style.STYLE_HYPERNETWORK``), trained once per
    session on the embedded toy model: the file and the training's seconds. Read-only for its users
    (tests/training/test_training_learns.py, tests/backends/test_img2img_toyworld.py)."""
    from trained_style import train_style_hypernetwork

    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("the embedded model is missing")
    return train_style_hypernetwork(tmp_path_factory.mktemp("style-hypernetwork"))


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


# --- The fast tier's time budget -------------------------------------------------------------------------------------
# The README's test command (the default markers, every test path) must stay a command a newcomer runs in minutes: it
# fails when its CPU time exceeds FAST_TIER_BUDGET_S per worker process, and names the slowest tests. CPU time (of
# the pytest processes and the programs they ran), not wall time: a busy machine stretches wall time without the suite
# getting any bigger. SDCONCEPTS_FAST_TIER_BUDGET_S=0 turns the check off.
FAST_TIER_BUDGET_S = 12 * 60
_durations: dict[str, float] = {}
_sessions: list[pytest.Session] = []
_START = pytest.StashKey[float]()
_WORKER_CPU = pytest.StashKey[list[float]]()


def _cpu_seconds(*, children: bool = True) -> float:
    import resource

    usages = [resource.getrusage(resource.RUSAGE_SELF)]
    if children:
        usages.append(resource.getrusage(resource.RUSAGE_CHILDREN))
    return sum(u.ru_utime + u.ru_stime for u in usages)


def _default_markexpr(config: pytest.Config) -> str:
    """The marker expression pyproject.toml's addopts give the default run (the fast tier): one definition."""
    addopts = list(config.getini("addopts"))
    return addopts[addopts.index("-m") + 1] if "-m" in addopts else ""


def _is_fast_tier(config: pytest.Config) -> bool:
    return (config.option.markexpr == _default_markexpr(config)
            and config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.option.keyword and not config.option.collectonly and not getattr(config.option, "lf", False))


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_START] = _cpu_seconds()
    _sessions.append(session)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand its CPU time to the controller
        workeroutput["sdconcepts_cpu_s"] = _cpu_seconds() - session.config.stash[_START]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:  # pytest-xdist's hook, on the controller
    seconds = getattr(node, "workeroutput", {}).get("sdconcepts_cpu_s")
    if seconds is not None:
        node.config.stash.setdefault(_WORKER_CPU, []).append(float(seconds))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _is_fast_tier(config) or getattr(config, "workeroutput", None) is not None:
        return
    budget_per_process = float(os.environ.get("SDCONCEPTS_FAST_TIER_BUDGET_S", FAST_TIER_BUDGET_S))
    workers = config.stash.get(_WORKER_CPU, [])
    # With workers, the controller's children are the workers themselves: count each once.
    cpu = sum(workers) + _cpu_seconds(children=not workers) - config.stash[_START]
    processes = max(1, len(workers))
    budget = budget_per_process * processes
    line = f"fast tier: {cpu:.0f} CPU-s for {len(_durations)} tests in {processes} process(es); budget {budget:.0f} CPU-s"
    if budget_per_process <= 0 or cpu <= budget:
        terminalreporter.write_line(line)
        return
    terminalreporter.write_line(f"{line}: OVER BUDGET. The slowest tests (wall s): mark them slow or make them cheaper",
                                red=True)
    for nodeid, seconds in sorted(_durations.items(), key=lambda item: -item[1])[:15]:
        terminalreporter.write_line(f"  {seconds:7.1f}  {nodeid}")
    for session in _sessions:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
