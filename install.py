"""Host hook (A1111/Forge run this file at launch): pip-install what requirements.txt lists and the host lacks.

Nothing is upgraded or pinned over the host's own packages, and torch is never installed here: hosts bring their own.
"""

from __future__ import annotations

import re
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


# Newer diffusers releases import transformers names that the hosts' pinned transformers lack (A1111 1.10 pins
# 4.30.2, Forge 4.46.1); 0.31.0 runs on both (checked by tools/host_stacks.sh).
HOST_DIFFUSERS = "diffusers==0.31.0"
HOST_TRANSFORMERS_BELOW = (4, 47)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def missing_requirements(is_installed, transformers_version: str | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """The requirement lines whose distribution the host does not have.

    ``transformers_version`` is the host's; with an older one, diffusers is pinned to a release that imports there.
    """
    wanted = []
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        match = _NAME.match(line)
        if match and not is_installed(match.group(1)):
            if match.group(1) == "diffusers" and transformers_version is not None:
                if _version_tuple(transformers_version) < HOST_TRANSFORMERS_BELOW:
                    line = HOST_DIFFUSERS
            wanted.append(line)
    return wanted


def _installed_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> None:
    import launch  # the host's installer helpers; only importable inside A1111/Forge

    for requirement in missing_requirements(launch.is_installed, _installed_version("transformers")):
        launch.run_pip(f'install "{requirement}"', f"sdconcepts requirement: {requirement}")


if __name__ == "__main__":
    main()
