"""Embedding tools (nearest tokens and norms, mix expressions, keep/drop/reorder, writing) on the tiny real model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sdconcepts.cli import main
from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.files import load_embedding, save_embedding
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.embeddings.tools import (
    EmbeddingToolError,
    MixTerm,
    describe_vectors,
    mix_vectors,
    parse_mix,
    parse_selection,
    select_vectors,
    vocabulary_of,
    write_embedding,
)


@pytest.fixture(scope="module")
def vocabulary(tiny_model: Any) -> Any:
    return vocabulary_of(tiny_model)


def test_parse_mix_reads_weights_words_selections_and_concatenation() -> None:
    assert parse_mix('0.5*toytri + 0.5*"red triangle"') == [[MixTerm(0.5, "toytri"), MixTerm(0.5, "red triangle", True)]]
    assert parse_mix('a[0:2] - 2e-1*`my emb`[1] | "red", b-c') == [
        [MixTerm(1.0, "a", selection="0:2"), MixTerm(-0.2, "my emb", selection="1")],
        [MixTerm(1.0, "red", True)], [MixTerm(1.0, "b-c")]]
    for bad, says in (("", "empty"), ("0.5 toytri", "w*term"), ("a +", "expected an embedding name"),
                      ("a * b", "expected + - | or ,"), ('"open', "cannot read"), ("a ++ b", "found '+'")):
        with pytest.raises(EmbeddingToolError, match=re.escape(says)):
            parse_mix(bad)


def test_selection_keeps_drops_and_reorders() -> None:
    vectors = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert parse_selection("2, 0, 1:3, -1", 4) == [2, 0, 1, 2, 3]
    assert torch.equal(select_vectors(vectors, keep="3,0"), vectors[[3, 0]])
    assert torch.equal(select_vectors(vectors, drop="1, -1"), vectors[[0, 2]])
    with pytest.raises(EmbeddingToolError, match="outside 0..3"):
        select_vectors(vectors, keep="4")
    with pytest.raises(EmbeddingToolError, match="no vector"):
        select_vectors(vectors, drop="0:4")
    with pytest.raises(EmbeddingToolError, match="not a position"):
        parse_selection("x", 4)


def test_nearest_tokens_find_the_words_a_vector_came_from(vocabulary: Any) -> None:
    rows = vocabulary.words("red triangle")
    reports = describe_vectors(rows * 3.0, vocabulary, top_k=4)
    assert [r.nearest[0][0] for r in reports] == ["red", "triangle"]
    assert all(abs(r.nearest[0][2] - 1.0) < 1e-5 and len(r.nearest) == 4 for r in reports)
    assert all(r.nearest[0][2] >= r.nearest[1][2] >= r.nearest[3][2] for r in reports)
    assert [round(r.norm, 4) for r in reports] == [round(float(v), 4) for v in (rows * 3.0).norm(dim=1)]
    # The start and end tokens are never offered, even for a vector equal to one of them.
    end = vocabulary.table[49407:49408]
    assert all(i != 49407 for _t, i, _c in describe_vectors(end, vocabulary, 3)[0].nearest)
    with pytest.raises(EmbeddingToolError, match="another model"):
        describe_vectors(torch.ones(1, 7), vocabulary)


def test_mix_sums_equal_counts_concatenates_and_refuses_the_rest(vocabulary: Any) -> None:
    words = vocabulary.words("red triangle")
    toytri = torch.randn(2, words.shape[1])
    embeddings = {"ToyTri": toytri}
    mixed = mix_vectors('0.5*toytri + 0.5*"red triangle"', embeddings, vocabulary)
    assert torch.allclose(mixed, 0.5 * toytri + 0.5 * words)
    assert torch.allclose(mix_vectors('toytri - "red triangle"', embeddings, vocabulary), toytri - words)
    joined = mix_vectors('toytri[1] | "red", toytri', embeddings, vocabulary)
    assert torch.equal(joined, torch.cat([toytri[1:2], vocabulary.words("red"), toytri]))
    with pytest.raises(EmbeddingToolError, match=r'cannot add "red" \(1 vectors\) to toytri \(2 vectors\)'):
        mix_vectors('toytri + "red"', embeddings, vocabulary)
    with pytest.raises(EmbeddingToolError, match="unknown embedding 'red'"):
        mix_vectors("toytri | red", embeddings, vocabulary)
    with pytest.raises(EmbeddingToolError, match="vocabulary"):
        mix_vectors('toytri | "red"', embeddings, None)
    with pytest.raises(EmbeddingToolError, match="different models"):
        mix_vectors("toytri | other", {**embeddings, "other": torch.ones(1, 7)}, vocabulary)
    with pytest.raises(EmbeddingToolError, match="more than the 75"):
        mix_vectors(" | ".join(["toytri"] * 38), embeddings, vocabulary)


def test_written_files_are_regular_embeddings_listed_at_once(tmp_path: Path) -> None:
    folder = tmp_path / "embeddings"
    library = EmbeddingLibrary([folder])
    library.refresh()
    vectors = torch.randn(3, 48)
    pt = write_embedding(folder, "mixed", vectors)
    st = write_embedding(folder, "mixed2", vectors, suffix=".safetensors")
    assert pt == folder / "mixed.pt" and st == folder / "mixed2.safetensors"
    for path, name in ((pt, "mixed"), (st, "mixed2")):
        loaded = load_embedding(path)
        assert loaded.name == name and torch.equal(loaded.tensor(), vectors) and loaded.step == 0
    library.refresh()
    assert set(library.usable(48)) == {"mixed", "mixed2"}
    # An existing file stays as it was unless overwriting is asked for; names are checked as training checks them.
    before = pt.read_bytes()
    with pytest.raises(EmbeddingToolError, match="already exists"):
        write_embedding(folder, "mixed", torch.zeros(1, 48))
    assert pt.read_bytes() == before
    with pytest.raises(EmbeddingToolError, match="path separator"):
        write_embedding(folder, "../escape", vectors)
    with pytest.raises(EmbeddingToolError, match="format"):
        write_embedding(folder, "x", vectors, suffix=".txt")
    assert sorted(p.name for p in folder.iterdir()) == ["mixed.pt", "mixed2.safetensors"]


def test_cli_embedding_inspect_mix_edit(tiny_model_dir: Path, tiny_model: Any, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "embeddings"
    rows = vocabulary_of(tiny_model).words("yellow triangle")
    save_embedding(Embedding("tri", rows), folder / "tri.pt")
    common = ["--embeddings-dir", str(folder), "--ckpt", str(tiny_model_dir)]
    assert main(["embedding", "inspect", "tri", "--top-k", "2", "--json", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [v["nearest"][0]["token"] for v in report["vectors"]] == ["yellow", "triangle"]
    assert main(["embedding", "mix", "half", '0.5*tri + 0.5*"red circle"', *common]) == 0
    half = load_embedding(folder / "half.pt").tensor()
    assert torch.allclose(half, 0.5 * rows + 0.5 * vocabulary_of(tiny_model).words("red circle"))
    assert main(["embedding", "edit", "half", "swapped", "--keep", "1,0", *common, "--format", "safetensors"]) == 0
    assert torch.equal(load_embedding(folder / "swapped.safetensors").tensor(), half[[1, 0]])
    assert main(["embedding", "edit", str(folder / "tri.pt"), "first", "--drop", "-1", *common]) == 0
    assert torch.equal(load_embedding(folder / "first.pt").tensor(), rows[:1])
    capsys.readouterr()
    # User errors: one line, exit code 2, nothing written.
    assert main(["embedding", "mix", "bad", 'tri + "red"', *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "equal vector counts" in err and "Traceback" not in err
    assert main(["embedding", "inspect", "nothing", *common]) == 2
    assert "no embedding 'nothing'" in capsys.readouterr().err
    assert not (folder / "bad.pt").exists()


def test_ui_tools_write_files_the_cards_show(tiny_model_dir: Path, tiny_model: Any, tmp_path: Path) -> None:
    from sdconcepts.ui import embedding_tools_handlers, handlers
    from sdconcepts.ui.ui_session import UiConfig, UiError, UiSession

    session = UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[tmp_path / "embeddings"], device="cpu"))
    label = str(tiny_model_dir)
    rows = vocabulary_of(tiny_model).words("yellow triangle")
    save_embedding(Embedding("tri", rows), tmp_path / "embeddings" / "tri.pt")
    report = embedding_tools_handlers.inspect_html(session, label, "TRI", 3)
    assert "yellow" in report and "triangle" in report and "norm" in report
    path = embedding_tools_handlers.mix_embedding(session, label, "mixed", 'tri | "red"')
    assert load_embedding(path).vector_count == 3
    edited = embedding_tools_handlers.edit_embedding(session, label, "mixed", "two", "", "0")
    assert load_embedding(edited).vector_count == 2
    cards = handlers.embedding_cards_view(session, model_label=label)
    assert "mixed" in cards.cards_html and "two" in cards.cards_html
    with pytest.raises(UiError, match="expression: cannot add"):
        embedding_tools_handlers.mix_embedding(session, label, "bad", 'tri + "red"')
    with pytest.raises(UiError, match="no usable embedding 'nope'"):
        embedding_tools_handlers.inspect_html(session, label, "nope", 3)

    from sdconcepts.ui.app import build_ui

    ids = {c.get("props", {}).get("elem_id") for c in build_ui(session).config["components"]}
    assert {"sdconcepts_ti_tools", "sdconcepts_ti_tools_expression", "sdconcepts_ti_tools_mix"} <= ids


def test_tools_say_why_a_named_embedding_is_skipped(tiny_model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import save_file

    from sdconcepts.ui import embedding_tools_handlers
    from sdconcepts.ui.ui_session import UiConfig, UiError, UiSession

    folder = tmp_path / "embeddings"
    folder.mkdir()
    bad = torch.zeros(1, 48)
    bad[0, 3] = float("nan")
    save_file({"nanemb": bad}, str(folder / "nanemb.safetensors"))  # written raw: our writer refuses NaN
    save_embedding(Embedding("pairemb", {"clip_l": torch.zeros(1, 16), "clip_g": torch.zeros(1, 32)}),
                   folder / "pairemb.safetensors")
    save_embedding(Embedding("tri", torch.zeros(2, 48)), folder / "tri.pt")
    common = ["--embeddings-dir", str(folder), "--ckpt", str(tiny_model_dir)]
    for argv, expected in (
        (["embedding", "inspect", "nanemb", *common], "embedding 'nanemb' is skipped: .*NaN"),
        (["embedding", "inspect", "pairemb", *common], r"an SDXL embedding \(clip_l \+ clip_g\) needs an SDXL model"),
        (["embedding", "mix", "x", "tri | nanemb", *common], "embedding 'nanemb' is skipped: "),
        (["embedding", "mix", "x", "tri | pairemb", *common], r"cannot mix SDXL embeddings \(clip_l \+ clip_g: pairemb\)"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert re.search(expected, err) and err.count("\n") == 0, err
    session = UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[folder], device="cpu"))
    with pytest.raises(UiError, match="'nanemb' is skipped: .*NaN"):
        embedding_tools_handlers.inspect_html(session, str(tiny_model_dir), "nanemb", 3)
    with pytest.raises(UiError, match="'pairemb' is skipped: an SDXL embedding"):
        embedding_tools_handlers.mix_embedding(session, str(tiny_model_dir), "x", "tri | pairemb")


def test_sdxl_pairs_per_encoder_in_inspect_mix_edit(tiny_sdxl_dir: Path, tiny_sdxl: Any, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sdconcepts.embeddings.tools import vocabularies_of
    from sdconcepts.ui import embedding_tools_handlers
    from sdconcepts.ui.ui_session import UiConfig, UiError, UiSession

    vocab = vocabularies_of(tiny_sdxl)
    assert (vocab["clip_l"].width, vocab["clip_g"].width) == (32, 48)
    folder = tmp_path / "embeddings"
    a = {key: vocab[key].words("yellow triangle") for key in vocab}
    b = {key: vocab[key].words("red circle") for key in vocab}
    save_embedding(Embedding("pa", a), folder / "pa.safetensors")
    save_embedding(Embedding("pb", b), folder / "pb.safetensors")
    save_embedding(Embedding("single", torch.zeros(2, 32)), folder / "single.pt")
    common = ["--embeddings-dir", str(folder), "--ckpt", str(tiny_sdxl_dir)]
    assert main(["embedding", "inspect", "pa", "--top-k", "1", "--json", *common]) == 0
    report = json.loads(capsys.readouterr().out)["encoders"]
    for key in ("clip_l", "clip_g"):  # each half's nearest tokens come from its own encoder's table
        assert [v["nearest"][0]["token"] for v in report[key]] == ["yellow", "triangle"]
    assert main(["embedding", "mix", "mixed", '0.3:0.7*pa + 0.7:0.3*pb | "red"', *common]) == 0
    mixed = load_embedding(folder / "mixed.safetensors").vectors
    assert torch.allclose(mixed["clip_l"], torch.cat([0.3 * a["clip_l"] + 0.7 * b["clip_l"],  # type: ignore[index]
                                                      vocab["clip_l"].words("red")]))
    assert torch.allclose(mixed["clip_g"], torch.cat([0.7 * a["clip_g"] + 0.3 * b["clip_g"],  # type: ignore[index]
                                                      vocab["clip_g"].words("red")]))
    assert main(["embedding", "edit", "pa", "swapped", "--keep", "1,0", *common]) == 0
    swapped = load_embedding(folder / "swapped.safetensors").vectors
    assert all(torch.equal(swapped[k], a[k][[1, 0]]) for k in a)  # type: ignore[index]
    capsys.readouterr()
    assert main(["embedding", "mix", "bad", "pa + single", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot mix SDXL embeddings" in err and "single" in err and err.count("\n") == 0
    # The web UI's tools, on the SDXL model: the same per-encoder work.
    session = UiSession(UiConfig(ckpt=tiny_sdxl_dir, embeddings_dirs=[folder], device="cpu"))
    label = str(tiny_sdxl_dir)
    html_report = embedding_tools_handlers.inspect_html(session, label, "pa", 1)
    assert "SDXL pair (clip_l 32, clip_g 48)" in html_report and html_report.count("<table>") == 2
    path = embedding_tools_handlers.mix_embedding(session, label, "uimix", '0.5:0*pa + "red circle"')
    assert path.suffix == ".safetensors"
    made = load_embedding(path).vectors
    assert torch.allclose(made["clip_g"], vocab["clip_g"].words("red circle"))  # type: ignore[index]
    edited = embedding_tools_handlers.edit_embedding(session, label, "pa", "uiedit", "", "0")
    assert load_embedding(edited).vector_count == 1
    with pytest.raises(UiError, match="'single' is skipped: width 32 does not fit"):
        embedding_tools_handlers.mix_embedding(session, label, "bad", "pa + single")
