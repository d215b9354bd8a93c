"""SDXL embeddings (clip_l + clip_g) applied on a tiny SDXL: each encoder places its own half, as diffusers'
load_textual_inversion into each encoder does; kinds that cannot apply are listed as skipped with the reason."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closeness import assert_outputs_close  # noqa: E402

from sdconcepts import Embedding, load_embedding, save_embedding  # noqa: E402
from sdconcepts.backends.prompt_encoder import PromptEncoder  # noqa: E402
from sdconcepts.backends.sampling import make_scheduler, txt2img  # noqa: E402
from sdconcepts.embeddings.library import (
    EmbeddingLibrary,  # noqa: E402
    usable_embeddings,  # noqa: E402
)
from sdconcepts.generation import GenerationParams, parse_infotext  # noqa: E402


def _sdxl_embedding(name: str, n: int, seed: int = 0) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    # The tiny encoders' token embeddings have std 0.02; vectors of that scale keep them in their usual range.
    return Embedding(name, {"clip_l": torch.randn(n, 32, generator=g) * 0.02, "clip_g": torch.randn(n, 48, generator=g) * 0.02})


@pytest.mark.parametrize("vectors", [1, 2])
def test_sdxl_embedding_equals_diffusers_load_textual_inversion(tiny_sdxl, tmp_path: Path, vectors: int) -> None:
    from diffusers import StableDiffusionXLPipeline

    path = save_embedding(_sdxl_embedding("zqxemb", vectors), tmp_path / "zqxemb.safetensors")
    emb = load_embedding(path)
    assert emb.is_sdxl and emb.width == 80
    m = tiny_sdxl
    # load_textual_inversion grows the tokenizers and the embedding tables: give it its own copies.
    pipe = StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=copy.deepcopy(m.text_encoder), text_encoder_2=copy.deepcopy(m.text_encoder_2),
        tokenizer=copy.deepcopy(m.tokenizer), tokenizer_2=copy.deepcopy(m.tokenizer_2), unet=m.unet,
        scheduler=make_scheduler(m, "DDIM"),
    )
    vectors_of = emb.vectors
    assert isinstance(vectors_of, dict) or hasattr(vectors_of, "keys")
    pipe.load_textual_inversion(vectors_of["clip_l"], token="zqxemb", text_encoder=pipe.text_encoder,  # type: ignore[index]
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors_of["clip_g"], token="zqxemb", text_encoder=pipe.text_encoder_2,  # type: ignore[index]
                                tokenizer=pipe.tokenizer_2)
    prompt = "a photo of zqxemb on a table"
    with torch.no_grad():
        theirs, _, pooled, _ = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    encoder = PromptEncoder(m, {emb.name: emb.joined()})
    ours = encoder.encode(prompt)
    assert_outputs_close(ours, theirs[0])
    assert_outputs_close(encoder.pooled(prompt), pooled[0])
    plain = PromptEncoder(m).encode(prompt)
    # Both halves matter: each encoder's columns change.
    assert not torch.allclose(ours[:, :32], plain[:, :32], atol=1e-4)
    assert not torch.allclose(ours[:, 32:], plain[:, 32:], atol=1e-4)


def test_sdxl_embedding_in_emphasis_editing_negative_and_chunks(tiny_sdxl, tmp_path: Path) -> None:
    emb = _sdxl_embedding("zqxemb", 3, seed=1)
    encoder = PromptEncoder(tiny_sdxl, {"zqxemb": emb.joined()})
    # Never split across chunks: 73 words then a 3-vector embedding starts the next chunk.
    chunks, _ = encoder.chunks("a " * 73 + "zqxemb")
    assert len(chunks) == 2 and not chunks[0].fixes and [f.offset for f in chunks[1].fixes] == [0]
    # Inside emphasis: the weight lands on the embedding's positions, per encoder.
    plain = encoder.encode("zqxemb")
    weighted = encoder.encode("(zqxemb:1.3)")
    for lo, hi in ((0, 32), (32, 80)):
        expected = plain[:, lo:hi].clone()
        expected[1:4] *= 1.3
        expected *= plain[:, lo:hi].mean() / expected.mean()
        assert_outputs_close(weighted[:, lo:hi], expected)

    path = save_embedding(emb, tmp_path / "zqxemb.safetensors")
    saved = load_embedding(path)
    assert saved.hash
    params = GenerationParams(prompt="a [cube:zqxemb:2] on grass", negative_prompt="zqxemb, blurry", steps=3,
                              cfg_scale=5.0, seed=5, width=64, height=64, sampler="DDIM")
    result = txt2img(tiny_sdxl, params, embeddings={"zqxemb": saved.joined()},
                     embedding_hashes={"zqxemb": saved.hash})
    info = parse_infotext(result.infotexts[0])[2]
    short = saved.hash[:12]
    assert info["TI hashes"] == f"zqxemb: {short}, zqxemb: {short}"  # positive (edited in at step 2), then negative


def test_embedding_kinds_that_cannot_apply_are_skipped_with_the_reason(tiny_sdxl, tiny_model, tmp_path: Path) -> None:
    save_embedding(_sdxl_embedding("xlemb", 1), tmp_path / "xlemb.safetensors")
    # A single-encoder embedding exactly as wide as the tiny SDXL's context: only its kind tells it apart.
    save_embedding(Embedding("flatemb", torch.zeros(1, 80)), tmp_path / "flatemb.safetensors")
    # An SDXL pair as wide as the tiny SD-1 model's context (48 = 16 + 32).
    save_embedding(Embedding("smallxl", {"clip_l": torch.zeros(1, 16), "clip_g": torch.zeros(1, 32)}),
                   tmp_path / "smallxl.safetensors")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    usable, skipped = usable_embeddings(library, tiny_sdxl.context_width, sdxl=True)
    assert set(usable) == {"xlemb"}
    assert "SD 1.x/2.x" in skipped["flatemb"] and "SDXL" in skipped["flatemb"]
    assert "width" in skipped["smallxl"]
    usable, skipped = usable_embeddings(library, tiny_model.context_width, sdxl=False)
    assert usable == {}
    assert skipped["smallxl"] == "an SDXL embedding (clip_l + clip_g) needs an SDXL model"
    assert "width" in skipped["xlemb"] and "width" in skipped["flatemb"]
    # A prompt naming a skipped one gets a warning, and the prompt reads the name as words.
    params = GenerationParams(prompt="a flatemb", steps=2, seed=1, width=64, height=64, sampler="DDIM")
    result = txt2img(tiny_sdxl, params, skipped_embeddings=skipped_of(library, tiny_sdxl))
    assert any("flatemb" in w and "SDXL" in w for w in result.warnings)


def skipped_of(library: EmbeddingLibrary, model) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return usable_embeddings(library, model.context_width, sdxl=model.is_sdxl)[1]


def test_sdxl_pair_with_swapped_halves_is_skipped_not_split_across_encoders(tiny_sdxl, tmp_path: Path) -> None:
    # The tiny SDXL's clip_l is 32 wide and clip_g 48: a pair of 48 + 32 has the right total, the wrong halves.
    save_embedding(Embedding("swapped", {"clip_l": torch.ones(1, 48), "clip_g": torch.ones(1, 32)}),
                   tmp_path / "swapped.safetensors")
    save_embedding(_sdxl_embedding("rightway", 1), tmp_path / "rightway.safetensors")
    library = EmbeddingLibrary([tmp_path])
    library.refresh()
    assert tiny_sdxl.encoder_widths == (32, 48)
    usable, skipped = usable_embeddings(library, tiny_sdxl.context_width, sdxl=True,
                                        encoder_widths=tiny_sdxl.encoder_widths)
    assert set(usable) == {"rightway"}
    assert skipped["swapped"] == ("its halves are clip_l 48 and clip_g 32 wide, the model's encoders 32 and 48 "
                                  "(the halves are swapped)")
    params = GenerationParams(prompt="a swapped", steps=2, seed=1, width=64, height=64, sampler="DDIM")
    result = txt2img(tiny_sdxl, params, skipped_embeddings=skipped)
    assert any("swapped" in w and "halves" in w for w in result.warnings)
