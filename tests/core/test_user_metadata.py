"""A1111's user-metadata sidecar (``name.json``): its format, round trips, and files that must not be used."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sdconcepts.user_metadata import (
    UserMetadata,
    UserMetadataError,
    metadata_path,
    read_user_metadata,
    write_user_metadata,
)


def test_path_replaces_the_last_extension_as_a1111_does(tmp_path: Path) -> None:
    assert metadata_path(tmp_path / "a.b.pt") == tmp_path / "a.b.json"
    assert metadata_path(tmp_path / "x.safetensors") == tmp_path / "x.json"


def test_written_file_is_a1111s_format_and_keeps_other_keys(tmp_path: Path) -> None:
    target = tmp_path / "style.pt"
    (tmp_path / "style.json").write_text(json.dumps({"description": "old", "user key": {"a": 1}}), encoding="utf-8")
    metadata = UserMetadata(description="Red things é", activation_text="red shape", preferred_weight=0.75,
                            negative_text="blurry", notes="two\nlines", sd_version="SD1")
    written = write_user_metadata(target, metadata)
    text = written.read_text(encoding="utf-8")
    # A1111 writes json.dump(indent=4, ensure_ascii=False) with these keys (Lora's editor).
    assert text == json.dumps(json.loads(text), indent=4, ensure_ascii=False) and "é" in text
    assert json.loads(text) == {"user key": {"a": 1}, "description": "Red things é", "sd version": "SD1",
                                "activation text": "red shape", "preferred weight": 0.75,
                                "negative text": "blurry", "notes": "two\nlines"}
    again = read_user_metadata(target)
    assert again is not None and again.preferred_weight == 0.75 and again.notes == "two\nlines"
    assert read_user_metadata(tmp_path / "none.pt") is None


def test_written_file_gets_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        written = write_user_metadata(tmp_path / "x.pt", UserMetadata(description="d"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left behind


def test_lenient_values_as_a1111_reads_them(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps({"preferred weight": "0.5", "description": 3, "notes": None}))
    metadata = read_user_metadata(tmp_path / "x.pt")
    assert metadata is not None and (metadata.preferred_weight, metadata.description, metadata.notes) == (0.5, "3", "")
    (tmp_path / "y.json").write_text(json.dumps({"preferred weight": "heavy"}))
    assert read_user_metadata(tmp_path / "y.pt").preferred_weight == 0.0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object, found list"),
        (b"\xff\xfe\x00", "not valid JSON"),
        (b" " * (1 << 20) + b"{}", "more than 1 MiB"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested more than 64 levels deep"),
        (b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}", "nested more than 64 levels deep"),
    ],
)
def test_bad_json_is_refused_with_one_line_and_never_overwritten(tmp_path: Path, content: bytes, reason: str) -> None:
    sidecar = tmp_path / "x.json"
    sidecar.write_bytes(content)
    with pytest.raises(UserMetadataError) as info:
        read_user_metadata(tmp_path / "x.pt")
    assert reason in str(info.value) and "x.json" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UserMetadataError):
        write_user_metadata(tmp_path / "x.pt", UserMetadata(description="new"))
    assert sidecar.read_bytes() == content  # what the user had is kept


def test_a_fifo_named_json_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.json")
    with pytest.raises(UserMetadataError, match="not a regular file"):
        read_user_metadata(tmp_path / "x.pt")


def test_metadata_that_could_not_be_read_back_is_not_written(tmp_path: Path) -> None:
    write_user_metadata(tmp_path / "x.pt", UserMetadata(description="short"))
    before = (tmp_path / "x.json").read_bytes()
    with pytest.raises(UserMetadataError, match="more than 1 MiB; shorten it"):
        write_user_metadata(tmp_path / "x.pt", UserMetadata(description="d" * (1 << 20)))
    assert (tmp_path / "x.json").read_bytes() == before
    assert read_user_metadata(tmp_path / "x.pt") == UserMetadata(description="short", sd_version="Unknown")
