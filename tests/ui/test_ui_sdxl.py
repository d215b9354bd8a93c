"""The web UI's handlers with SDXL models: the dropdown lists SDXL files and folders, and generating applies SDXL
embeddings while listing single-encoder ones as skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
