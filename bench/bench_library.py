"""Benchmark: card tabs over big libraries, against the same mix of files at 100 embeddings, in one run.

Builds (in a temporary folder) an embeddings library of ``--embeddings`` files (default 10,000) in nested folders,
mixing A1111 ``.pt``, ``.safetensors``, diffusers ``.bin`` and PNG images carrying an embedding, with some card
pictures and A1111 user-metadata ``.json`` files, and a hypernetworks library of ``--hypernetworks`` files (default
2,000); then the same mix at 100 embeddings and 20 hypernetworks. Each library is measured in a fresh Python process
through ``ui.handlers`` (what the web UI calls): the first view of each card tab (a scan that stats the files and
reads the first page's), a view while the background reader reads the rest, how long that reader takes after it, a
later view (a no-change rescan), a search (filtering the listed cards, as typing does), page 2, a no-change
``refresh()`` alone, the HTML size and the process's resident memory above the same process with empty folders.
Each library is measured twice: with an empty hash cache (a first start) and again with the hash cache the first
process wrote (a restart: ``sdconcepts.hash_cache``); the restart's figures are printed as ``... (restart)``.

Goals (issue 16): first view <= 2 s, later view <= 0.3 s, memory <= 200 MB above an empty library; figures are
printed next to the small library's, measured in the same run. Not a timed test: this machine is shared.
Usage: ``PYTHONPATH=. python bench/bench_library.py [--embeddings N] [--hypernetworks N] [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdconcepts.embeddings.embedding import Embedding
from sdconcepts.embeddings.files import save_embedding
from sdconcepts.hash_cache import CACHE_DIR_ENV
from sdconcepts.hypernetworks.files import save_hypernetwork
from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork
from sdconcepts.safe_load import write_torch_file

GOALS = {"first view s": 2.0, "later view s": 0.3, "memory MB": 200.0}


def _width() -> int:
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    return UiSession(UiConfig()).context_width() or 768


def populate_embeddings(root: Path, count: int, width: int) -> None:
    """``count`` embeddings over 100 folders two levels deep: .pt, .safetensors, .bin, and 1 in 50 a PNG carrier;
    1 in 10 has a card picture and 1 in 10 a user-metadata .json."""
    generator = torch.Generator().manual_seed(0)
    picture = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    for i in range(count):
        folder = root / f"group{i % 10}" / f"set{i % 10 // 2}{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        vectors = torch.randn(1 + i % 4, width, generator=generator)
        name = f"emb{i}"
        kind = i % 50
        if kind == 0:
            save_embedding(Embedding(name, vectors), folder / f"{name}.png")
        elif kind % 3 == 0:
            # diffusers' learned_embeds.bin: {token: vector}
            write_torch_file({f"<{name}>": vectors[0]}, folder / f"{name}.bin")
        elif kind % 3 == 1:
            save_embedding(Embedding(name, vectors), folder / f"{name}.pt")
        else:
            save_embedding(Embedding(name, vectors), folder / f"{name}.safetensors")
        if i % 10 == 3:
            picture.save(folder / f"{name}.preview.png")
        if i % 10 == 7:
            (folder / f"{name}.json").write_text(
                json.dumps({"description": f"embedding number {i}", "activation text": "red shape",
                            "preferred weight": 0.0, "notes": ""}, indent=4),
                encoding="utf-8",
            )


def populate_hypernetworks(root: Path, count: int, width: int) -> None:
    """``count`` hypernetwork files over 20 folders; 1 in 10 with a card picture and 1 in 10 with a .json."""
    picture = Image.fromarray(np.full((64, 64, 3), 150, dtype=np.uint8))
    template = create_hypernetwork("template", (width, 32), generator_seed=0)
    for i in range(count):
        folder = root / f"group{i % 4}" / f"set{i % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        template.name = f"hyper{i}"
        save_hypernetwork(template, folder / f"hyper{i}.pt")
        if i % 10 == 3:
            picture.save(folder / f"hyper{i}.preview.png")
        if i % 10 == 7:
            (folder / f"hyper{i}.json").write_text(
                json.dumps({"description": f"hypernetwork {i}", "preferred weight": 0.7}), encoding="utf-8"
            )


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(embeddings: Path, hypernetworks: Path, repeats: int) -> dict[str, Any]:
    """Run in a fresh process: the UI handlers over one library (imports done before the memory baseline)."""
    from sdconcepts.ui import handlers
    from sdconcepts.ui.ui_session import UiConfig, UiSession

    # The app imports the model code at startup anyway (the first context_width() does): not a library cost.
    UiSession(UiConfig()).context_width()
    baseline = _rss_mb()
    session = UiSession(UiConfig(embeddings_dirs=[embeddings], hypernetworks_dirs=[hypernetworks]))
    figures: dict[str, Any] = {}
    for tab, view in (("ti", handlers.embedding_cards_view), ("hn", handlers.hypernetwork_cards_view)):
        start = time.perf_counter()
        first = view(session)
        figures[f"{tab} first view s"] = time.perf_counter() - start
        figures[f"{tab} cards"] = first.summary
        figures[f"{tab} html KB"] = len(first.cards_html) / 1024
        # Another view while the background reader still reads the files the first page did not show.
        figures[f"{tab} view while reading s"] = _timed(lambda v=view: v(session))
        start = time.perf_counter()
        if session._reader is not None:
            session._reader.join()
        figures[f"{tab} background read s"] = time.perf_counter() - start
        later = []
        for _ in range(repeats):
            start = time.perf_counter()
            view(session)
            later.append(time.perf_counter() - start)
        figures[f"{tab} later view s"] = statistics.median(later)
        searches = []
        for query in ("1", "12", "123", "1234", "set3", "zzz"):
            start = time.perf_counter()
            view(session, query, refresh=False)
            searches.append(time.perf_counter() - start)
        figures[f"{tab} search ms"] = statistics.median(searches) * 1000
        figures[f"{tab} page 2 ms"] = _timed(lambda v=view: v(session, refresh=False, page=2)) * 1000
    rescans = []
    for _ in range(repeats):
        start = time.perf_counter()
        assert not session.embeddings.refresh()
        rescans.append(time.perf_counter() - start)
    figures["ti no-change refresh ms"] = statistics.median(rescans) * 1000
    figures["memory MB"] = _rss_mb() - baseline
    return figures


def _timed(function: Any) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _run_measure(embeddings: Path, hypernetworks: Path, repeats: int, cache: Path) -> dict[str, Any]:
    # The child imports the same sdconcepts as this process (a checkout run with PYTHONPATH, or the installed one).
    import sdconcepts

    source = str(Path(sdconcepts.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
           CACHE_DIR_ENV: str(cache)}
    out = subprocess.run(
        [sys.executable, __file__, "--measure", str(embeddings), str(hypernetworks), "--repeats", str(repeats)],
        capture_output=True, text=True, env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"measuring {embeddings.parent} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embeddings", type=int, default=10_000)
    parser.add_argument("--hypernetworks", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--measure", nargs=2, metavar=("EMBEDDINGS", "HYPERNETWORKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.repeats)))
        return 0
    width = _width()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sizes = {"empty": (0, 0), "small": (100, 20), "big": (args.embeddings, args.hypernetworks)}
        results: dict[str, dict[str, Any]] = {}
        for label, (n_emb, n_hyper) in sizes.items():
            start = time.perf_counter()
            populate_embeddings(root / label / "embeddings", n_emb, width)
            populate_hypernetworks(root / label / "hypernetworks", n_hyper, width)
            (root / label / "embeddings").mkdir(parents=True, exist_ok=True)
            (root / label / "hypernetworks").mkdir(parents=True, exist_ok=True)
            print(f"built {label}: {n_emb} embeddings, {n_hyper} hypernetworks ({time.perf_counter() - start:.0f} s)",
                  flush=True)
        for label in sizes:
            folders = (root / label / "embeddings", root / label / "hypernetworks", args.repeats, root / label / "cache")
            results[label] = _run_measure(*folders)
            # A restart: the same library, the hash cache the first process wrote.
            restart = _run_measure(*folders)
            for key in ("ti first view s", "ti background read s", "hn background read s"):
                results[label][f"{key} (restart)"] = restart[key]
    empty_memory = results["empty"]["memory MB"]
    print(f"\nwidth {width}; medians of {args.repeats} where repeated; memory above the same process's empty library")
    print(f"{'figure':34} {'small':>12} {'big':>12} {'big/small':>10}")
    for key, small in results["small"].items():
        big = results["big"][key]
        if key == "memory MB":
            small, big = small - empty_memory, big - empty_memory
        if isinstance(small, float):
            ratio = f"{big / small:.1f}x" if small > 0 else ""
            print(f"{key:34} {small:12.3f} {big:12.3f} {ratio:>10}")
        else:
            print(f"{key:34} {small!s:>12} | {big}")
    failed = []
    for goal, limit in GOALS.items():
        for tab in ("ti", "hn"):
            key = f"{tab} {goal}" if goal != "memory MB" else goal
            value = results["big"][key] - (empty_memory if goal == "memory MB" else 0)
            if value > limit:
                failed.append(f"{key} {value:.2f} > {limit}")
    print("goals met" if not failed else "goals missed: " + "; ".join(dict.fromkeys(failed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
