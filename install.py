"""Host hook (A1111/Forge run this file at launch): pip-install what requirements.txt lists and the host lacks.

Nothing is upgraded or pinned over the host's own packages, and torch is never installed here: hosts bring their own.
"""

from __future__ import annotations

import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def missing_requirements(is_installed) -> list[str]:  # type: ignore[no-untyped-def]
    """The requirement lines whose distribution the host does not have."""
    wanted = []
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = _NAME.match(line)
        if match and not is_installed(match.group(1)):
            wanted.append(line)
    return wanted


def main() -> None:
    import launch  # the host's installer helpers; only importable inside A1111/Forge

    for requirement in missing_requirements(launch.is_installed):
        launch.run_pip(f'install "{requirement}"', f"sdconcepts requirement: {requirement}")


if __name__ == "__main__":
    main()
