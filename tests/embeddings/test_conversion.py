"""SD 1.x -> SDXL conversion (embeddings.conversion): the map between token tables, which tokens it is fitted on,
the exact clip_l copy when the tables are the same, the cache, and the written file."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closeness import assert_outputs_close  # noqa: E402

from sdconcepts import Embedding, load_embedding, save_embedding  # noqa: E402
from sdconcepts.embeddings import conversion  # noqa: E402
from sdconcepts.embeddings.conversion import (  # noqa: E402
    ConversionError,
    MapCache,
    convert_embedding,
    fit_token_map,
    learned_tokens,
    nearest_token_vectors,
)

VOCAB = 1000


def _trained_pair(seed: int = 0, noise: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two 'trained' tables (norms spread, no untrained bulk) related by y = x A + b + noise."""
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(VOCAB, 16, generator=g) * torch.rand(VOCAB, 1, generator=g).mul(2).add(0.2)
    a, b = torch.randn(16, 24, generator=g) * 0.3, torch.randn(24, generator=g) * 0.1
    return source, source @ a + b + noise * torch.randn(VOCAB, 24, generator=g), a, b


def _untrained_with_learned(width: int, learned: torch.Tensor, seed: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """A small model's table: Gaussian initial rows (std 0.02) except ``learned`` ids, which hold ``rows``."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, width, generator=g) * 0.02
    table[learned] = rows if rows is not None else torch.randn(len(learned), width, generator=g) * 0.08
    return table


def test_fitted_map_recovers_the_relation_between_trained_tables() -> None:
    source, target, a, b = _trained_pair()
    token_map = fit_token_map(source, target)
    assert not token_map.identity and token_map.tokens == VOCAB  # a trained table: every token is used
    assert token_map.heldout_cosine > 0.99
    probe = torch.randn(3, 16, generator=torch.Generator().manual_seed(9)) * 2  # a vector away from any token
    torch.testing.assert_close(token_map.apply(probe), probe @ a + b, rtol=0.05, atol=0.02)


def test_same_table_gives_the_vectors_exactly() -> None:
    source, target, _, _ = _trained_pair()
    vectors = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    converted = convert_embedding(Embedding("w", vectors), source, source.clone(), target, MapCache(None))
    pair = converted.vectors
    assert converted.is_sdxl and torch.equal(pair["clip_l"], vectors)  # type: ignore[index]
    assert pair["clip_g"].shape == (4, 24)  # type: ignore[index]
    assert fit_token_map(source, source).identity


def test_small_models_are_fitted_on_the_tokens_both_learned() -> None:
    learned = torch.arange(100, 400, 5)  # 60 tokens the small models learned
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 24, generator=g) * 0.5
    source = _untrained_with_learned(16, learned, 2)
    target = _untrained_with_learned(24, learned, 3, rows=source[learned] @ a)
    assert torch.equal(learned_tokens(source), learned)  # type: ignore[arg-type]
    assert learned_tokens(_trained_pair()[0]) is None
    token_map = fit_token_map(source, target)
    assert token_map.tokens == len(learned) and token_map.heldout_cosine > 0.9
    # Fitted on every token instead, the 940 random rows would shrink the map towards zero.
    probe = source[learned[:5]]
    cosine = torch.nn.functional.cosine_similarity(token_map.apply(probe), probe @ a, dim=1)
    assert float(cosine.min()) > 0.9, cosine


def test_too_few_shared_learned_tokens_is_one_line() -> None:
    source = _untrained_with_learned(16, torch.arange(10), 2)
    target = _untrained_with_learned(24, torch.arange(10), 3)
    with pytest.raises(ConversionError, match="share only 10 learned tokens"):
        fit_token_map(source, target)
    with pytest.raises(ConversionError, match="one vocabulary"):
        fit_token_map(source, target[:100])


def test_already_sdxl_is_refused() -> None:
    source, target, _, _ = _trained_pair()
    pair = Embedding("p", {"clip_l": torch.zeros(1, 16), "clip_g": torch.zeros(1, 24)})
    with pytest.raises(ConversionError, match="already an SDXL embedding"):
        convert_embedding(pair, source, source, target, MapCache(None))


def test_maps_are_cached_per_pair_of_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, target, _, _ = _trained_pair()
    first = MapCache(tmp_path).get(source, target)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1

    def no_fit(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the cached map should have been read")

    monkeypatch.setattr(conversion, "fit_token_map", no_fit)
    again = MapCache(tmp_path).get(source, target)
    assert torch.equal(again.weight, first.weight) and again.tokens == first.tokens
    monkeypatch.undo()
    files[0].write_bytes(b"not safetensors")  # a damaged cache file is fitted again
    assert torch.allclose(MapCache(tmp_path).get(source, target).weight, first.weight)
    other = _trained_pair(seed=5)[1]
    cache = MapCache(tmp_path)
    cache.get(source, other)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    other[3] += 1.0  # the same tensor changed in place (a fine-tuned table): its hash is taken again, a new map
    cache.get(source, other)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_nearest_token_takes_the_target_rows_of_the_nearest_source_token() -> None:
    source, target, _, _ = _trained_pair()
    vectors = source[[7, 42]] * 1.5
    out = nearest_token_vectors(vectors, source, {"clip_g": target})
    assert torch.equal(out["clip_g"], target[[7, 42]])


def test_converted_file_is_clip_l_clip_g_safetensors_diffusers_reads(tiny_sdxl, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from sdconcepts.backends.prompt_encoder import PromptEncoder
    from sdconcepts.backends.sampling import make_scheduler

    m = tiny_sdxl
    # The tiny SDXL's tables are random; 60 tokens "learned" alike in both make a map to fit (clip_l is copied).
    learned = torch.arange(1000, 1600, 10)
    clip_l = m.text_encoder.get_input_embeddings().weight.detach().clone()
    clip_l[learned] *= 5
    clip_g = m.text_encoder_2.get_input_embeddings().weight.detach().clone()
    clip_g[learned] = clip_l[learned] @ (torch.randn(32, 48, generator=torch.Generator().manual_seed(0)) * 0.3)
    vectors = clip_l[learned[:2]] * 0.9
    converted = convert_embedding(Embedding("zqxconv", vectors), clip_l, clip_l, clip_g, MapCache(None))
    path = save_embedding(converted, tmp_path / "zqxconv.safetensors")
    data = load_file(str(path))
    assert set(data) == {"clip_l", "clip_g"} and torch.equal(data["clip_l"], vectors)
    emb = load_embedding(path)
    # diffusers' SDXL recipe: each half into its own encoder (copies: it grows the tokenizers and tables).
    pipe = StableDiffusionXLPipeline(
        vae=m.vae, text_encoder=copy.deepcopy(m.text_encoder), text_encoder_2=copy.deepcopy(m.text_encoder_2),
        tokenizer=copy.deepcopy(m.tokenizer), tokenizer_2=copy.deepcopy(m.tokenizer_2), unet=m.unet,
        scheduler=make_scheduler(m, "DDIM"),
    )
    pipe.load_textual_inversion(data["clip_l"], token="zqxconv", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(data["clip_g"], token="zqxconv", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    with torch.no_grad():
        theirs = pipe.encode_prompt("a zqxconv", device="cpu", num_images_per_prompt=1,
                                    do_classifier_free_guidance=False)[0]
    assert_outputs_close(PromptEncoder(m, {"zqxconv": emb.joined()}).encode("a zqxconv"), theirs[0])


def test_anchored_conversion_maps_a_token_row_to_that_tokens_target_row() -> None:
    source, target, a, b = _trained_pair(noise=0.2)  # a noisy relation: the global map misses every token a bit
    token_map = fit_token_map(source, target)
    rows = source[[5, 77]]
    assert torch.allclose(token_map.apply(rows, source, target), target[[5, 77]], atol=1e-5)
    assert not torch.allclose(token_map.apply(rows), target[[5, 77]], atol=1e-2)
    # Off a token, the offset goes through the map: a small step from token 5 moves the result by the mapped step.
    step = torch.randn(1, 16, generator=torch.Generator().manual_seed(4)) * 0.01
    moved = token_map.apply(rows[:1] + step, source, target) - target[[5]]
    torch.testing.assert_close(moved, step @ token_map.weight, rtol=1e-4, atol=1e-6)


def test_cli_convert_on_the_embedded_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SD-1 toy words converted for toyworld-xl: both halves derived (the tables differ), and a word's own rows come
    out as toyworld-xl's rows of that word (the anchor)."""
    from safetensors.torch import load_file

    from sdconcepts.cli import main
    from sdconcepts.model_shape import EMBEDDED_MODEL_DIR, EMBEDDED_XL_MODEL_DIR

    def table(folder: Path) -> torch.Tensor:
        weights = load_file(str(folder / "model.safetensors"))
        return next(v for k, v in weights.items() if k.endswith("embeddings.token_embedding.weight")).float()

    if not (EMBEDDED_XL_MODEL_DIR / "model_index.json").is_file():
        pytest.skip("the embedded toyworld-xl is missing")
    ids = [4481, 14615]  # "yellow", "triangle" in CLIP's vocabulary
    sd1 = table(EMBEDDED_MODEL_DIR / "text_encoder")
    folder = tmp_path / "embeddings"
    save_embedding(Embedding("toyword", sd1[ids]), folder / "toyword.pt")
    save_embedding(Embedding("narrow", torch.ones(1, 16)), folder / "narrow.pt")
    assert main(["embedding", "convert", "toyword", "--embeddings-dir", str(folder)]) == 0
    written = load_file(str(folder / "toyword_xl.safetensors"))
    assert torch.allclose(written["clip_l"], table(EMBEDDED_XL_MODEL_DIR / "text_encoder")[ids], atol=1e-6)
    assert torch.allclose(written["clip_g"], table(EMBEDDED_XL_MODEL_DIR / "text_encoder_2")[ids], atol=1e-6)
    capsys.readouterr()
    for argv, expected in (
        (["toyword_xl", "again"], "already an SDXL embedding"),
        (["narrow"], "a 16-wide embedding: name the SD 1.x/2.x model it was trained on"),
        (["toyword", "--format", "pt"], "written as .safetensors"),
        (["toyword"], "already exists"),
    ):
        assert main(["embedding", "convert", *argv, "--embeddings-dir", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and err.count("\n") == 0, err
