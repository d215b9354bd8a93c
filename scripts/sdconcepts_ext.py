"""Host wiring (A1111/Forge execute every file in scripts/): make the sdconcepts package importable for good.

The host puts the extension folder on sys.path only while this file is imported; our modules import lazily later
(UI handlers, training), so the folder is added permanently. Then our tab registers through
``script_callbacks.on_ui_tabs`` (``sdconcepts.host.a1111``; a no-op outside a host). In Forge only, the ``hypernet``
extra network, the Hypernetworks page and the script that patches Forge's UNet register (``sdconcepts.host.forge``);
the host finds that script as a class in this module's namespace. In Forge and its forks also the words bundled in
LoRA files, while the LoRA is in the prompt (``sdconcepts.host.bundles``; A1111 loads them itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

EXTENSION_ROOT = str(Path(__file__).resolve().parent.parent)
if EXTENSION_ROOT not in sys.path:
    sys.path.append(EXTENSION_ROOT)

from sdconcepts.host import bundles, forge  # noqa: E402  (needs the path above)
from sdconcepts.host.a1111 import register  # noqa: E402

register()
if forge.register():
    SdconceptsHypernetworks = forge.script_class()
if bundles.register():
    SdconceptsBundledEmbeddings = bundles.script_class()
