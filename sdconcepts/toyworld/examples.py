"""The shipped examples for the embedded toy-world model: one trained embedding and one trained hypernetwork.

They live in the package (``assets/examples/``, rebuilt by ``tools/make_examples.py``) and the standalone web UI
lists their folders as read-only sources before the user's folders: nothing is copied into the user's folders, a
user file of the same name wins (later folders win name collisions), training and the embedding tools write only to
the user's folders, and ``--no-examples`` leaves them out.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EMBEDDING", "EXAMPLES_DIR", "EXAMPLE_EMBEDDINGS_DIR", "EXAMPLE_HYPERNETWORKS_DIR", "HYPERNETWORK"]

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLE_EMBEDDINGS_DIR = EXAMPLES_DIR / "embeddings"
EXAMPLE_HYPERNETWORKS_DIR = EXAMPLES_DIR / "hypernetworks"
EMBEDDING = "example_triangle"  # a yellow triangle on a brown background
HYPERNETWORK = "example_teal"  # teal backgrounds
