"""The command-line options (and the name of the setting) this extension adds to its host's (``preload.py`` at the extension's root registers them:
A1111, Forge, reForge and Forge-Classic call every extension's ``preload(parser)`` before parsing, and reject
options nobody registered). No host or heavy import here: it runs before the host has set itself up."""

from __future__ import annotations

from typing import Any

__all__ = ["CONVERT_SD1_SETTING", "TRAIN_ROOT_DEST", "TRAIN_ROOT_OPTION", "add_host_options"]

# A folder our Train tab may read datasets/templates from and write logs to, besides the host's folders (repeatable).
TRAIN_ROOT_OPTION = "--sdconcepts-train-root"
TRAIN_ROOT_DEST = "sdconcepts_train_root"
# Our setting in the host's Settings (shared.opts; host.a1111.on_ui_settings): SD 1.x words on SDXL in our tab.
CONVERT_SD1_SETTING = "sdconcepts_convert_sd1_on_sdxl"


def add_host_options(parser: Any) -> None:
    parser.add_argument(
        TRAIN_ROOT_OPTION,
        dest=TRAIN_ROOT_DEST,
        action="append",
        default=None,
        metavar="DIR",
        help="sdconcepts: a folder the Train tab may use for datasets, templates and logs (repeatable)",
    )
