"""The shipped examples: they load, are small, are listed in the card tabs of ``python -m sdconcepts`` by default
(read-only, behind the user's own files) and visibly change the toy model's output (probe-scored)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from sdconcepts.cli.main import build_parser
from sdconcepts.cli.web_ui_command import web_ui_config
from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.files import load_embedding, save_embedding
from sdconcepts.hypernetworks.files import load_hypernetwork
from sdconcepts.model_shape import EMBEDDED_MODEL_DIR
from sdconcepts.toyworld.examples import (
    EMBEDDING,
    EXAMPLE_EMBEDDINGS_DIR,
    EXAMPLE_HYPERNETWORKS_DIR,
    EXAMPLES_DIR,
    HYPERNETWORK,
)
from sdconcepts.ui import handlers
from sdconcepts.ui.ui_session import DEFAULT_MODEL_LABEL, UiSession

EMBEDDING_FILE = EXAMPLE_EMBEDDINGS_DIR / f"{EMBEDDING}.pt"
HYPERNETWORK_FILE = EXAMPLE_HYPERNETWORKS_DIR / f"{HYPERNETWORK}.pt"


def test_the_examples_load_and_are_small() -> None:
    embedding = load_embedding(EMBEDDING_FILE)
    assert embedding.width == 48 and embedding.vector_count == 4 and embedding.step == 500
    hypernetwork = load_hypernetwork(HYPERNETWORK_FILE)
    assert sorted(hypernetwork.widths) == [32, 48, 64] and hypernetwork.step == 400
    for preview in (EXAMPLE_EMBEDDINGS_DIR / f"{EMBEDDING}.preview.png",
                    EXAMPLE_HYPERNETWORKS_DIR / f"{HYPERNETWORK}.preview.png"):
        assert preview.is_file()
    shipped = [p for p in EXAMPLES_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in shipped) <= 1_000_000
    # Only the files and their card pictures ship: no optimizer state, no logs.
    assert not [p for p in shipped if p.suffix not in (".pt", ".png", ".md")]


def _session(monkeypatch: pytest.MonkeyPatch, folder: Path, *args: str) -> UiSession:
    monkeypatch.chdir(folder)  # a newcomer's working folder, with no ./embeddings or ./models/hypernetworks
    return UiSession(web_ui_config(build_parser().parse_args(list(args))))


def test_the_app_lists_the_examples_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = _session(monkeypatch, tmp_path)
    ti = handlers.embedding_cards_view(session, model_label=DEFAULT_MODEL_LABEL)
    hn = handlers.hypernetwork_cards_view(session)
    # Each has its card, with its picture (inlined in the card).
    assert f'data-name="{EMBEDDING}"' in ti.cards_html and "sdconcepts-card-preview" in ti.cards_html, ti.summary
    assert f"{HYPERNETWORK}" in hn.cards_html and "sdconcepts-card-preview" in hn.cards_html, hn.summary
    assert not ti.skipped_html.count("example") and not hn.skipped_html.count("example")
    # Training and the tools write to the user's folder, never into the package.
    from sdconcepts.ui.train_handlers import embedding_names, embeddings_folder, hypernetworks_folder

    assert embeddings_folder(session) == Path("embeddings") and hypernetworks_folder(session) == Path(
        "models/hypernetworks")
    assert embedding_names(session) == []
    # --no-examples leaves them out.
    bare = _session(monkeypatch, tmp_path, "--no-examples")
    assert EMBEDDING not in handlers.embedding_cards_view(bare, model_label=DEFAULT_MODEL_LABEL).cards_html
    assert HYPERNETWORK not in handlers.hypernetwork_cards_view(bare).cards_html


def test_a_user_file_of_the_same_name_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "embeddings" / f"{EMBEDDING}.pt"
    save_embedding(Embedding(EMBEDDING, torch.ones(1, 48)), mine)
    session = _session(monkeypatch, tmp_path)
    session.embeddings.refresh()
    usable = session.embeddings.usable(48)
    assert usable[EMBEDDING].vector_count == 1
    assert load_embedding(EMBEDDING_FILE).vector_count == 4  # the shipped file is untouched


def test_the_metadata_editor_never_writes_into_the_shipped_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    session = _session(monkeypatch, tmp_path)
    handlers.embedding_cards_view(session, model_label=DEFAULT_MODEL_LABEL)
    handlers.hypernetwork_cards_view(session)
    for shipped in (EMBEDDING_FILE, HYPERNETWORK_FILE):
        form = handlers.metadata_form(session, str(shipped))  # reading is fine
        assert form.status == ""
        with pytest.raises(handlers.UiError, match="shipped example"):
            handlers.save_metadata(session, str(shipped), "mine", "Unknown", "", 0, "", "")
        assert not shipped.with_suffix(".json").exists()
    # The user's own files stay editable.
    mine = tmp_path / "embeddings" / "mine.pt"
    save_embedding(Embedding("mine", torch.ones(1, 48)), mine)
    handlers.embedding_cards_view(session, model_label=DEFAULT_MODEL_LABEL)
    listed = next(str(r.path) for r in session.embeddings.files.records() if r.name == "mine")
    assert handlers.save_metadata(session, listed, "mine", "Unknown", "", 0, "", "").startswith("Saved")
    assert mine.with_suffix(".json").is_file()


@pytest.mark.skipif(not (EMBEDDED_MODEL_DIR / "model_index.json").is_file(), reason="the embedded model is missing")
def test_a_click_on_each_example_visibly_changes_the_toy_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """What the README's "try this" promises, through the UI's own generate handler, scored by the probe."""
    from sdconcepts.toyworld.probe import classify

    session = _session(monkeypatch, tmp_path)

    def found(prompt: str) -> list[dict[str, Any]]:
        # The txt2img tab's defaults (Euler a, 20 steps, CFG 7), a fixed seed, 8 images.
        params = handlers.generation_params(prompt, "", "Euler a", 20, 7, 1, 0, 0, 8, 1)
        return classify(handlers.generate(session, DEFAULT_MODEL_LABEL, params).images)

    # A click on the embedding's card puts its word in the empty prompt: its yellow triangle on brown.
    with_word = found(EMBEDDING)
    assert sum(f["shape"] == "triangle" and f["colour"] == "yellow" for f in with_word) >= 6, with_word
    # "a circle", then a click on the hypernetwork's card adds <hypernet:example_teal:1>: backgrounds turn teal.
    plain = found("a circle")
    teal = found(f"a circle <hypernet:{HYPERNETWORK}:1>")
    count = sum(f["background"] == "teal" for f in teal)
    assert count >= 6 and count >= sum(f["background"] == "teal" for f in plain) + 4, (plain, teal)
    assert sum(f["shape"] == "circle" for f in teal) >= 6, teal
