"""Embeddings bundled in LoRA files (A1111's bundle_emb keys): read with A1111 1.10's grouping, words while their
LoRA is in the prompt, a folder embedding of the same name winning, extractable to a standalone file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sdconcepts.cli import main
from sdconcepts.embeddings.bundles import bundled_for_prompt, find_lora_files, read_bundled_embeddings
from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.files import EmbeddingFileError, file_sha256, load_embedding, save_embedding
from sdconcepts.generation import parse_infotext
from sdconcepts.images import read_infotext


def _lora(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoRA file as OneTrainer writes one: LoRA weights, plus embeddings in each layout A1111's networks.py reads."""
    g = torch.Generator().manual_seed(seed)
    nan = torch.zeros(1, 48)
    nan[0, 0] = float("nan")
    tensors = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 32, generator=g),
        "bundle_emb.zqxone.string_to_param.*": torch.randn(2, 48, generator=g) * 0.02,
        "bundle_emb.zqxpair.clip_l": torch.randn(1, 32, generator=g) * 0.02,
        "bundle_emb.zqxpair.clip_g": torch.randn(1, 48, generator=g) * 0.02,
        "bundle_emb.zqxflat.emb_params": torch.randn(3, 48, generator=g) * 0.02,
        "bundle_emb.zqxnan.string_to_param.*": nan,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return tensors


def test_bundles_are_read_with_a1111s_grouping(tmp_path: Path) -> None:
    tensors = _lora(tmp_path / "style.safetensors")
    found, skipped = read_bundled_embeddings(tmp_path / "style.safetensors")
    assert set(found) == {"zqxone", "zqxpair", "zqxflat"}
    assert torch.equal(found["zqxone"].embedding.tensor(), tensors["bundle_emb.zqxone.string_to_param.*"])
    pair = found["zqxpair"].embedding
    assert pair.is_sdxl and torch.equal(pair.vectors["clip_g"], tensors["bundle_emb.zqxpair.clip_g"])  # type: ignore[index]
    assert found["zqxflat"].embedding.vector_count == 3 and found["zqxflat"].where == "in style.safetensors"
    assert "NaN" in skipped["zqxnan"] and "style.safetensors" in skipped["zqxnan"]
    # The LoRA's hash is the bundled embedding's (A1111's BundledTIHash): the infotext names the file.
    assert found["zqxone"].embedding.hash == found["zqxflat"].embedding.hash and found["zqxone"].embedding.hash


