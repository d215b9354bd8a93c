"""``python -m sdconcepts toyworld showcase`` as a user runs it, on the embedded SD-1 toy model: every use's bar
(issue 24) is met, every figure counts at least 60 generations, and the folder holds what the pages show and the
learned files, loadable. Slow: the run trains 3 words and a hypernetwork and makes about 900 generations, 399 s of
CPU on one thread (2026-12-06, docs/uses/figures.json's run: 460 s of wall time at load average 6.2 on the shared
2-core machine, the test 474 s; an earlier run of the same recipes at load average 12 counted 555 s of CPU and 26
minutes of wall time). CI runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "model_index.json").is_file(), reason="the embedded model is missing"),
]


def test_showcase_meets_every_bar(tmp_path: Path) -> None:
    from sdconcepts.embeddings.files import load_embedding
    from sdconcepts.hypernetworks.files import load_hypernetwork
    from sdconcepts.showcase import render

    out = tmp_path / "showcase"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "sdconcepts", "--threads", "1", "toyworld", "showcase", "--output",
                           str(out)], capture_output=True, text=True, env=env, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((out / "figures.json").read_text())
    print(json.dumps(figures, indent=1))
    keys = [use["key"] for use in figures["uses"]]
    assert keys == ["text_guided", "style_word", "style_hypernetwork", "variation", "composition", "inpaint", "bias"]
    by_key = {use["key"]: use["figures"] for use in figures["uses"]}
    # The bars of issue 24, stated here rather than read from the run's own verdicts.
    assert by_key["text_guided"]["with_word"]["all"] >= 0.8
    for kind in ("style_word", "style_hypernetwork"):
        assert by_key[kind]["style_with"] >= 0.7 and by_key[kind]["objects_with"]["all"] >= 0.8, kind
        assert by_key[kind]["style_with"] >= by_key[kind]["style_plain_prompt"] + 0.3, kind
    assert by_key["variation"]["concept"]["all"] >= 0.8
    assert by_key["variation"]["centre_distance_ratio"] >= 0.5
    assert by_key["composition"]["both"]["all"] >= 0.6
    assert by_key["inpaint"]["inside_with_word"]["all"] >= 0.8 and by_key["inpaint"]["outside_unchanged"] == 1
    assert by_key["bias"]["entropy_word"] >= 0.9 > by_key["bias"]["entropy_plain"]
    assert figures["passed"]
    for use in figures["uses"]:
        assert use["figures"]["generations"] >= 60, use["key"]
        assert (out / "grids" / f"{use['key']}.png").is_file()
    assert (out / "README.md").read_text() == render.markdown(figures, images="grids")
    assert (out / "index.html").read_text() == render.page(figures, images="grids")
    for word in ("showobj", "showstyle", "showfair"):
        assert load_embedding(out / "embeddings" / f"{word}.pt").tensor().shape[0] >= 2
    assert load_hypernetwork(out / "hypernetworks" / "showstyle_hn.pt") is not None
