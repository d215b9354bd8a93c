"""The memory check's view of the CPU's memory (sdconcepts.limits.available_memory): ``MemAvailable``, a cgroup's
memory limit (v1 and v2, the group and its ancestors) and the process's rlimits, whichever leaves the least."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from sdconcepts.limits import _cgroup_available, available_memory, memory_problem

GIB = 1 << 30


def _write(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


def test_a_cgroup_v2_limit_of_the_group_or_above_it_is_read(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root, cgroup__controllers="memory")
    _write(root / "outer", memory__max=str(8 * GIB), memory__current=str(1 * GIB))
    _write(root / "outer" / "job", memory__max="max", memory__current=str(GIB),
           memory__stat=f"anon {GIB}\ninactive_file {GIB // 2}\n")
    membership = tmp_path / "cgroup-of-self"
    membership.write_text("0::/outer/job\n")
    assert _cgroup_available(root, membership) == 7 * GIB  # the parent's limit applies; the child has none
    _write(root / "outer" / "job", memory__max=str(2 * GIB), memory__current=str(GIB))
    # Inactive page cache is reclaimed before the limit bites: 2 GiB - (1 GiB - 0.5 GiB).
    assert _cgroup_available(root, membership) == 2 * GIB - GIB // 2
    membership.write_text("0::/\n")
    assert _cgroup_available(root, membership) is None  # the root group: no limit set


def test_a_cgroup_v1_limit_is_read_and_its_no_limit_value_ignored(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _write(root / "memory" / "docker" / "c1", memory__limit_in_bytes=str(3 * GIB), memory__usage_in_bytes=str(GIB),
           memory__stat=f"total_inactive_file {GIB // 4}\n")
    _write(root / "memory", memory__limit_in_bytes="9223372036854771712", memory__usage_in_bytes=str(40 * GIB))
    membership = tmp_path / "cgroup-of-self"
    membership.write_text("5:cpu,cpuacct:/docker/c1\n4:memory:/docker/c1\n")
    assert _cgroup_available(root, membership) == 2 * GIB + GIB // 4
    membership.write_text("4:memory:/\n")
    assert _cgroup_available(root, membership) is None
    assert _cgroup_available(root, tmp_path / "missing") is None


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_an_address_space_rlimit_is_counted() -> None:
    # A real rlimit on this process, lowered for a moment and put back: under ``ulimit -v`` the check passed on
    # MemAvailable and the allocation then failed with a traceback.
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    allowed = _vm("VmSize") + (256 << 20)  # 256 MiB more address space than this process has mapped
    try:
        resource.setrlimit(resource.RLIMIT_AS, (allowed, hard))
        free = available_memory("cpu")
        problem = memory_problem(1 << 30, "cpu", "an 8192x8192 image")
        try:
            torch.empty(1 << 30, dtype=torch.uint8)
            allocated = True
        except RuntimeError:
            allocated = False
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert not allocated  # the limit is real...
    assert free is not None and free <= 256 << 20  # ...and the check now knows it
    assert problem is not None and problem.startswith("an 8192x8192 image needs at least 1.0 GiB of memory, but only ")
