"""The web UI's handlers with SDXL models: the dropdown lists SDXL files and folders, and generating applies SDXL
embeddings while listing single-encoder ones as skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdconcepts import Embedding, save_embedding
from sdconcepts.backends.single_file import save_single_file
from sdconcepts.ui import handlers
from sdconcepts.ui.ui_session import UiConfig, UiSession


def _sdxl_library(tiny_sdxl, tiny_sdxl_dir: Path, tmp_path: Path) -> tuple[Path, Path, torch.Generator]:  # type: ignore[no-untyped-def]
    """A models folder with the tiny SDXL as a single file (``xl.safetensors``) and a diffusers folder (``xl-folder``),
    an embeddings folder with one SDXL embedding (``xlemb``), and the generator that drew it, to draw more."""
    import shutil

    models = tmp_path / "models"
    models.mkdir()
    m = tiny_sdxl
    save_single_file({"unet": m.unet, "vae": m.vae, "text_encoder": m.text_encoder, "text_encoder_2": m.text_encoder_2},
                     models / "xl.safetensors")
    shutil.copytree(tiny_sdxl_dir, models / "xl-folder")
    embeddings = tmp_path / "embeddings"
    g = torch.Generator().manual_seed(0)
    save_embedding(Embedding("xlemb", {"clip_l": torch.randn(2, 32, generator=g) * 0.02,
                                       "clip_g": torch.randn(2, 48, generator=g) * 0.02}), embeddings / "xlemb.safetensors")
    return models, embeddings, g


def test_ui_lists_and_generates_with_sdxl_models(tiny_sdxl, tiny_sdxl_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    models, embeddings, _g = _sdxl_library(tiny_sdxl, tiny_sdxl_dir, tmp_path)
    save_embedding(Embedding("flatemb", torch.zeros(1, 80)), embeddings / "flatemb.safetensors")
    session = UiSession(UiConfig(models_dir=models, embeddings_dirs=[embeddings], outputs_dir=tmp_path / "out",
                                 device="cpu"))
    choices = session.model_choices()
    assert "xl.safetensors" in choices and "xl-folder" in choices
    assert session.context_width("xl-folder") == 80  # from both encoders' configs, nothing loaded

    def run(prompt: str) -> handlers.GenerateOutput:
        params = handlers.generation_params(prompt, "blurry", "Euler", 2, 7, 3, 64, 64, 1, 1)
        return handlers.generate(session, "xl.safetensors", params)

    plain = run("a red circle")
    used = run("a red circle xlemb")
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(used.images[0]))
    assert "TI hashes: xlemb: " in used.first_infotext.replace('"', "") and used.warnings == []
    skipped = run("a red circle flatemb")
    assert any("flatemb" in w and "SDXL" in w for w in skipped.warnings)


def test_ui_create_embedding_on_an_sdxl_model_writes_the_pair(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    from sdconcepts.embeddings.files import load_embedding
    from sdconcepts.ui import train_handlers

    session = UiSession(UiConfig(ckpt=tiny_sdxl_dir, embeddings_dirs=[tmp_path / "emb"], device="cpu"))
    path = train_handlers.create_embedding(session, str(tiny_sdxl_dir), "xlnew", "yellow triangle", 2, False)
    emb = load_embedding(path)
    assert path.suffix == ".safetensors" and emb.is_sdxl and emb.width == 80 and emb.vector_count == 2
    assert "xlnew" in train_handlers.embedding_names(session)


def test_cards_follow_the_chosen_model_kind_before_it_loads(tiny_sdxl, tiny_sdxl_dir: Path, tiny_model_dir: Path,  # type: ignore[no-untyped-def]
                                                            tmp_path: Path) -> None:
    """The Textual Inversion cards on an SDXL single file not loaded yet list SD-1 files as skipped (its safetensors
    header gives the width and the kind), and an SD-1 file as wide as the SDXL pair is skipped for its kind, as
    generation skips it; switching to an SD-1 model turns the lists around."""
    import re
    import shutil

    from sdconcepts.model_shape import read_model_shape

    models, embeddings, g = _sdxl_library(tiny_sdxl, tiny_sdxl_dir, tmp_path)
    shutil.copytree(tiny_model_dir, models / "sd1-folder")
    save_embedding(Embedding("sd1emb", torch.randn(1, 48, generator=g) * 0.02), embeddings / "sd1emb.pt")
    save_embedding(Embedding("flat80", torch.randn(1, 80, generator=g) * 0.02), embeddings / "flat80.safetensors")
    session = UiSession(UiConfig(models_dir=models, embeddings_dirs=[embeddings], outputs_dir=tmp_path / "out",
                                 device="cpu"))
    shape = read_model_shape(models / "xl.safetensors")
    assert shape is not None and shape.sdxl and shape.context_width == 80
    assert read_model_shape(models / "xl-folder").sdxl and not read_model_shape(models / "sd1-folder").sdxl  # type: ignore[union-attr]

    def listed(label: str) -> tuple[list[str], str]:
        view = handlers.embedding_cards_view(session, model_label=label)
        return re.findall(r'data-name="([^"]+)"', view.cards_html), view.skipped_html

    for label in ("xl.safetensors", "xl-folder"):
        cards, skipped = listed(label)
        assert cards == ["xlemb"], (label, cards)
        assert "sd1emb.pt</code>: width 48 does not fit the model" in skipped
        assert "flat80.safetensors</code>: a single-encoder embedding (width 80, SD 1.x/2.x) does not fit an SDXL" in skipped
    assert session.loaded_model_label() is None  # nothing was loaded to list them
    cards, skipped = listed("sd1-folder")
    assert cards == ["sd1emb"] and "xlemb.safetensors</code>: width 80 does not fit the model" in skipped
    # Loaded, the model itself answers: the same lists.
    handlers.generate(session, "xl.safetensors", handlers.generation_params("xlemb", "", "Euler", 1, 7, 1, 64, 64, 1, 1))
    assert listed("xl.safetensors")[0] == ["xlemb"]


def _learned_sdxl(tiny_sdxl_dir: Path, folder: Path) -> Path:
    """The tiny SDXL with 60 tokens 'learned' alike in both token tables (its own are random rows, between which no
    map can be fitted): clip_l's rows scaled up, clip_g's a linear image of them."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_sdxl_dir, folder)
    learned = torch.arange(1000, 1600, 10)
    rows = None
    for encoder in ("text_encoder", "text_encoder_2"):
        path = folder / encoder / "model.safetensors"
        weights = load_file(str(path))
        key = next(k for k in weights if k.endswith("embeddings.token_embedding.weight"))
        table = weights[key]
        if rows is None:
            table[learned] *= 5
            rows = table[learned].clone()
        else:
            table[learned] = rows @ (torch.randn(32, 48, generator=torch.Generator().manual_seed(0)) * 0.3)
        save_file(weights, str(path))
    return folder


