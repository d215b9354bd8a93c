"""Host wiring: A1111, Forge, reForge and Forge-Classic call ``preload(parser)`` of every extension before they parse
their command line. Ours adds ``--sdconcepts-train-root DIR`` (``sdconcepts.host.options``)."""

from __future__ import annotations

import sys
from pathlib import Path

EXTENSION_ROOT = str(Path(__file__).resolve().parent)
if EXTENSION_ROOT not in sys.path:
    sys.path.append(EXTENSION_ROOT)

from sdconcepts.host.options import add_host_options as preload  # noqa: E402  (needs the path above)

__all__ = ["preload"]
