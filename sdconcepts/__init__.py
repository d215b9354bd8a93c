"""sdconcepts: textual inversion embeddings and hypernetworks for Stable Diffusion, A1111-compatible."""

from __future__ import annotations

__version__ = "0.1.0"