def test_sd1_embedding_converted_for_sdxl_from_card_tools_and_on_the_fly(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    import html
    import re

    from sdconcepts.embeddings.files import load_embedding
    from sdconcepts.generation import parse_infotext
    from sdconcepts.ui import embedding_tools_handlers
    from sdconcepts.ui.ui_session import UiError

    model = _learned_sdxl(tiny_sdxl_dir, tmp_path / "xl")
    embeddings = tmp_path / "embeddings"
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 0.1  # as wide as the SDXL's clip_l
    save_embedding(Embedding("oldword", vectors), embeddings / "oldword.pt")
    session = UiSession(UiConfig(ckpt=model, embeddings_dirs=[embeddings], device="cpu",
                                 hash_cache=tmp_path / "cache" / "hashes.json"))
    label = str(model)
    # The skipped card offers the conversion (the button carries the file for javascript/sdconcepts.js).
    view = handlers.embedding_cards_view(session, model_label=label)
    assert "oldword" in view.skipped_html and "sdconcepts-skipped-convert" in view.skipped_html
    assert re.search(r'data-path="([^"]+)"', view.skipped_html)[1] == html.escape(str(embeddings / "oldword.pt"))  # type: ignore[index]

    def run(prompt: str) -> handlers.GenerateOutput:
        return handlers.generate(session, label, handlers.generation_params(prompt, "", "DDIM", 2, 5, 3, 64, 64, 1, 1))

    skipped = run("a oldword")
    assert any("oldword" in w and "skipped" in w for w in skipped.warnings)
    session.convert_sd1_on_sdxl = True  # the setting (off by default)
    converted_run = run("a oldword")
    assert converted_run.warnings == []
    fields = parse_infotext(converted_run.first_infotext)[2]
    assert fields["TI converted"] == "oldword (SD 1.x -> SDXL)" and "oldword" in fields["TI hashes"]
    assert not np.array_equal(np.asarray(skipped.images[0]), np.asarray(converted_run.images[0]))
    assert list((tmp_path / "cache" / "token-maps").glob("*.safetensors"))  # the fitted map, cached
    # The tools panel's convert (what the card's button clicks): clip_l is the original vectors exactly.
    path = embedding_tools_handlers.convert_embedding(session, label, str(embeddings / "oldword.pt"))
    written = load_embedding(path)
    assert path.name == "oldword_xl.safetensors" and written.is_sdxl
    assert torch.equal(written.vectors["clip_l"], vectors)  # type: ignore[index]
    assert "oldword_xl" in handlers.embedding_cards_view(session, model_label=label).cards_html
    session.convert_sd1_on_sdxl = False
    from_file = run("a oldword_xl")
    assert np.array_equal(np.asarray(from_file.images[0]), np.asarray(converted_run.images[0]))
    with pytest.raises(UiError, match="already an SDXL embedding"):
        embedding_tools_handlers.convert_embedding(session, label, "oldword_xl", "again")
    with pytest.raises(UiError, match="already exists"):
        embedding_tools_handlers.convert_embedding(session, label, "oldword")
