"""Bundled embeddings registered in a host's embedding database (``sdconcepts.host.bundles``), against a stand-in that
keeps the contract of Forge's ``backend/text_processing/textual_inversion.py`` (``EmbeddingDatabase.word_embeddings``,
``expected_shape``, ``register_embedding_by_name(embedding or None, name)``; ``create_embedding_from_data`` beside
it). The real Forge, reForge and Forge-Classic run the same code in tests/hosts/test_*bundles*; here the rules at
no cost: A1111's precedence, what does not fit, pickles never read, the words removed again."""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sdconcepts.host import bundles

DATABASE = """
class Embedding:
    def __init__(self, vec, name):
        self.vec, self.name = vec, name


class EmbeddingDatabase:
    def __init__(self, expected_shape):
        self.word_embeddings = {}
        self.expected_shape = expected_shape

    def register_embedding_by_name(self, embedding, name):
        if embedding is None:
            self.word_embeddings.pop(name, None)
        else:
            self.word_embeddings[name] = embedding


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if "string_to_param" in data:
        vec = next(iter(data["string_to_param"].values()))
        shape = vec.shape[-1]
    else:
        vec = dict(data)
        shape = data["clip_l"].shape[-1] + data["clip_g"].shape[-1]
    embedding = Embedding(vec, name)
    embedding.shape = shape
    return embedding
"""


@pytest.fixture()
def host(tmp_path: Path) -> Iterator[ModuleType]:
    """The stand-in database module, and ``modules.shared`` with A1111's two infotext settings on."""
    package = tmp_path / "host_modules"
    (package / "modules").mkdir(parents=True)
    (package / "modules" / "__init__.py").write_text("")
    (package / "modules" / "shared.py").write_text(
        textwrap.dedent("""
        from types import SimpleNamespace
        opts = SimpleNamespace(lora_bundled_ti_to_infotext=True, textual_inversion_add_hashes_to_infotext=True)
    """)
    )
    (package / "stand_in_ti.py").write_text(DATABASE)
    sys.path.insert(0, str(package))
    try:
        import stand_in_ti

        yield stand_in_ti
    finally:
        sys.path.remove(str(package))
        for name in [n for n in sys.modules if n in ("modules", "stand_in_ti") or n.startswith("modules.")]:
            del sys.modules[name]


def _model(ti: ModuleType, folder_words: dict[str, Any]) -> Any:
    """A loaded model as Forge holds one: a text engine whose ``embeddings`` is the database (the folder's words in)."""
    db = ti.EmbeddingDatabase(expected_shape=768)
    db.word_embeddings.update(folder_words)
    engine = type("Engine", (), {})()
    engine.embeddings = db
    model = type("Model", (), {})()
    model.text_processing_engine = engine
    return model


def test_bundled_words_follow_a1111s_rules_and_leave_after_the_pass(
    host: ModuleType, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = torch.Generator().manual_seed(0)
    word = torch.randn(2, 768, generator=g)
    lora = tmp_path / "Lora" / "style.safetensors"
    lora.parent.mkdir()
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=g),
            "bundle_emb.zqxword.string_to_param.*": word,
            "bundle_emb.zqxtaken.string_to_param.*": torch.randn(1, 768, generator=g),
            "bundle_emb.zqxpair.clip_l": torch.randn(1, 768, generator=g),  # SDXL: fits no SD 1.5 model
            "bundle_emb.zqxpair.clip_g": torch.randn(1, 1280, generator=g),
        },
        str(lora),
    )
    marker = tmp_path / "unpickled"
    pickle = tmp_path / "Lora" / "old.pt"  # a pickle LoRA whose loading would run a command: never opened
    pickle.write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    folder_word = object()
    model = _model(host, {"zqxtaken": folder_word})
    db = model.text_processing_engine.embeddings
    words = bundles.BundleWords()

    with caplog.at_level(logging.WARNING, logger="sdconcepts.host.bundles"):
        for _ in range(2):  # Forge activates once per batch: each pass replaces the previous one's words
            registered = words.register(model, [("style", lora, False), ("old", pickle, False)])
    assert registered == ["zqxword"]
    assert torch.equal(db.word_embeddings["zqxword"].vec, word)
    assert db.word_embeddings["zqxword"].shorthash == "style"  # A1111's BundledTIHash: the LoRA's name
    assert db.word_embeddings["zqxtaken"] is folder_word  # the embeddings folder wins
    assert not marker.exists()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # each said once over both passes
    assert any("zqxtaken" in line and "already loaded" in line for line in lines)
    assert any("zqxpair" in line and "width 2048 does not fit this model's 768" in line for line in lines)
    assert words.infotext_hashes(["zqxword", "zqxtaken"]) == ["zqxword: style"]

    words.remove_all()  # deactivate
    assert set(db.word_embeddings) == {"zqxtaken"} and db.word_embeddings["zqxtaken"] is folder_word
    # A LoRA whose bundles the host loaded itself (A1111's Network.bundle_embeddings) is left to the host.
    assert words.register(model, [("style", lora, True)]) == []
