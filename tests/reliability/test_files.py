"""Hostile or odd files in the embedding and hypernetwork folders: a scan finishes, says what each file is, never
hangs on a FIFO, never reads a huge file to reject it, and never passes on torch's advice to load unsafely."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.files import EmbeddingFileError, load_embedding, save_embedding
from sdconcepts.embeddings.folder_scan import Library
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.safe_load import UnsafeFileError, load_torch_file

T = TypeVar("T")
WIDTH = 16
SCAN_TIMEOUT_S = 60


def _within(seconds: float, work: Callable[[], T]) -> T:
    """Run ``work`` in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    result: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"did not finish within {seconds} s (blocked opening a FIFO?)")
    if errors:
        raise errors[0]
    return result[0]


@contextmanager
def _special_files(folder: Path) -> Iterator[tuple[Path, Path]]:
    """``fifo.pt`` (a named pipe) and ``sock.pt`` (a bound unix socket) in ``folder``."""
    fifo, sock_path = folder / "fifo.pt", folder / "sock.pt"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    try:
        yield fifo, sock_path
    finally:
        server.close()
        # A reader blocked in open() by a regression is released by a writer appearing.
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def _embedding(name: str, vectors: int = 1) -> Embedding:
    return Embedding(name=name, vectors=torch.randn(vectors, WIDTH))


def _run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sdconcepts", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=SCAN_TIMEOUT_S * 3)


# -- 1. FIFOs, sockets and other non-regular files ---------------------------------------------------------------


def test_embedding_scan_skips_fifo_and_socket_without_hanging(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_embedding(_embedding("good"), folder / "good.pt")
    with _special_files(folder):
        library = EmbeddingLibrary([folder])
        _within(SCAN_TIMEOUT_S, library.refresh)
        skipped = library.skipped(WIDTH)
        assert skipped == {"fifo": "not a regular file: FIFO", "sock": "not a regular file: socket"}
        assert list(library.usable(WIDTH)) == ["good"]


def test_hypernetwork_scan_skips_fifo_and_socket_without_hanging(tmp_path: Path) -> None:
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    folder = tmp_path / "models" / "hypernetworks"
    folder.mkdir(parents=True)
    with _special_files(folder):
        session = UiSession(UiConfig(hypernetworks_dirs=[folder]))
        _within(SCAN_TIMEOUT_S, session.hypernetworks.refresh)
        errors = {r.name: r.error for r in session.hypernetworks.records()}
        assert errors == {"fifo": "not a regular file: FIFO", "sock": "not a regular file: socket"}


def test_cli_names_a_fifo_hypernetwork_with_its_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdconcepts.cli.generate_command import hypernetwork_arguments

    folder = tmp_path / "models" / "hypernetworks"
    folder.mkdir(parents=True)
    with _special_files(folder):
        found = _within(SCAN_TIMEOUT_S, lambda: hypernetwork_arguments([folder], "a cat <hypernet:fifo:1>"))
    # Listed (not an "unknown hypernet"), not loaded, and the reason is said.
    resolved = found["hypernetworks"]
    assert resolved.chain == [] and [s.name for s in resolved.skipped] == ["fifo"]
    assert resolved.warnings == ["hypernet 'fifo' could not be loaded: the tag was removed from the prompt and has no effect"]
    err = capsys.readouterr().err
    assert "skipped hypernetwork fifo: " in err and "not a regular file: FIFO" in err, err


def test_readers_refuse_a_fifo_even_when_called_directly(tmp_path: Path) -> None:
    # The library checks before loading; the readers check again on the opened descriptor (a FIFO swapped in
    # after the library's check must not block them either).
    with _special_files(tmp_path) as (fifo, _sock):
        with pytest.raises(UnsafeFileError, match="not a regular file: FIFO"):
            _within(SCAN_TIMEOUT_S, lambda: load_torch_file(fifo))
        for suffix in (".safetensors", ".png"):
            other = tmp_path / f"fifo{suffix}"
            os.mkfifo(other)
            with pytest.raises(EmbeddingFileError, match="not a regular file: FIFO"):
                _within(SCAN_TIMEOUT_S, lambda other=other: load_embedding(other))  # type: ignore[misc]


def test_inspect_and_convert_on_a_fifo_are_one_line_errors(tmp_path: Path) -> None:
    with _special_files(tmp_path) as (fifo, sock):
        for args in (("inspect", str(fifo)), ("inspect", str(sock)), ("convert", str(fifo), str(tmp_path / "o.pt"))):
            proc = _run_cli(*args)
            assert proc.returncode == 2, proc.stderr
            assert "Traceback" not in proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and "not a regular file" in lines[0], proc.stderr
        folder = _run_cli("inspect", "--json", str(tmp_path))
        assert folder.returncode == 0, folder.stderr
        rows = {row["name"]: row for row in json.loads(folder.stdout)}
        assert rows["fifo"]["skipped"] == "not a regular file: FIFO"


# -- 3. files that are not torch files at all -------------------------------------------------------------------


def test_symlink_to_a_text_file_is_described_as_text(tmp_path: Path) -> None:
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / "x.pt").symlink_to(text)
    if Path("/etc/passwd").is_file():
        (folder / "etc.pt").symlink_to("/etc/passwd")
    library = EmbeddingLibrary([folder])
    library.refresh()
    for reason in library.skipped(WIDTH).values():
        assert reason == "a text file, not a torch file"


