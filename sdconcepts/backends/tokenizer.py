"""The CLIP tokenizer, built offline from the vocabulary shipped in the package assets.

SD 1.x pads with ``<|endoftext|>`` (id 49407); SD 2.x (OpenCLIP) pads with ``!`` (id 0), as the configs of the
released SD 2 models do.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOKENIZER_DIR = ASSETS / "clip_tokenizer"
BOS_ID = 49406
EOS_ID = 49407
PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}


@lru_cache(maxsize=4)
def _load(family: str) -> CLIPTokenizer:
    if family not in PAD_TOKEN:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(PAD_TOKEN)}")
    # from_pretrained on a folder reads vocab.json/merges.txt in transformers 4 and 5 alike.
    return CLIPTokenizer.from_pretrained(
        str(TOKENIZER_DIR), model_max_length=77, pad_token=PAD_TOKEN[family], local_files_only=True
    )


def load_clip_tokenizer(family: str = "sd1") -> CLIPTokenizer:
    """Return the CLIP tokenizer for a model family (``sd1`` or ``sd2``); no network access."""
    return _load(family)
