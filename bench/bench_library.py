"""Benchmark: a library refresh that finds nothing changed, over 1,000 embedding files in nested folders.

Goal (issue 4): at most 50 ms. Prints the median and the worst of the repeats, and the time of the first full load.
Usage: ``python bench/bench_library.py [--files N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdconcepts.embedding import Embedding
from sdconcepts.embedding_files import save_embedding
from sdconcepts.library import EmbeddingLibrary

GOAL_MS = 50.0


def populate(root: Path, count: int) -> None:
    """``count`` small embeddings spread over 10 subfolders two levels deep, in .pt and .safetensors."""
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        folder = root / f"group{i % 10}" / f"set{i % 3}"
        suffix = ".pt" if i % 2 else ".safetensors"
        vectors = torch.randn(1 + i % 4, 768, generator=generator)
        save_embedding(Embedding(f"emb{i}", vectors), folder / f"emb{i}{suffix}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        populate(root, args.files)
        library = EmbeddingLibrary([root])
        start = time.perf_counter()
        library.refresh()
        first = time.perf_counter() - start
        loaded = len(library.usable(768))
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            changes = library.refresh()
            timings.append((time.perf_counter() - start) * 1000)
            assert not changes
    median = statistics.median(timings)
    print(f"{loaded} embeddings; first load {first:.2f} s")
    print(f"no-change refresh over {args.files} files: median {median:.1f} ms, worst {max(timings):.1f} ms "
          f"(goal <= {GOAL_MS:.0f} ms)")
    return 0 if median <= GOAL_MS else 1


if __name__ == "__main__":
    sys.exit(main())
