"""Embeddings applied A1111's way on a tiny real model: equal to diffusers' load_textual_inversion where both apply,
and A1111's extras beyond it (ordinary-word names, chunk rules, emphasis, negative prompts, prompt editing,
TI hashes in the infotext)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sdconcepts import Embedding, load_embedding, save_embedding
from sdconcepts.backends.prompt_encoder import PromptEncoder
from sdconcepts.backends.sampling import txt2img
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.generation import GenerationParams, parse_infotext

WIDTH = 48


def _vectors(n: int, seed: int = 0) -> torch.Tensor:
    # The tiny model's token embeddings have std 0.02; vectors of that scale keep the encoder in its usual range.
    return torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(seed)) * 0.02


def _pipeline(model):  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    # load_textual_inversion grows the tokenizer and the embedding table: give it its own copies.
    return StableDiffusionPipeline(
        unet=model.unet, vae=model.vae, text_encoder=copy.deepcopy(model.text_encoder),
        tokenizer=copy.deepcopy(model.tokenizer), scheduler=DDIMScheduler.from_config(model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.mark.parametrize(("suffix", "vectors"), [(".safetensors", 1), (".safetensors", 3), (".pt", 2)])
def test_equal_to_diffusers_load_textual_inversion(tiny_model, tmp_path: Path, suffix: str, vectors: int) -> None:  # type: ignore[no-untyped-def]
    path = save_embedding(Embedding("zqxemb", _vectors(vectors)), tmp_path / f"zqxemb{suffix}")
    pipe = _pipeline(tiny_model)
    # Our safetensors key is the name, so diffusers needs no token=; for A1111's .pt it takes the stored name.
    pipe.load_textual_inversion(str(path))
    prompt = "a photo of zqxemb on a table"
    theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    emb = load_embedding(path)
    ours = PromptEncoder(tiny_model, {emb.name: emb.tensor()}).encode(prompt)
    torch.testing.assert_close(ours, theirs[0], rtol=1e-5, atol=1e-5)
    plain = PromptEncoder(tiny_model).encode(prompt)
    assert not torch.allclose(ours, plain, atol=1e-4)  # the comparison would notice a missing embedding


def test_multi_vector_takes_n_positions_and_never_straddles_chunks(tiny_model) -> None:  # type: ignore[no-untyped-def]
    enc = PromptEncoder(tiny_model, {"trio": _vectors(3)})
    chunks, count = enc.chunks("a trio b")
    assert [f.offset for f in chunks[0].fixes] == [1] and chunks[0].tokens[2:5] == (0, 0, 0) and count == 5
    # 73 words then a 3-vector embedding: it does not fit the 75-token chunk, so it starts the next one.
    prompt = "a " * 73 + "trio"
    chunks, _ = enc.chunks(prompt)
    assert len(chunks) == 2 and not chunks[0].fixes and [f.offset for f in chunks[1].fixes] == [0]
    out = enc.encode(prompt)
    assert out.shape == (154, WIDTH)
    # The vectors are in the second chunk: its rows 1-3 equal an encoding of the embedding alone.
    torch.testing.assert_close(out[77:], enc.encode("trio"), rtol=1e-5, atol=1e-6)


def test_ordinary_word_name_from_a_file_still_works(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_embedding(Embedding("cat", _vectors(2, seed=4)), tmp_path / "cat.pt")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    usable = library.usable(tiny_model.context_width)
    enc = PromptEncoder(tiny_model, {name: e.tensor() for name, e in usable.items()})
    assert enc.embeddings_in(["a photo of a Cat"]) == ["cat"]  # case-insensitive, though "cat" is in the vocabulary
    assert not torch.allclose(enc.encode("a photo of a cat"), PromptEncoder(tiny_model).encode("a photo of a cat"))
    assert enc.embeddings_in(["a photo of a category"]) == []  # a different token inside a longer word


def test_emphasis_scales_the_embedding_outputs(tiny_model) -> None:  # type: ignore[no-untyped-def]
    enc = PromptEncoder(tiny_model, {"duo": _vectors(2, seed=2)}, emphasis="No norm")
    plain = enc.encode("a duo")
    weighted = enc.encode("a (duo:1.5)")
    torch.testing.assert_close(weighted[2:4], plain[2:4] * 1.5)
    torch.testing.assert_close(weighted[1], plain[1])


def test_negative_prompt_prompt_editing_and_ti_hashes(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_embedding(Embedding("glow", _vectors(2, seed=5)), tmp_path / "glow.safetensors")
    save_embedding(Embedding("dark", _vectors(1, seed=6)), tmp_path / "dark.pt")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    usable = library.usable(WIDTH)
    kwargs = {
        "embeddings": {name: e.tensor() for name, e in usable.items()},
        "embedding_hashes": {name: e.hash or "" for name, e in usable.items()},
    }
    base = GenerationParams(prompt="a red circle, [square:glow:0.5]", negative_prompt="dark", steps=2, seed=3,
                            sampler="DDIM")
    result = txt2img(tiny_model, base, **kwargs)
    _, _, fields = parse_infotext(result.infotexts[0])
    assert fields["TI hashes"] == f"glow: {usable['glow'].short_hash}, dark: {usable['dark'].short_hash}"
    # Without the embeddings the same request gives another picture: both were applied.
    plain = txt2img(tiny_model, base)
    assert "TI hashes" not in parse_infotext(plain.infotexts[0])[2]
    assert result.images[0].tobytes() != plain.images[0].tobytes()
    only_negative = txt2img(tiny_model, GenerationParams(**{**base.__dict__, "prompt": "a red circle", "steps": 1}),
                            **kwargs)
    assert parse_infotext(only_negative.infotexts[0])[2]["TI hashes"] == f"dark: {usable['dark'].short_hash}"


def test_prompt_naming_a_skipped_embedding_warns(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    save_embedding(Embedding("bigone", torch.randn(1, 1024)), tmp_path / "bigone.pt")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    skipped = library.skipped(WIDTH)
    params = GenerationParams(prompt="a BigOne circle", steps=1, seed=1)
    result = txt2img(tiny_model, params, skipped_embeddings=skipped)
    assert any("'bigone' was skipped" in w and "1024 (SD 2.x)" in w for w in result.warnings), result.warnings
    quiet = txt2img(tiny_model, GenerationParams(prompt="a bigones circle", steps=1, seed=1), skipped_embeddings=skipped)
    assert not quiet.warnings


def test_cli_generate_with_embeddings_dir(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sdconcepts.cli import main
    from sdconcepts.images import read_infotext

    folder = tmp_path / "embs"
    save_embedding(Embedding("glow", _vectors(2, seed=5)), folder / "nested" / "glow.pt")
    save_embedding(Embedding("wide", torch.randn(1, 768)), folder / "wide.safetensors")
    out = tmp_path / "out.png"
    code = main(["generate", "--ckpt", str(tiny_model_dir), "--prompt", "a glow, Wide", "--steps", "1", "--seed", "2",
                 "--cfg-scale", "1", "--embeddings-dir", str(folder), "--output", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "1 embedding file(s) skipped" in err and "'wide' was skipped" in err
    fields = parse_infotext(read_infotext(out) or "")[2]
    assert fields["TI hashes"] == f"glow: {load_embedding(folder / 'nested' / 'glow.pt').short_hash}"
