"""torch's CPU thread count: the rule (free cores), the measurement of other work, the user's setting (issue 26 item 2)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from sdconcepts.cli import main
from sdconcepts.threads import (
    AutoThreads,
    apply_threads,
    busy_cores,
    choose_threads,
    parse_threads,
    recheck_threads,
    usable_cores,
)


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_rule_takes_the_free_cores_and_at_least_one() -> None:
    assert choose_threads(2, 0.0) == 2
    assert choose_threads(2, 0.6) == 1  # one core mostly busy: the waits at every operation cost more than it gives
    assert choose_threads(2, 7.5) == 1  # far more work than cores: still one thread
    assert choose_threads(16, 3.4) == 13
    assert 1 <= usable_cores()


def test_busy_cores_sees_another_process_burning_a_core() -> None:
    burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # its interpreter has started
        assert busy_cores(0.3) >= 0.6
    finally:
        burner.kill()
        burner.wait()


def test_a_set_count_is_applied_and_bad_ones_are_refused(restore_threads: None) -> None:
    assert apply_threads("3") == 3 and torch.get_num_threads() == 3
    assert parse_threads(" AUTO ") == "auto" and parse_threads("4") == "4"
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="threads"):
            parse_threads(bad)


def test_cli_threads_option_before_or_after_the_command(restore_threads: None, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = str(tmp_path)  # `inspect` of an empty folder: a cheap command that runs after the threads are set
    assert main(["--threads", "3", "inspect", folder]) == 0 and torch.get_num_threads() == 3
    assert main(["inspect", folder, "--threads", "2"]) == 0 and torch.get_num_threads() == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", folder, "--threads", "0"])
    assert exit_info.value.code == 2 and "at least 1" in capsys.readouterr().err


def test_environment_setting_and_omp_num_threads(restore_threads: None, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SDCONCEPTS_THREADS", "3")
    assert main(["inspect", str(tmp_path)]) == 0 and torch.get_num_threads() == 3
    monkeypatch.setenv("SDCONCEPTS_THREADS", "lots")
    with pytest.raises(SystemExit):
        main(["inspect", str(tmp_path)])
    assert "SDCONCEPTS_THREADS" in capsys.readouterr().err
    # Only OMP_NUM_THREADS: the user chose already, torch follows it and nothing is changed.
    monkeypatch.delenv("SDCONCEPTS_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(2)
    assert main(["inspect", str(tmp_path)]) == 0 and torch.get_num_threads() == 2


def test_auto_decides_again_during_a_job_from_the_last_window(restore_threads: None) -> None:
    """Under ``auto`` a long job's count follows other work that starts after the job began (issue 27 item 6)."""
    apply_threads("auto")
    assert recheck_threads() is None  # the window (RECHECK_S) has not passed: nothing measured, nothing set
    burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)  # its interpreter has started
        watch = AutoThreads(usable_cores(), every_s=0.4)
        time.sleep(0.2)
        assert watch.recheck() is None and watch.last_busy is None  # 0.2 s < every_s: not measured yet
        time.sleep(0.3)
        watch.recheck()
        assert watch.last_busy is not None and watch.last_busy >= 0.6  # the burner's core, over the whole window
        assert torch.get_num_threads() == choose_threads(watch.cores, watch.last_busy)
    finally:
        burner.kill()
        burner.wait()


def test_a_set_count_is_never_rechecked(restore_threads: None) -> None:
    apply_threads("auto")
    assert apply_threads("3") == 3
    assert recheck_threads(force=True) is None and torch.get_num_threads() == 3
