"""The restricted torch loader: hostile pickles never run, legitimate old files still load."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from sdconcepts.atomic_files import atomic_path, save_torch_file
from sdconcepts.safe_load import UnsafeFileError, load_torch_file


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickles_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    zipped = tmp_path / "zip.pt"
    torch.save({"w": torch.zeros(2), "x": _Hostile(marker)}, zipped)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"x": _Hostile(marker)}))
    legacy = tmp_path / "legacy.pt"
    torch.save({"x": _Hostile(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, raw, legacy):
        with pytest.raises(UnsafeFileError, match=path.name) as info:
            load_torch_file(path)
        assert "system" in str(info.value)
    assert not marker.exists()


def test_corrupt_and_empty_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(100)}, good)
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    for path, reason in ((empty, "empty"), (truncated, "not a loadable"), (tmp_path / "none.pt", "not a file")):
        with pytest.raises(UnsafeFileError, match=reason):
            load_torch_file(path)


def test_parameter_dict_and_legacy_files_load(tmp_path: Path) -> None:
    params = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))})
    path = tmp_path / "old.pt"
    torch.save({"string_to_param": params, "name": "old", "step": 5}, path)
    data = load_torch_file(path)
    assert isinstance(data, dict) and data["step"] == 5
    assert torch.equal(data["string_to_param"]["*"], torch.arange(6.0).reshape(2, 3))


def test_saved_files_are_legacy_format_and_round_trip(tmp_path: Path) -> None:
    obj = {"a": torch.randn(3, 4), 768: (torch.zeros(1), [1, 2.5, None, "x"])}
    path = save_torch_file(obj, tmp_path / "sub" / "out.pt")
    # A1111's safe unpickler rejects the records modern zip files carry; we write the legacy format instead.
    assert not zipfile.is_zipfile(path)
    back = load_torch_file(path)
    assert isinstance(back, dict) and torch.equal(back["a"], obj["a"]) and back[768][1] == [1, 2.5, None, "x"]
    assert [p.name for p in path.parent.iterdir()] == ["out.pt"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_files_load_while_a1111_has_replaced_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A1111's modules/safe.py sets ``torch.load`` to a checker that opens its argument as a file name, prints an error
    and returns None for anything else (an open file): our reads must not go through that name."""
    path = save_torch_file({"name": "x", "step": 2, "vec": torch.ones(2)}, tmp_path / "x.pt")

    def a1111_load(filename, *args, **kwargs):  # type: ignore[no-untyped-def]
        if not isinstance(filename, (str, os.PathLike)):
            return None  # what A1111's check_pt failure path returns
        raise AssertionError("unused here")

    monkeypatch.setattr(torch, "load", a1111_load)
    data = load_torch_file(path)
    assert isinstance(data, dict) and data["step"] == 2 and torch.equal(data["vec"], torch.ones(2))