def test_huge_sparse_file_is_rejected_from_its_first_bytes_without_torch_advice(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    sparse = folder / "big.pt"
    with open(sparse, "wb") as handle:
        handle.truncate(2 << 30)  # 2 GiB of holes: no disk used, but reading it all would take seconds
    hyper = tmp_path / "hn"
    hyper.mkdir()
    os.link(sparse, hyper / "big.pt")
    before = _read_bytes()
    library = EmbeddingLibrary([folder])
    library.refresh()
    assert library.skipped(WIDTH) == {"big": "not a torch file: it starts with empty (all-zero) bytes"}
    hyper_library: Library[Any] = _hypernetwork_library(hyper)
    hyper_library.refresh()
    assert [r.error for r in hyper_library.records()] == ["not a torch file: it starts with empty (all-zero) bytes"]
    if before is not None:
        after = _read_bytes()
        assert after is not None and after - before < 64 << 20, "the scan read the sparse file"


def test_torch_errors_never_advise_weights_only_false(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1000)}, good, _use_new_zipfile_serialization=False)
    data = good.read_bytes()
    # Legacy pickles cut or damaged at several points, a zip cut short, and a pickle with garbage opcodes.
    (folder / "cut.pt").write_bytes(data[:40])
    (folder / "bad.pt").write_bytes(data[:30] + b"\xff" * 64)
    zipped = tmp_path / "zip.pt"
    torch.save({"w": torch.ones(1000)}, zipped)
    (folder / "zipcut.pt").write_bytes(zipped.read_bytes()[:300])
    (folder / "junk.pt").write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    library = EmbeddingLibrary([folder])
    library.refresh()
    skipped = library.skipped(WIDTH)
    assert set(skipped) == {"cut", "bad", "zipcut", "junk"}
    for name, reason in skipped.items():
        assert "weights_only" not in reason and "\n" not in reason, (name, reason)
        assert "Error" not in reason and "Traceback" not in reason, (name, reason)


