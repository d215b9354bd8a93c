"""Rebuild the shipped examples in ``sdconcepts/assets/examples/`` with the project's own commands.

    python tools/make_examples.py [--work DIR]

Runs ``python -m sdconcepts`` commands (the same ones the README shows): ``toyworld concept`` draws the training
images, ``create-embedding`` / ``create-hypernetwork`` make the files, ``train-embedding`` / ``train-hypernetwork``
train them on the embedded toy-world model, and ``generate`` draws four images with each, which become the card
picture (``<name>.preview.png``: a 2x2 grid scaled up 2x without smoothing). Everything is seeded; about 3 minutes
on an idle CPU thread (18 minutes on the busy shared 2-core machine they were made on). ``--only embedding`` or
``--only hypernetwork`` rebuilds one. The examples:

- ``example_triangle`` (embedding, 4 vectors): a yellow triangle on a brown background, from 5 images captioned
  "a shape" (``subject`` template, 500 steps);
- ``example_teal`` (hypernetwork, 1-2-1 linear, widths 48/32/64): turns backgrounds teal, from 40 images of every
  shape and colour on teal captioned without the background (``filewords`` template, 400 steps).

The settings are those of ``tests/training/test_training_learns.py``, whose figures are in ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "sdconcepts" / "assets" / "examples"
EMBEDDING = "example_triangle"
HYPERNETWORK = "example_teal"


def sdconcepts(*args: str) -> None:
    command = [sys.executable, "-m", "sdconcepts", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def preview(images: Path, target: Path) -> None:
    """Four generations in a 2x2 grid, scaled 2x with nearest neighbours (the toy model draws 32x32 pixels)."""
    files = sorted(images.glob("*.png"))[:4]
    tiles = [Image.open(f).convert("RGB") for f in files]
    side = tiles[0].width
    grid = Image.new("RGB", (2 * side, 2 * side))
    for index, tile in enumerate(tiles):
        grid.paste(tile, ((index % 2) * side, (index // 2) * side))
    grid.resize((4 * side, 4 * side), Image.Resampling.NEAREST).save(target, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="keep the datasets and logs here (default: a temp dir)")
    parser.add_argument("--only", choices=("embedding", "hypernetwork"), default=None, help="rebuild only this one")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="sdconcepts-examples-"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--width", "32", "--height", "32", "--save-every", "0", "--preview-every", "0", "--no-optimizer-state",
              "--log-dir", str(work / "log"), "--device", "cpu"]

    out_ti, out_hn = EXAMPLES / "embeddings", EXAMPLES / "hypernetworks"
    out_ti.mkdir(parents=True, exist_ok=True)
    out_hn.mkdir(parents=True, exist_ok=True)
    sample = ["--steps", "20", "--sampler", "DDIM", "--cfg-scale", "5", "--seed", "1", "--batch-size", "4",
              "--device", "cpu"]
    if args.only != "hypernetwork":
        make_embedding(work, common, sample, out_ti)
    if args.only != "embedding":
        make_hypernetwork(work, common, sample, out_hn)
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    print(f"wrote {EXAMPLES} ({total} bytes)")
    return 0


def make_embedding(work: Path, common: list[str], sample: list[str], out: Path) -> None:
    embeddings = work / "embeddings"
    sdconcepts("toyworld", "concept", "--shape", "triangle", "--colour", "yellow", "--background", "brown",
               "--count", "5", "--seed", "4242", "--out", str(work / "triangle"))
    sdconcepts("create-embedding", EMBEDDING, "--init-text", "triangle", "--vectors", "4", "--overwrite",
               "--embeddings-dir", str(embeddings), "--device", "cpu")
    sdconcepts("train-embedding", EMBEDDING, "--dataset", str(work / "triangle"), "--template", "subject",
               "--batch-size", "5", "--max-steps", "500", "--learn-rate", "0.01:200, 0.005",
               "--embeddings-dir", str(embeddings), *common)
    sdconcepts("generate", "--prompt", f"a photo of a {EMBEDDING}", "--embeddings-dir", str(embeddings), *sample,
               "--output", str(work / "preview_ti"))
    shutil.copyfile(embeddings / f"{EMBEDDING}.pt", out / f"{EMBEDDING}.pt")
    preview(work / "preview_ti", out / f"{EMBEDDING}.preview.png")


def make_hypernetwork(work: Path, common: list[str], sample: list[str], out: Path) -> None:
    hypernetworks = work / "hypernetworks"
    sdconcepts("toyworld", "concept", "--background", "teal", "--count", "40", "--seed", "77",
               "--out", str(work / "teal"))
    sdconcepts("create-hypernetwork", HYPERNETWORK, "--sizes", "48,32,64", "--layer-structure", "1, 2, 1",
               "--activation", "linear", "--seed", "0", "--overwrite", "--hypernetworks-dir", str(hypernetworks))
    sdconcepts("train-hypernetwork", HYPERNETWORK, "--dataset", str(work / "teal"), "--template", "filewords",
               "--batch-size", "20", "--max-steps", "400", "--learn-rate", "0.002",
               "--hypernetworks-dir", str(hypernetworks), *common)
    sdconcepts("generate", "--prompt", f"a white cross <hypernet:{HYPERNETWORK}:1>", "--hypernetworks-dir",
               str(hypernetworks), *sample, "--output", str(work / "preview_hn"))
    shutil.copyfile(hypernetworks / f"{HYPERNETWORK}.pt", out / f"{HYPERNETWORK}.pt")
    preview(work / "preview_hn", out / f"{HYPERNETWORK}.preview.png")


if __name__ == "__main__":
    raise SystemExit(main())
