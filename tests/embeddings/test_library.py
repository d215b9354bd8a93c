"""Folder scanning: records, previews, A1111's name and width rules, bad files skipped, hot reload anywhere."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_embedding_files import write_bad_files, write_hostile_files

from sdconcepts import Embedding, save_embedding
from sdconcepts.embeddings.folder_scan import Library
from sdconcepts.embeddings.library import EmbeddingLibrary

WIDTH = 48


def _emb(name: str, n: int = 1, width: int = WIDTH, seed: int = 0) -> Embedding:
    return Embedding(name, torch.randn(n, width, generator=torch.Generator().manual_seed(seed)))


def _photo(path: Path) -> None:
    Image.fromarray(np.full((8, 8, 3), 120, dtype=np.uint8)).save(path)


def test_scans_subfolders_with_names_previews_and_hashes(tmp_path: Path) -> None:
    save_embedding(_emb("style", 2), tmp_path / "style.pt")
    _photo(tmp_path / "style.png")  # a picture without data is the card picture, not an embedding
    save_embedding(_emb("deep", 3), tmp_path / "a" / "b" / "deep.safetensors")
    _photo(tmp_path / "a" / "b" / "deep.preview.png")
    save_embedding(_emb("stored-name"), tmp_path / "a" / "carrier.webp")
    library = EmbeddingLibrary([tmp_path])
    assert library.refresh()
    records = {r.name: r for r in library.records(WIDTH)}
    assert set(records) == {"style", "deep", "stored-name"}
    assert records["style"].preview == tmp_path / "style.png"
    assert records["deep"].preview == tmp_path / "a" / "b" / "deep.preview.png"
    assert records["stored-name"].preview == tmp_path / "a" / "carrier.webp"  # an image is its own card picture
    assert (records["deep"].vectors, records["deep"].width) == (3, WIDTH)
    assert all(r.skipped is None and r.hash and len(r.short_hash or "") == 12 for r in records.values())
    # Matching is case-insensitive, as A1111's lower-casing tokenizer makes it.
    found = library.get("DEEP", WIDTH)
    assert found is not None and found.vector_count == 3


def test_width_mismatch_is_listed_as_skipped_with_a_reason(tmp_path: Path) -> None:
    save_embedding(_emb("fits"), tmp_path / "fits.pt")
    save_embedding(_emb("sd2", width=1024), tmp_path / "sd2.safetensors")
    pair = {"clip_l": torch.zeros(1, 768) + 0.1, "clip_g": torch.zeros(1, 1280) + 0.1}
    save_embedding(Embedding("xl", pair), tmp_path / "xl.safetensors")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    assert set(library.usable(WIDTH)) == {"fits"}
    skipped = library.skipped(WIDTH)
    assert "1024 (SD 2.x)" in skipped["sd2"] and "2048 (SDXL" in skipped["xl"] and str(WIDTH) in skipped["xl"]
    assert set(library.usable(2048)) == {"xl"}  # the same files judged against an SDXL model


def test_hostile_and_broken_files_are_skipped_and_the_rest_load(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    folder.mkdir()
    marker = tmp_path / "pwned"
    hostile = write_hostile_files(folder, marker)
    bad = write_bad_files(folder)
    save_embedding(_emb("good", 2), folder / "good.pt")
    library = EmbeddingLibrary([folder])
    library.refresh()
    assert not marker.exists()
    assert set(library.usable(WIDTH)) == {"good"}
    skipped = library.skipped(WIDTH)
    assert {p.stem for p in hostile} <= set(skipped)
    assert all("refused" in skipped[p.stem] and "io.open" in skipped[p.stem] for p in hostile)
    for name, reason in bad.items():
        assert reason in skipped[Path(name).stem], skipped[Path(name).stem]


def test_name_collision_later_file_wins_case_insensitively(tmp_path: Path) -> None:
    save_embedding(_emb("Face", seed=1), tmp_path / "a" / "Face.pt")
    save_embedding(_emb("face", seed=2), tmp_path / "b" / "face.safetensors")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    usable = library.usable(WIDTH)
    assert list(usable) == ["face"] and torch.equal(usable["face"].tensor(), _emb("x", seed=2).tensor())
    assert "which wins" in library.skipped(WIDTH)["Face"]


def test_hot_reload_sees_add_change_and_remove_anywhere(tmp_path: Path) -> None:
    deep = tmp_path / "x" / "y"
    save_embedding(_emb("one"), deep / "one.pt")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    top_mtime = os.stat(tmp_path).st_mtime_ns

    assert not library.refresh()  # nothing changed

    save_embedding(_emb("two", 2), deep / "two.pt")
    changes = library.refresh()
    assert changes.added == (deep / "two.pt",) and set(library.usable(WIDTH)) == {"one", "two"}

    time.sleep(0.02)  # filesystem timestamps can be coarser than the time a save takes
    save_embedding(_emb("one", 4), deep / "one.pt")  # replaced in place, same name
    changes = library.refresh()
    assert changes.changed == (deep / "one.pt",) and library.usable(WIDTH)["one"].vector_count == 4

    (deep / "two.pt").unlink()
    changes = library.refresh()
    assert changes.removed == (deep / "two.pt",) and set(library.usable(WIDTH)) == {"one"}
    # A1111 would have missed all of this: only the top folder's mtime is watched there, and it never moved.
    assert os.stat(tmp_path).st_mtime_ns == top_mtime


def test_in_place_rewrite_is_seen(tmp_path: Path) -> None:
    path = save_embedding(_emb("e", 1, seed=1), tmp_path / "e.pt")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    before = library.usable(WIDTH)["e"].hash
    time.sleep(0.02)
    replacement = tmp_path / "other.pt"
    save_embedding(_emb("e", 1, seed=2), replacement)
    path.write_bytes(replacement.read_bytes())  # same inode, same size, new content
    replacement.unlink()
    assert library.refresh().changed == (path,)
    assert library.usable(WIDTH)["e"].hash != before


def test_added_preview_updates_the_record(tmp_path: Path) -> None:
    save_embedding(_emb("card"), tmp_path / "card.safetensors")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    assert library.records()[0].preview is None
    _photo(tmp_path / "card.preview.png")
    assert library.refresh().previews
    assert library.records()[0].preview == tmp_path / "card.preview.png"


def test_generic_library_reloads_only_changed_files(tmp_path: Path) -> None:
    loads: list[str] = []

    def load_text(path: Path) -> str:
        loads.append(path.name)
        text = path.read_text()
        if not text:
            raise ValueError(f"{path}: empty")
        return text

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.note").write_text(name * 3)
    (tmp_path / "empty.note").write_text("")
    library: Library[str] = Library(folders=[tmp_path], load=load_text, suffixes=[".note"])
    library.refresh()
    assert sorted(loads) == ["a.note", "b.note", "c.note", "empty.note"]
    records = {r.name: r for r in library.records()}
    assert records["a"].item == "aaa" and records["empty"].error == "empty" and records["empty"].item is None
    loads.clear()
    time.sleep(0.02)
    (tmp_path / "b.note").write_text("changed")
    library.refresh()
    assert loads == ["b.note"]
    loads.clear()
    library.refresh(force=True)
    assert len(loads) == 4


def test_missing_folder_and_symlink_loop_do_not_break_the_scan(tmp_path: Path) -> None:
    save_embedding(_emb("ok"), tmp_path / "ok.pt")
    (tmp_path / "loop").symlink_to(tmp_path, target_is_directory=True)
    library = EmbeddingLibrary([tmp_path / "absent", tmp_path])
    library.refresh()
    assert [r.name for r in library.records(WIDTH)] == ["ok"]


def test_preview_images_are_never_read_and_added_folders_join(tmp_path: Path) -> None:
    carrier = save_embedding(_emb("inside"), tmp_path / "main" / "inside.png")
    (tmp_path / "main" / "other.preview.png").write_bytes(carrier.read_bytes())  # carries data, but is a preview
    library = EmbeddingLibrary([tmp_path / "main"])
    library.refresh()
    assert [r.path.name for r in library.records()] == ["inside.png"]
    save_embedding(_emb("extra"), tmp_path / "extension" / "extra.safetensors")
    library.add_folder(tmp_path / "extension")
    assert library.refresh().added == (tmp_path / "extension" / "extra.safetensors",)
    assert set(library.usable(WIDTH)) == {"inside", "extra"}


# -- header-only listing, lazy reads ---------------------------------------------------------------------------


def test_header_info_matches_the_full_read_for_every_layout(tmp_path: Path) -> None:
    from sdconcepts.embeddings.files import load_embedding, read_embedding_info
    from sdconcepts.safe_load import write_torch_file

    save_embedding(_emb("a1111", 3), tmp_path / "a1111.pt")
    save_embedding(_emb("st", 2), tmp_path / "st.safetensors")
    write_torch_file({"<learned>": torch.randn(WIDTH)}, tmp_path / "diffusers.bin")  # one vector, [width]
    pair = {"clip_l": torch.zeros(2, 768) + 0.1, "clip_g": torch.zeros(2, 1280) + 0.1}
    save_embedding(Embedding("xl", pair), tmp_path / "xl.safetensors")
    save_embedding(_emb("carried", 4), tmp_path / "carrier.png")
    for path in sorted(tmp_path.iterdir()):
        info, full = read_embedding_info(path), load_embedding(path)
        assert (info.name, info.vectors, info.width, info.sdxl, info.hash) == (
            full.name, full.vector_count, full.width, full.is_sdxl, full.hash
        ), path.name


def test_vectors_are_read_only_for_the_words_a_prompt_uses(tmp_path: Path) -> None:
    # nan.pt has a sound header and NaN vectors: only reading its vectors finds that out.
    torch.save({"emb_params": torch.full((2, WIDTH), float("nan"))}, tmp_path / "nan.pt")
    save_embedding(_emb("good", 2), tmp_path / "good.safetensors")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    assert [r.name for r in library.records(WIDTH) if r.skipped is None] == ["good", "nan"]
    assert set(library.usable(WIDTH, used_in="a GOOD photo")) == {"good"}
    assert library.skipped(WIDTH) == {}  # nan.pt was never read
    assert set(library.usable(WIDTH, used_in="nan, good")) == {"good"}
    assert "NaN" in library.skipped(WIDTH)["nan"]  # read now, and remembered until the file changes


def test_lazy_refresh_lists_by_name_and_reads_on_demand(tmp_path: Path) -> None:
    save_embedding(_emb("one"), tmp_path / "one.pt")
    save_embedding(_emb("stored"), tmp_path / "deep" / "carrier.png")
    _photo(tmp_path / "one.png")  # a card picture
    library = EmbeddingLibrary([tmp_path])
    assert library.refresh(lazy=True)
    records = library.records(WIDTH)
    # Unread pictures are not words (most are card pictures); unread files have no width yet.
    assert [(r.name, r.pending, r.width) for r in records] == [("one", True, None)]
    version = library.version
    assert library.files.read([tmp_path / "one.pt"]) == 1 and library.version != version
    assert [(r.name, r.pending, r.width, r.preview) for r in library.records(WIDTH)] == [
        ("one", False, WIDTH, tmp_path / "one.png")
    ]
    # A prompt may use a name stored inside an image: unread images are read before matching.
    assert set(library.usable(WIDTH, used_in="stored")) == {"stored"}
    assert library.files.pending() == [] and not library.refresh(lazy=True)


# -- A1111 user metadata ------------------------------------------------------------------------------------------


def test_user_metadata_is_read_from_the_json_beside_each_file(tmp_path: Path) -> None:
    import json

    save_embedding(_emb("style"), tmp_path / "style.pt")
    save_embedding(_emb("plain"), tmp_path / "plain.safetensors")
    save_embedding(_emb("broken"), tmp_path / "broken.pt")
    (tmp_path / "style.json").write_text(json.dumps(
        {"description": "A style", "activation text": "red shape", "preferred weight": 0.6,
         "negative text": "blurry", "notes": "n", "sd version": "SD1", "other": [1]}), encoding="utf-8")
    (tmp_path / "broken.json").write_text("{not json", encoding="utf-8")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    records = {r.name: r for r in library.records(WIDTH)}
    style = records["style"].user_metadata
    assert style is not None and (style.description, style.activation_text, style.preferred_weight) == (
        "A style", "red shape", 0.6)
    assert (style.negative_text, style.notes, style.sd_version, dict(style.other)) == ("blurry", "n", "SD1",
                                                                                       {"other": [1]})
    assert records["plain"].user_metadata is None and records["plain"].metadata_error is None
    # A broken .json is reported on its record; the embedding itself stays usable.
    broken = records["broken"]
    assert broken.skipped is None and broken.user_metadata is None
    assert "broken.json: not valid JSON" in (broken.metadata_error or "")
    # An edit is seen by the next refresh (its stamp changed), like any file.
    (tmp_path / "broken.json").write_text('{"description": "fixed"}', encoding="utf-8")
    assert library.refresh()
    fixed = {r.name: r for r in library.records(WIDTH)}["broken"]
    assert fixed.metadata_error is None and fixed.user_metadata is not None
    assert fixed.user_metadata.description == "fixed"


def test_a_link_to_a_folder_above_is_not_followed_and_a_huge_walk_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from sdconcepts.embeddings import folder_scan

    folder = tmp_path / "embeddings"
    save_embedding(_emb("e"), folder / "e.safetensors")
    (folder / "root").symlink_to("/")  # inspect walked all of / for over 180 s, 3.4 GB
    (folder / "up").symlink_to(tmp_path)
    elsewhere = tmp_path / "shared"
    save_embedding(_emb("s"), elsewhere / "s.safetensors")
    (folder / "shared").symlink_to(elsewhere)  # a link to a folder beside it is followed, as A1111 follows links
    library = EmbeddingLibrary([folder])
    worker = threading.Thread(target=library.refresh, daemon=True)
    with caplog.at_level("WARNING", logger="sdconcepts.embeddings.folder_scan"):
        worker.start()
        worker.join(20)
    assert not worker.is_alive(), "the scan followed the link to /"
    assert sorted(r.name for r in library.records(WIDTH)) == ["e", "s"]
    assert any("not following" in r.getMessage() and "root" in r.getMessage() for r in caplog.records)
    # However a folder got there, a scan stops at the entry budget with a warning instead of listing a whole disk.
    monkeypatch.setattr(folder_scan, "MAX_SCAN_ENTRIES", 3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdconcepts.embeddings.folder_scan"):
        EmbeddingLibrary([folder]).refresh()
    assert any("stopped listing" in r.getMessage() for r in caplog.records)
