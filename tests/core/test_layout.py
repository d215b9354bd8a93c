"""Project layout and packaging rules that the host and CI rely on."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_extension_layout_exists() -> None:
    for name in ("install.py", "scripts", "javascript", "embeddings", "models/hypernetworks", "README.md",
                 "pyproject.toml", "requirements.txt", ".ci/run", "sdconcepts/assets/clip_tokenizer/vocab.json"):
        assert (ROOT / name).exists(), name
    assert [p.name for p in (ROOT / "scripts").glob("*.py")] == ["sdconcepts_ext.py"]


def _names(specs: list[str]) -> dict[str, str]:
    return {re.split(r"[<>=!~\[ ]", s, maxsplit=1)[0].lower(): s.replace(" ", "") for s in specs}


def test_requirements_match_pyproject_and_never_pin_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = _names([ln for ln in lines if ln])
    assert requirements == _names(project["dependencies"])
    assert "torch" not in requirements and "torchvision" not in requirements


def test_install_py_asks_only_for_what_is_missing() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import install
    finally:
        sys.path.remove(str(ROOT))
    everything = install.missing_requirements(lambda name: False)
    assert [re.split(r"[<>=]", s)[0] for s in everything] == list(_names(everything))
    assert install.missing_requirements(lambda name: name != "diffusers") == [
        s for s in everything if s.startswith("diffusers")
    ]


def test_core_modules_do_not_import_edge_libraries() -> None:
    """The ruff banned-api rule is configured (CI runs ruff); this checks the rule itself is in place."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]
    banned = config["flake8-tidy-imports"]["banned-api"]
    assert {"diffusers", "transformers", "gradio", "torchvision"} <= set(banned)
    allowed = {path for path, codes in config["per-file-ignores"].items() if "TID251" in codes}
    assert not any(p.startswith(("sdconcepts/prompts/", "sdconcepts/generation.py")) for p in allowed)


def test_install_py_pins_diffusers_for_the_hosts_older_transformers() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import install
    finally:
        sys.path.remove(str(ROOT))
    only_diffusers = lambda name: name != "diffusers"  # noqa: E731
    assert install.missing_requirements(only_diffusers, "4.30.2") == ["diffusers==0.31.0"]  # A1111 1.10
    assert install.missing_requirements(only_diffusers, "4.46.1") == ["diffusers==0.31.0"]  # Forge
    assert install.missing_requirements(only_diffusers, "5.24.0")[0].startswith("diffusers>=")
