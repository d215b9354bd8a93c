"""File hashes kept across runs (sdconcepts.hash_cache): a restart takes a file's hash from the cache instead of
reading the file, a changed file is hashed again, a damaged cache costs a rehash and a log line, never a failure."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from sdconcepts import Embedding, save_embedding
from sdconcepts.embeddings.folder_scan import Library
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.hash_cache import HashCache
from sdconcepts.safe_load import file_sha256
from sdconcepts.ui import handlers
from sdconcepts.ui.ui_session import UiConfig, UiSession

WIDTH = 48


def _save(path: Path, seed: int) -> None:
    save_embedding(Embedding("e", torch.randn(1, WIDTH, generator=torch.Generator().manual_seed(seed))), path)


def _rewrite_in_place_keeping_the_stamp(path: Path, seed: int) -> None:
    """New content of the same size, written into the same inode, with the old modification time put back: only a
    hash taken from the cache can still be the old one."""
    other = path.with_name("other" + path.suffix)
    _save(other, seed)
    data = other.read_bytes()
    other.unlink()
    st = path.stat()
    assert len(data) == st.st_size
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)


def _hash(library: EmbeddingLibrary) -> str | None:
    library.refresh()
    (record,) = library.records(WIDTH)
    return record.hash


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_second_library_takes_the_hash_from_the_cache_and_a_changed_file_is_hashed_again(
    tmp_path: Path, suffix: str
) -> None:
    folder = tmp_path / "embeddings"
    path = folder / f"e{suffix}"
    _save(path, seed=1)
    cache = tmp_path / "cache" / "hashes.json"
    first = _hash(EmbeddingLibrary([folder], hashes=HashCache(cache)))
    assert first == file_sha256(path) and cache.is_file()

    _rewrite_in_place_keeping_the_stamp(path, seed=2)
    assert file_sha256(path) != first
    # A new instance (a server restart) with the cache: the file is not read to hash it, so the recorded hash stays.
    assert _hash(EmbeddingLibrary([folder], hashes=HashCache(cache))) == first
    assert _hash(EmbeddingLibrary([folder])) == file_sha256(path)  # without the cache the file is read

    # A real change moves the stamp: hashed again, and the cache records the new hash.
    stamp = path.stat().st_mtime_ns + 10**9
    os.utime(path, ns=(stamp, stamp))
    assert _hash(EmbeddingLibrary([folder], hashes=HashCache(cache))) == file_sha256(path)
    entry = json.loads(cache.read_text())["files"][str(path)]
    assert entry[:2] == [stamp, path.stat().st_size] and entry[3] == file_sha256(path)


def test_other_libraries_use_the_cache_too(tmp_path: Path) -> None:
    # A library whose loader does not hash (the Hypernetworks tab's): the library hashes through the cache.
    path = tmp_path / "h.bin"
    path.write_bytes(b"x" * 100)
    first_hash = file_sha256(path)

    def listing() -> str | None:
        library = Library(folders=[tmp_path], load=lambda p: p.read_bytes()[:1], suffixes=(".bin",),
                          hashes=HashCache(tmp_path / "hashes.json"))
        library.refresh()
        return library.records()[0].hash

    assert listing() == first_hash
    st = path.stat()
    with open(path, "r+b") as handle:
        handle.write(b"y" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert listing() == first_hash != file_sha256(path)


@pytest.mark.parametrize(
    "content",
    ["{not json", '{"version": 1, "files": []}', '["a"]', "\udcff", "[" * 100_000 + "]" * 100_000,
     '{"version": 1, "files": {"x": ' + "[" * 200 + "]" * 200 + "}}"],
)
def test_a_damaged_cache_is_ignored_with_a_log_line_and_rewritten(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "embeddings"
    _save(folder / "e.safetensors", seed=1)
    cache = tmp_path / "hashes.json"
    cache.write_bytes(content.encode("utf-8", "surrogateescape"))
    with caplog.at_level(logging.WARNING, logger="sdconcepts.hash_cache"):
        assert _hash(EmbeddingLibrary([folder], hashes=HashCache(cache))) == file_sha256(folder / "e.safetensors")
    assert any("hash cache" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    assert str(folder / "e.safetensors") in json.loads(cache.read_text())["files"]


def _hash_within(library: EmbeddingLibrary, seconds: float) -> str | None:
    """``_hash`` in a thread: a test of something that used to hang fails instead of hanging."""
    result: list[str | None] = []
    worker = threading.Thread(target=lambda: result.append(_hash(library)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"listing the library took more than {seconds} s"
    return result[0]


def test_a_fifo_or_a_huge_file_in_place_of_the_cache_is_ignored_without_reading_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "embeddings"
    _save(folder / "e.safetensors", seed=1)
    fifo, huge = tmp_path / "fifo.json", tmp_path / "huge.json"
    os.mkfifo(fifo)  # a plain open() blocks until a writer comes: every scan, and the web UI's start, hung
    with open(huge, "wb") as handle:
        handle.truncate(3 << 30)  # sparse: costs nothing on disk, but was read whole (3 GB) before being ignored
    with caplog.at_level(logging.WARNING, logger="sdconcepts.hash_cache"):
        for cache in (fifo, huge):
            library = EmbeddingLibrary([folder], hashes=HashCache(cache))
            assert _hash_within(library, 10.0) == file_sha256(folder / "e.safetensors")
    messages = [r.getMessage() for r in caplog.records]
    assert any("fifo.json" in m and "not a regular file: FIFO" in m for m in messages)
    assert any("huge.json" in m and "more than 64 MiB" in m for m in messages)


def test_bad_entries_are_skipped_and_the_file_gets_the_umask_mode(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    path = folder / "e.safetensors"
    _save(path, seed=1)
    st = path.stat()
    cache = tmp_path / "hashes.json"
    cache.write_text(json.dumps({"version": 1, "files": {
        str(path): [st.st_mtime_ns, st.st_size, st.st_ino, "not a hash"],
        "/elsewhere": [1, 2],
    }}))
    old = os.umask(0o027)
    try:
        assert _hash(EmbeddingLibrary([folder], hashes=HashCache(cache))) == file_sha256(path)
    finally:
        os.umask(old)
    assert cache.stat().st_mode & 0o777 == 0o640
    assert list(json.loads(cache.read_text())["files"]) == [str(path)]


def test_an_unwritable_cache_is_reported_and_the_listing_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "embeddings"
    _save(folder / "e.safetensors", seed=1)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="sdconcepts.hash_cache"):
        assert _hash(EmbeddingLibrary([folder], hashes=HashCache(blocker / "hashes.json"))) == file_sha256(
            folder / "e.safetensors")
    assert any("cannot write the hash cache" in r.getMessage() for r in caplog.records)


def test_the_ui_session_keeps_hashes_in_its_cache_file(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    path = folder / "e.safetensors"
    _save(path, seed=1)
    cache = tmp_path / "state" / "hashes.json"
    view = handlers.embedding_cards_view(UiSession(UiConfig(embeddings_dirs=[folder], hash_cache=cache)))
    assert file_sha256(path)[:12] in view.cards_html
    assert json.loads(cache.read_text())["files"][str(path)][3] == file_sha256(path)
    first = file_sha256(path)
    _rewrite_in_place_keeping_the_stamp(path, seed=2)
    view = handlers.embedding_cards_view(UiSession(UiConfig(embeddings_dirs=[folder], hash_cache=cache)))
    # The restart read no content to hash: the card shows the recorded hash, not the (silently) new content's.
    assert first[:12] in view.cards_html and file_sha256(path)[:12] not in view.cards_html


def test_entries_of_deleted_files_are_dropped_when_the_cache_is_written(tmp_path: Path) -> None:
    cache_file = tmp_path / "cache" / "hashes.json"
    kept, deleted, added = tmp_path / "kept.pt", tmp_path / "deleted.pt", tmp_path / "added.pt"
    for seed, path in enumerate((kept, deleted, added)):
        _save(path, seed)
    cache = HashCache(cache_file)
    for path in (kept, deleted):
        st = path.stat()
        cache.sha256(str(path), (st.st_mtime_ns, st.st_size, st.st_ino))
    cache.save(force=True)
    assert set(json.loads(cache_file.read_text())["files"]) == {str(kept), str(deleted)}
    deleted.unlink()
    later = HashCache(cache_file)  # a later run: it hashes a new file and writes the cache
    st = added.stat()
    later.sha256(str(added), (st.st_mtime_ns, st.st_size, st.st_ino))
    later.save(force=True)
    assert set(json.loads(cache_file.read_text())["files"]) == {str(kept), str(added)}
    st = kept.stat()
    assert later.get(str(kept), (st.st_mtime_ns, st.st_size, st.st_ino)) == file_sha256(kept)
