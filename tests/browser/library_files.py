"""Small real embedding and hypernetwork files (plus broken ones) for the UI tests, written with the project's own
file modules, and the tiny model the tests fall back to when the embedded default model is not installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdconcepts import Embedding, save_embedding
from sdconcepts.hypernetworks.files import save_hypernetwork
from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork

EMBEDDINGS = ("toy-style", "lineart")
HYPERNETWORKS = ("toy-hypernet", "anime-hypernet")


def _picture(path: Path, colour: tuple[int, int, int]) -> None:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, :] = colour
    pixels[16:48, 16:48] = (255, 255, 255)
    Image.fromarray(pixels).save(path)


def write_library(root: Path, width: int) -> tuple[Path, Path]:
    """``root/embeddings`` and ``root/hypernetworks`` for a model whose text width is ``width``.

    Usable: two embeddings (one with a ``name.png`` preview, one in a subfolder) and two hypernetworks (one with a
    ``name.preview.png``). Skipped: an embedding of another width, and one broken file in each folder.
    """
    generator = torch.Generator().manual_seed(0)
    embeddings = root / "embeddings"
    (embeddings / "styles").mkdir(parents=True, exist_ok=True)
    save_embedding(Embedding("toy-style", torch.randn(2, width, generator=generator) * 0.1), embeddings / "toy-style.pt")
    _picture(embeddings / "toy-style.png", (30, 120, 200))
    save_embedding(Embedding("lineart", torch.randn(1, width, generator=generator) * 0.1),
                   embeddings / "styles" / "lineart.safetensors")
    save_embedding(Embedding("other-width", torch.randn(1, width + 8, generator=generator)),
                   embeddings / "other-width.safetensors")
    (embeddings / "broken.pt").write_bytes(b"this is not a torch file")

    hypernetworks = root / "hypernetworks"
    hypernetworks.mkdir(parents=True, exist_ok=True)
    save_hypernetwork(create_hypernetwork("toy-hypernet", (width,), generator_seed=0), hypernetworks / "toy-hypernet.pt")
    save_hypernetwork(
        create_hypernetwork("anime-hypernet", (width, 32), layer_structure=(1.0, 1.5, 1.0), activation="relu",
                            layer_norm=True, generator_seed=1),
        hypernetworks / "anime-hypernet.pt",
    )
    _picture(hypernetworks / "anime-hypernet.preview.png", (200, 60, 120))
    (hypernetworks / "broken-hypernet.pt").write_bytes(b"\x80\x02not a pickle at all")
    return embeddings, hypernetworks
