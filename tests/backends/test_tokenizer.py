from __future__ import annotations

from sdconcepts.backends.tokenizer import load_clip_tokenizer


def test_real_clip_ids_offline() -> None:
    tok = load_clip_tokenizer("sd1")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408


def test_sd1_pads_with_end_of_text_and_sd2_with_zero() -> None:
    sd1 = load_clip_tokenizer("sd1")("a cat", padding="max_length", max_length=8).input_ids
    sd2 = load_clip_tokenizer("sd2")("a cat", padding="max_length", max_length=8).input_ids
    assert sd1 == [49406, 320, 2368, 49407, 49407, 49407, 49407, 49407]
    assert sd2 == [49406, 320, 2368, 49407, 0, 0, 0, 0]


def test_commas_and_case() -> None:
    tok = load_clip_tokenizer("sd1")
    assert tok("A Cat, a DOG").input_ids == tok("a cat, a dog").input_ids
    assert tok.convert_tokens_to_ids(",</w>") == 267
