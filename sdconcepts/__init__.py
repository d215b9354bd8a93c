"""sdconcepts: textual inversion embeddings and hypernetworks for Stable Diffusion, A1111-compatible."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names, imported on first use so that ``import sdconcepts`` stays light (no torch, no diffusers).
_LAZY = {
    "Embedding": "sdconcepts.embedding",
    "load_embedding": "sdconcepts.embedding_files",
    "save_embedding": "sdconcepts.embedding_files",
}

__all__ = ["Embedding", "__version__", "load_embedding", "save_embedding"]

if TYPE_CHECKING:
    from sdconcepts.embedding import Embedding
    from sdconcepts.embedding_files import load_embedding, save_embedding


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sdconcepts' has no attribute {name!r}")
