"""sdconcepts: textual inversion embeddings and hypernetworks for Stable Diffusion, A1111-compatible."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names, imported on first use so that ``import sdconcepts`` stays light (no torch, no diffusers).
_LAZY = {
    "Embedding": "sdconcepts.embeddings.embedding",
    "load_embedding": "sdconcepts.embeddings.files",
    "save_embedding": "sdconcepts.embeddings.files",
    "Hypernetwork": "sdconcepts.hypernetworks.hypernetwork",
    "create_hypernetwork": "sdconcepts.hypernetworks.hypernetwork",
    "apply_hypernetworks": "sdconcepts.hypernetworks.hypernetwork",
    "load_hypernetwork": "sdconcepts.hypernetworks.files",
    "save_hypernetwork": "sdconcepts.hypernetworks.files",
    "attach_hypernetworks": "sdconcepts.hypernetworks.attach",
}

__all__ = [
    "Embedding",
    "Hypernetwork",
    "__version__",
    "apply_hypernetworks",
    "attach_hypernetworks",
    "create_hypernetwork",
    "load_embedding",
    "load_hypernetwork",
    "save_embedding",
    "save_hypernetwork",
]

if TYPE_CHECKING:
    from sdconcepts.embeddings.embedding import Embedding
    from sdconcepts.embeddings.files import load_embedding, save_embedding
    from sdconcepts.hypernetworks.attach import attach_hypernetworks
    from sdconcepts.hypernetworks.files import load_hypernetwork, save_hypernetwork
    from sdconcepts.hypernetworks.hypernetwork import Hypernetwork, apply_hypernetworks, create_hypernetwork


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdconcepts' has no attribute {name!r}")
