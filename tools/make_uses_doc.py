"""Rebuild docs/uses.md (and its pictures in docs/uses/) from a showcase folder.

    python -m sdconcepts toyworld showcase --output /tmp/showcase
    python tools/make_uses_doc.py /tmp/showcase

Copies the folder's figures.json and grids (as 256-colour PNGs, to keep the repository small) into ``docs/uses/``
and writes ``docs/uses.md`` with the showcase's own renderer (``sdconcepts.showcase.render.markdown``), so the
figures in the docs are the command's, never typed; tests/showcase/test_showcase_parts.py checks that the committed
page is the renderer's output for the committed figures.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from PIL import Image

from sdconcepts.showcase.render import markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PICTURES = DOCS / "uses"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("folder", type=Path, help="a folder written by `toyworld showcase`")
    args = parser.parse_args()
    figures = json.loads((args.folder / "figures.json").read_text())
    PICTURES.mkdir(parents=True, exist_ok=True)
    for old in PICTURES.glob("*.png"):
        old.unlink()
    for grid in sorted((args.folder / "grids").glob("*.png")):
        with Image.open(grid) as picture:
            picture.convert("RGB").quantize(256).save(PICTURES / grid.name, optimize=True)
    shutil.copyfile(args.folder / "figures.json", PICTURES / "figures.json")
    (DOCS / "uses.md").write_text(markdown(figures, images="uses"))
    print(f"wrote {DOCS / 'uses.md'} and {len(list(PICTURES.glob('*.png')))} pictures in {PICTURES}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