def _read_bytes() -> int | None:
    """Bytes this process has read (rchar counts page-cache reads too), or None where /proc is missing."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _hypernetwork_library(folder: Path) -> Library[Any]:
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    return UiSession(UiConfig(hypernetworks_dirs=[folder])).hypernetworks


# -- 2. embeddings longer than a prompt chunk -------------------------------------------------------------------


def test_embedding_longer_than_a_chunk_is_skipped_at_scan(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_embedding(_embedding("fits", 75), folder / "fits.pt")
    save_embedding(_embedding("long", 76), folder / "long.safetensors")
    library = EmbeddingLibrary([folder])
    library.refresh()
    assert list(library.usable(WIDTH)) == ["fits"] and list(library.usable()) == ["fits"]
    reason = library.skipped(WIDTH)["long"]
    assert reason.startswith("76 vectors: more than the 75 tokens") and library.get("long") is None


def test_embedding_longer_than_a_chunk_reaching_the_encoder_is_a_one_line_error(tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationError, GenerationParams

    long = torch.randn(76, tiny_model.context_width)
    with pytest.raises(GenerationError, match="'long' has 76 vectors; a prompt chunk holds at most 75"):
        txt2img(tiny_model, GenerationParams(prompt="a long circle", steps=1, seed=1), embeddings={"long": long})


def test_cli_prompt_naming_a_too_long_embedding_warns_instead_of_a_traceback(
    tiny_model: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_embedding(Embedding(name="long", vectors=torch.randn(80, tiny_model.context_width)), folder / "long.pt")
    proc = _run_cli("generate", "--prompt", "a long circle", "--steps", "1", "--ckpt", str(tiny_model_dir),
                    "--embeddings-dir", str(folder), "--output", str(tmp_path / "out.png"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "embedding 'long' was skipped (80 vectors: more than the 75 tokens" in proc.stderr


# -- 5. hypernetwork cards from metadata, without building modules ----------------------------------------------


def _save_big_hypernetwork(path: Path, name: str, hidden: float) -> None:
    from sdconcepts.hypernetworks.files import save_hypernetwork
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork

    save_hypernetwork(create_hypernetwork(name, (768,), layer_structure=(1.0, hidden, 1.0), activation="relu",
                                          generator_seed=0), path)


def test_hypernetwork_cards_list_from_metadata_and_load_only_when_a_prompt_uses_it(tmp_path: Path) -> None:
    from sdconcepts.hypernetworks.files import HypernetworkFileError, load_hypernetwork
    from sdconcepts.ui import handlers
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    whole, cut = folder / "whole.pt", folder / "cut.pt"
    _save_big_hypernetwork(whole, "whole", 4.0)  # 768 -> 3072 -> 768, key and value: 9.4 M parameters, 38 MB
    data = whole.read_bytes()
    # The weights follow the pickle in this (legacy) format: cutting the file's tail leaves the metadata intact and
    # the weights unreadable. A listing that read or built the weights could not list it.
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(HypernetworkFileError, match="cut.pt"):
        load_hypernetwork(cut)

    session = UiSession(UiConfig(hypernetworks_dirs=[folder]))
    view = handlers.hypernetwork_cards_view(session)
    assert view.skipped_html == "" and view.summary == "2 of 2 hypernetworks"
    for name in ("cut", "whole"):
        assert f'data-name="{name}"' in view.cards_html
    assert view.cards_html.count("widths 768") == 2 and view.cards_html.count("structure [1, 4, 1], relu") == 2
    assert all(not isinstance(r.item, torch.nn.Module) for r in session.hypernetworks.records())

    # The file is read for real only when a prompt uses it: then the damage is reported, and the good one loads.
    resolved, warnings = session.resolve_hypernetworks("<hypernet:cut> <hypernet:whole>", None)
    assert [name for name, _ in resolved.used] == ["whole"] and len(resolved.chain) == 1
    assert isinstance(resolved.chain[0][0], torch.nn.Module)
    assert len(warnings) == 1 and warnings[0].startswith(f"hypernetwork file {cut} was skipped: ")
    assert "weights_only" not in warnings[0]


_PEAK_SCRIPT = """
import sys
from pathlib import Path
from sdconcepts.ui import handlers
from sdconcepts.ui.ui_session import UiConfig, UiSession

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

session = UiSession(UiConfig(hypernetworks_dirs=[Path(sys.argv[1])]))
Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (VmHWM) to the current one
before = status("VmRSS")
view = handlers.hypernetwork_cards_view(session)
peak = status("VmHWM")
assert view.summary == "1 of 1 hypernetwork", view.summary
print(peak - before)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_hypernetwork_card_listing_does_not_hold_the_weights_in_memory(tmp_path: Path) -> None:
    folder = tmp_path / "hypernetworks"
    folder.mkdir()
    _save_big_hypernetwork(folder / "big.pt", "big", 8.0)  # 18.9 M parameters: 75 MB of weights
    size = (folder / "big.pt").stat().st_size
    # A fresh process, so that the peak resident size is this listing's own (loading the weights would raise the
    # peak by the file's size, building the modules by as much again).
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(folder)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=SCAN_TIMEOUT_S * 3)
    assert proc.returncode == 0, proc.stderr
    growth = int(proc.stdout.split()[-1])
    assert growth < size // 4, f"listing one {size >> 20} MB hypernetwork raised peak memory by {growth >> 20} MB"


# -- 4. inspect describes each file by what it is ---------------------------------------------------------------