def test_pickles_and_foreign_files_are_one_line_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    payload = (b"\x80\x04\x95" + b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    (tmp_path / "evil.pt").write_bytes(payload)
    with pytest.raises(EmbeddingFileError, match="never unpickled"):
        read_bundled_embeddings(tmp_path / "evil.pt")
    (tmp_path / "fake.safetensors").write_bytes(b"PK\x03\x04 not safetensors at all")
    with pytest.raises(EmbeddingFileError, match="fake.safetensors"):
        read_bundled_embeddings(tmp_path / "fake.safetensors")
    assert not marker.exists()


def test_a_bundle_is_a_word_while_its_lora_is_in_the_prompt_and_the_folder_wins(tmp_path: Path) -> None:
    _lora(tmp_path / "loras" / "style.safetensors")
    files = find_lora_files([tmp_path / "loras"])
    assert set(files) == {"style"}
    usable, skipped = bundled_for_prompt("a zqxone", files, {}, width=48, sdxl=False)
    assert usable == {} and skipped == {}  # no <lora:style> tag: nothing is registered
    usable, skipped = bundled_for_prompt("a zqxone <lora:style:0.7>", files, {"ZQXFLAT": None}, width=48, sdxl=False)
    assert set(usable) == {"zqxone"}  # zqxflat: the folder's word wins (A1111 skips the bundle)
    assert "NaN" in skipped["zqxnan"]
    assert skipped["zqxpair"] == "bundled in style.safetensors: an SDXL embedding (clip_l + clip_g) needs an SDXL model"
    usable, skipped = bundled_for_prompt("<lora:style:1>", files, {}, width=80, sdxl=True, encoder_widths=(32, 48))
    assert set(usable) == {"zqxpair"} and "does not fit an SDXL model" in skipped["zqxone"]


def test_cli_generate_uses_a_bundle_only_with_its_lora_and_extract_writes_it(
        tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = _lora(tmp_path / "loras" / "style.safetensors")
    common = ["--ckpt", str(tiny_model_dir), "--steps", "2", "--sampler", "DDIM", "--seed", "3",
              "--lora-dir", str(tmp_path / "loras")]

    def infotext(prompt: str, out: str) -> dict[str, Any]:
        assert main(["generate", "--prompt", prompt, "--output", str(tmp_path / out), *common]) == 0
        return parse_infotext(read_infotext(tmp_path / out) or "")[2]

    with_lora = infotext("a zqxone <lora:style:1>", "a.png")
    assert re.fullmatch(r"zqxone: [0-9a-f]{12}", with_lora["TI hashes"])
    assert "TI hashes" not in infotext("a zqxone", "b.png")
    capsys.readouterr()
    # Extraction: listed, then written as a standalone embedding with the bundled vectors.
    folder = tmp_path / "embeddings"
    assert main(["embedding", "extract", str(tmp_path / "loras" / "style.safetensors"), "--out-dir", str(folder)]) == 0
    listing = capsys.readouterr().out
    assert "zqxone: 2 vectors, width 48" in listing and "zqxpair: 1 vectors, SDXL pair" in listing
    assert "zqxnan: skipped" in listing
    assert main(["embedding", "extract", str(tmp_path / "loras" / "style.safetensors"), "zqxone",
                 "--out-dir", str(folder)]) == 0
    assert torch.equal(load_embedding(folder / "zqxone.pt").tensor(), tensors["bundle_emb.zqxone.string_to_param.*"])
    assert main(["embedding", "extract", str(tmp_path / "loras" / "style.safetensors"), "zqxpair",
                 "--out-dir", str(folder)]) == 0
    assert load_embedding(folder / "zqxpair.safetensors").is_sdxl
    capsys.readouterr()
    assert main(["embedding", "extract", str(tmp_path / "loras" / "style.safetensors"), "zqxnan",
                 "--out-dir", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "is skipped" in err and "NaN" in err and err.count("\n") == 0
    # A folder embedding of the same name wins over the bundle in a prompt (A1111's precedence).
    own = tmp_path / "own"
    save_embedding(Embedding("zqxone", torch.zeros(1, 48)), own / "zqxone.pt")
    common += ["--embeddings-dir", str(own)]
    fields = infotext("a zqxone <lora:style:1>", "c.png")
    assert fields["TI hashes"] == f"zqxone: {file_sha256(own / 'zqxone.pt')[:12]}" != with_lora["TI hashes"]


def test_web_ui_lists_bundles_as_cards_and_generates_with_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    from sdconcepts.ui import handlers
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    _lora(tmp_path / "loras" / "style.safetensors")
    session = UiSession(UiConfig(ckpt=tiny_model_dir, embeddings_dirs=[tmp_path / "embeddings"], device="cpu",
                                 lora_dirs=[tmp_path / "loras"]))
    label = str(tiny_model_dir)
    view = handlers.embedding_cards_view(session, model_label=label)
    assert "in style.safetensors" in view.cards_html and 'data-prompt="&lt;lora:style:1&gt; zqxone"' in view.cards_html
    assert "zqxflat" in view.cards_html and "zqxpair" not in view.cards_html
    assert "needs an SDXL model" in view.skipped_html and "NaN" in view.skipped_html
    params = handlers.generation_params("<lora:style:1> zqxone", "", "DDIM", 2, 5, 3, 64, 64, 1, 1)
    out = handlers.generate(session, label, params)
    assert re.search(r"TI hashes: \"?zqxone: [0-9a-f]{12}", out.first_infotext)
