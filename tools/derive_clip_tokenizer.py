"""Derive the CLIP tokenizer files (vocab.json, merges.txt) from OpenAI's BPE file.

The open-clip-torch wheel ships ``open_clip/bpe_simple_vocab_16e6.txt.gz``. CLIP's encoder is built from it in a
fixed order: the 256 byte symbols, the same with ``</w>``, one token per merge, then the two special tokens. The
result is written in the Hugging Face layout that ``CLIPTokenizer`` reads.

Usage::

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    python tools/derive_clip_tokenizer.py /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl sdconcepts/assets/clip_tokenizer
"""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
# CLIP uses merges 1 .. 49152-256-2 of the file (the first line is a version header).
MERGE_COUNT = 49152 - 256 - 2


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP uses for raw bytes, in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def read_bpe(source: Path) -> str:
    data = source.read_bytes()
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            data = wheel.read(BPE_MEMBER)
    return gzip.decompress(data).decode("utf-8")


def derive(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    merges = bpe_text.split("\n")[1 : MERGE_COUNT + 1]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"expected {VOCAB_SIZE} tokens, derived {len(vocab)}")
    return vocab, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="open-clip-torch wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    vocab, merges = derive(read_bpe(args.source))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (args.out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