def test_inspect_folder_describes_hypernetworks_as_hypernetworks(tmp_path: Path) -> None:
    from sdconcepts.hypernetworks.files import hypernetwork_to_dict, save_hypernetwork
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork

    folder = tmp_path / "models" / "hypernetworks"
    folder.mkdir(parents=True)
    save_hypernetwork(create_hypernetwork("legacy", (WIDTH,), generator_seed=0), folder / "legacy.pt")
    # A1111 itself writes torch's zip format.
    zipped = create_hypernetwork("zipped", (WIDTH, 32), layer_structure=(1.0, 2.0, 1.0), activation="relu",
                                 generator_seed=1)
    torch.save(hypernetwork_to_dict(zipped), folder / "zipped.pt")
    bad = hypernetwork_to_dict(create_hypernetwork("bad", (WIDTH,), generator_seed=2))
    bad["activation_func"] = "no-such-activation"
    torch.save(bad, folder / "bad.pt")
    save_embedding(_embedding("style", 2), folder / "style.pt")
    (folder / "notes.pt").write_text("just some notes\n")

    proc = _run_cli("inspect", "--json", str(folder))
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    assert {name: row["kind"] for name, row in rows.items()} == {
        "bad": "hypernetwork", "legacy": "hypernetwork", "notes": "embedding", "style": "embedding",
        "zipped": "hypernetwork"}
    assert rows["legacy"]["skipped"] is None and rows["legacy"]["widths"] == [WIDTH]
    assert rows["zipped"]["skipped"] is None and rows["zipped"]["widths"] == [WIDTH, 32]
    assert rows["zipped"]["layer_structure"] == [1.0, 2.0, 1.0] and rows["zipped"]["activation"] == "relu"
    assert rows["zipped"]["parameters"] == sum(p.numel() for p in zipped.parameters())
    assert "no-such-activation" in rows["bad"]["skipped"]
    assert rows["style"]["skipped"] is None and rows["style"]["vectors"] == 2
    assert rows["notes"]["skipped"] == "a text file, not a torch file"

    text = _run_cli("inspect", str(folder))
    assert text.returncode == 0, text.stderr
    lines = {line.split("\t")[0]: line for line in text.stdout.splitlines()}
    assert lines["zipped"].split("\t")[1] == f"hypernetwork {WIDTH}, 32" and "SKIPPED" not in lines["zipped"]
    assert lines["style"].split("\t")[1] == f"2v x {WIDTH}"
    assert text.stderr.strip().splitlines()[-1] == "1 usable embedding, 2 hypernetworks, 2 skipped"

    single = _run_cli("inspect", "--json", str(folder / "zipped.pt"))
    assert single.returncode == 0 and json.loads(single.stdout)["kind"] == "hypernetwork"


def test_skipped_reasons_say_what_the_file_is_in_one_line(tmp_path: Path) -> None:
    import pickle

    folder = tmp_path / "embeddings"
    folder.mkdir()
    (folder / "text.png").write_text("not a picture\n")
    torch.save({"a": torch.ones(2)}, folder / "pickled.safetensors")
    (folder / "plain.pt").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    (folder / "zipjunk.bin").write_bytes(b"PK\x03\x04" + b"x" * 100)
    with open(folder / "sparse.safetensors", "wb") as handle:
        handle.truncate(1 << 30)
    library = EmbeddingLibrary([folder])
    library.refresh()
    assert library.skipped(WIDTH) == {
        "text": "a text file, not an image",
        "pickled": "a torch pickle, not a safetensors file (rename it to .pt)",
        "plain": "a plain Python pickle, not a torch file (torch.load cannot read it)",
        "zipjunk": "not a loadable torch file (corrupt or truncated data: PytorchStreamReader failed reading zip "
        "archive: failed finding central directory)",
        "sparse": "not a safetensors file: it starts with empty (all-zero) bytes",
    }
    # torch's warning about the pickle protocol does not reach the user either.
    proc = _run_cli("inspect", str(folder / "plain.pt"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_hypernetwork_no_tag_can_name_is_listed_as_skipped_with_the_reason(tmp_path: Path) -> None:
    from sdconcepts.hypernetworks.files import save_hypernetwork
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork
    from sdconcepts.ui import handlers
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    folder = tmp_path / "hypernetworks"
    for name in ("hn:5", "a>b", "plain"):
        save_hypernetwork(create_hypernetwork(name, (8,), generator_seed=0), folder / f"{name}.pt")
    view = handlers.hypernetwork_cards_view(UiSession(UiConfig(hypernetworks_dirs=[folder])))
    # hn:5.pt had a card whose tag <hypernet:hn:5:1> named hypernetwork "hn" at strength 5.
    assert 'data-name="plain"' in view.cards_html and 'data-name="hn' not in view.cards_html
    assert "&#x27;:&#x27;, which end a prompt tag&#x27;s name: no tag can name it" in view.skipped_html
    assert "&#x27;&gt;&#x27;, which end a prompt tag&#x27;s name" in view.skipped_html
