"""What the writing commands do when the place they write to is taken: nothing replaced silently (``convert``
needs ``--overwrite`` and never writes over its source), a file where a folder is expected refused before the work,
and an error of the system (a full disk) reported in one line. In-process (``main``), so each case is cheap."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from sdconcepts import Embedding, save_embedding
from sdconcepts.atomic_files import describe_os_error
from sdconcepts.cli.main import main


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line; loading a model may log diffusers' own warnings before it, but never a traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("python -m sdconcepts: error: "), err
    return line


def _embedding(path: Path, value: float = 0.5) -> Path:
    save_embedding(Embedding(path.stem, torch.full((2, 48), value)), path)
    return path


def test_convert_needs_overwrite_and_never_writes_over_its_source(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, dst = _embedding(tmp_path / "a.pt"), _embedding(tmp_path / "b.safetensors", 0.25)
    before = dst.read_bytes()
    assert main(["convert", str(src), str(dst)]) == 2
    assert _one_error_line(capsys).endswith("b.safetensors already exists (use --overwrite to replace it)")
    assert dst.read_bytes() == before  # DATA LOSS before: replaced silently
    assert main(["convert", str(src), str(dst), "--overwrite"]) == 0
    assert dst.read_bytes() != before
    capsys.readouterr()
    source = src.read_bytes()
    (tmp_path / "link.pt").symlink_to(src)
    for same in (src, tmp_path / "link.pt"):
        assert main(["convert", str(src), str(same), "--overwrite"]) == 2
        assert "SRC and DST are the same file" in _one_error_line(capsys)
    assert src.read_bytes() == source


def test_a_file_where_a_folder_is_expected_is_refused_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model_dir: Path
) -> None:
    file = tmp_path / "file"
    file.write_text("keep me")
    src = _embedding(tmp_path / "a.pt")
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    cases = [
        (["generate", "--ckpt", str(tiny_model_dir), "--prompt", "x", "--steps", "1", "--output", "/dev/null"],
         "--output /dev/null: it is a file, not a folder"),
        (["convert", str(src), str(file / "x.pt")], f"DST's folder {file}: it is a file, not a folder"),
        (["embedding", "mix", "m", "0.5*a", "--embeddings-dir", str(tmp_path), "--out-dir", str(file / "sub")],
         f"--out-dir {file / 'sub'}: {file} is a file, not a folder"),
        (["train-embedding", "a", "--dataset", str(dataset), "--log-dir", str(file)],
         f"--log-dir {file}: it is a file, not a folder"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        assert _one_error_line(capsys).endswith(message)
    assert file.read_text() == "keep me"


def test_an_error_of_the_system_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            tiny_model_dir: Path) -> None:
    (tmp_path / "taken.png").mkdir()  # the .png to write is a folder: the write fails after generating
    assert main(["generate", "--ckpt", str(tiny_model_dir), "--prompt", "x", "--steps", "1", "--width", "32",
                 "--height", "32", "--output", str(tmp_path / "taken.png")]) == 1
    line = _one_error_line(capsys)
    assert "taken.png" in line and "(a folder is where a file is expected)" in line
    with pytest.raises(OSError) as info, open("/dev/full", "wb") as full:  # the kernel's own "disk full"
        full.write(b"x")
        full.flush()
    assert info.value.errno == errno.ENOSPC
    assert describe_os_error(info.value).endswith("No space left on device (the disk is full); files saved before "
                                                  "are kept")


def test_inspect_prints_file_names_without_terminal_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _embedding(tmp_path / "\x1b]0;pwned\x07.pt")  # sets the terminal's title when printed raw
    _embedding(tmp_path / "x\nSKIPPED: forged.pt")  # a newline forged a row of the listing
    _embedding(tmp_path / "clear\x1b[2J.pt")
    _embedding(tmp_path / "café.pt")
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    rows = out.strip().split("\n")
    assert len(rows) == 4 and not any("\tSKIPPED: " in row for row in rows)
    assert any(row.startswith("\\x1b]0;pwned\\x07\t") for row in rows)
    assert any(row.startswith("x\\nSKIPPED: forged\t") for row in rows)
    assert any(row.startswith("café\t") for row in rows)  # printable letters stay as they are
    assert main(["inspect", str(tmp_path / "clear\x1b[2J.pt")]) == 0
    assert "\x1b" not in capsys.readouterr().out
