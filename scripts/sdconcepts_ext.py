"""Host wiring (A1111/Forge execute every file in scripts/): make the sdconcepts package importable for good.

The host puts the extension folder on sys.path only while this file is imported; our modules import lazily later
(UI handlers, training), so the folder is added permanently. The tabs register here once the web UI lands.
"""

from __future__ import annotations

import sys
from pathlib import Path

EXTENSION_ROOT = str(Path(__file__).resolve().parent.parent)
if EXTENSION_ROOT not in sys.path:
    sys.path.append(EXTENSION_ROOT)
