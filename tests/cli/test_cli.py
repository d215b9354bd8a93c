"""The command line, run as a user runs it: a subprocess of ``python -m sdconcepts``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cli_process import run_cli

from sdconcepts.cli import main
from sdconcepts.cli.generate_command import embedding_arguments, hypernetwork_arguments
from sdconcepts.cli.main import build_parser
from sdconcepts.generation import parse_infotext
from sdconcepts.hypernetworks.files import load_hypernetwork
from sdconcepts.images import read_infotext
from sdconcepts.model_shape import EMBEDDED_XL_MODEL_DIR, read_model_shape


def test_generate_writes_pngs_with_infotext(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli("generate", "--prompt", "a (red:1.1) circle", "--negative-prompt", "blue", "--steps", "3",
                   "--sampler", "DPM++ 2M", "--cfg-scale", "6", "--seed", "21", "--batch-size", "2",
                   "--batch-count", "2", "--ckpt", str(tiny_model_dir), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-21.png", "00001-22.png", "00002-23.png", "00003-24.png"]
    prompt, negative, fields = parse_infotext(read_infotext(files[2]) or "")
    assert (prompt, negative) == ("a (red:1.1) circle", "blue")
    assert fields["Seed"] == "23" and fields["Sampler"] == "DPM++ 2M" and fields["Steps"] == "3"
    assert fields["Model"] == "tiny-sd1"
    assert "generate" in proc.stderr  # the progress bar
    assert "accelerate" not in proc.stderr  # diffusers' "install accelerate" warning is noise here (issue 26 item 3)


def test_help_documents_every_option() -> None:
    proc = run_cli("generate", "--help")
    assert proc.returncode == 0
    for option in ("--prompt", "--negative-prompt", "--steps", "--sampler", "--cfg-scale", "--seed", "--width",
                   "--height", "--batch-size", "--batch-count", "--ckpt", "--output", "--clip-skip"):
        assert option in proc.stdout, option
    assert "Euler a" in proc.stdout and "DPM++ 2M" in proc.stdout


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def test_bad_options_and_missing_files_are_one_line_errors(tmp_path: Path, tiny_model_dir: Path) -> None:
    line = _one_line_error(run_cli("generate", "--prompt", "x", "--output", str(tmp_path), "--steps", "zero"))
    assert "zero" in line
    line = _one_line_error(run_cli("generate", "--prompt", "x", "--output", str(tmp_path), "--ckpt",
                                   str(tmp_path / "missing.safetensors")))
    assert "missing.safetensors" in line
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a checkpoint at all")
    line = _one_line_error(run_cli("generate", "--prompt", "x", "--output", str(tmp_path), "--ckpt", str(bogus)))
    assert "bogus.safetensors" in line
    line = _one_line_error(run_cli("generate", "--prompt", "x", "--output", str(tmp_path), "--width", "33",
                                   "--ckpt", str(tiny_model_dir)))
    assert "multiples of 32" in line
    line = _one_line_error(run_cli("generate", "--prompt", "x", "--output", str(tmp_path), "--sampler", "Foo"))
    assert "Foo" in line


def test_training_on_the_command_line_says_how_far_latent_caching_got(capsys: pytest.CaptureFixture[str]) -> None:
    import math
    import threading

    from tqdm import tqdm

    from sdconcepts.cli.training_commands import _drive
    from sdconcepts.training.loop import TrainingEvent

    events = [TrainingEvent(0, math.nan, 0.0, kind="preparing", message="caching latents: 0 of 3 images"),
              TrainingEvent(1, 0.5, 0.01), TrainingEvent(1, math.nan, 0.0, kind="finished", message="done")]
    assert _drive(iter(events), threading.Event(), 1, True, tqdm) == 0
    captured = capsys.readouterr()
    assert "caching latents: 0 of 3 images" in captured.err and captured.out.strip() == "done"


def test_create_hypernetwork_defaults_to_the_models_widths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --sizes the file fits the model it is created for (the embedded one by default), as the web form's
    does; it used to get SD 1.x's 768/320/640/1280, which train-hypernetwork then refused (issue 26 item 5)."""
    monkeypatch.chdir(tmp_path)
    assert main(["create-hypernetwork", "hn", "--threads", "1"]) == 0
    assert sorted(load_hypernetwork(tmp_path / "models" / "hypernetworks" / "hn.pt").widths) == [32, 48, 64]
    assert main(["create-hypernetwork", "hn_xl", "--ckpt", "toyworld-xl", "--threads", "1"]) == 0
    shape = read_model_shape(EMBEDDED_XL_MODEL_DIR)
    assert shape is not None
    assert sorted(load_hypernetwork(tmp_path / "models" / "hypernetworks" / "hn_xl.pt").widths) == sorted(shape.widths)


def test_generate_finds_the_shipped_examples_as_the_web_ui_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The picture of the README's "Try this" can be made again from the CLI (issue 26 item 6)."""
    monkeypatch.chdir(tmp_path)
    prompt = "a example_triangle <hypernet:example_teal:1>"
    assert main(["generate", "--prompt", prompt, "--steps", "1", "--seed", "1", "--output", "a.png",
                 "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "unknown" not in err and "skipped" not in err, err
    fields = parse_infotext(read_infotext(tmp_path / "a.png") or "")[2]
    assert fields["TI hashes"].startswith("example_triangle: ")
    assert fields["Hypernet hashes"].startswith("example_teal: ")
    # --no-examples leaves them out: the word is plain text and the tag unknown.
    assert build_parser().parse_args(["generate", "--prompt", "p", "--output", "o", "--no-examples"]).examples is False
    assert embedding_arguments(None, 48, examples=False) == {}
    resolved = hypernetwork_arguments(None, prompt, examples=False)["hypernetworks"]
    assert resolved.used == [] and "unknown hypernet 'example_teal'" in " ".join(resolved.warnings)
    # The embedding tools find it by name too, as the web UI's do.
    assert main(["embedding", "inspect", "example_triangle", "--json", "--threads", "1"]) == 0
    assert "example_triangle" in capsys.readouterr().out
