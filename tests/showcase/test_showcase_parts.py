"""The showcase's parts that need no model: where a shape sits and how varied placements are, the inpainting box,
the normalised entropy, the pages, and that docs/uses.md is the renderer's output for the committed figures."""

from __future__ import annotations

import copy
import html
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdconcepts.showcase import pictures, render
from sdconcepts.showcase.uses import normalised_entropy
from sdconcepts.toyworld import world

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "docs" / "uses" / "figures.json"


def square_at(x0: int, y0: int, side: int, *, background: tuple[int, int, int] = (20, 30, 110)) -> Image.Image:
    image = Image.new("RGB", (32, 32), background)
    ImageDraw.Draw(image).rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=(235, 215, 40))
    return image


def test_locate_finds_the_centre_and_size_of_the_shape() -> None:
    x, y, size = pictures.locate(square_at(4, 20, 8)) or (0, 0, 0)
    assert (x, y) == pytest.approx((8 / 32, 24 / 32))
    assert size == pytest.approx(math.sqrt(64 / 1024))
    assert pictures.locate(Image.new("RGB", (32, 32), (15, 15, 15))) is None


def test_locate_follows_a_drawn_toy_picture() -> None:
    # world.draw keeps the shape inside the picture; its centre moves with the seed.
    found = [pictures.locate(image) for image, _ in world.sample(20, 3, shape="square")]
    assert all(f is not None for f in found)
    xs = [f[0] for f in found if f is not None]
    assert 0 < min(xs) < max(xs) < 1 and max(xs) - min(xs) > 0.2


def test_spread_is_zero_for_copies_and_the_distance_between_two_centres() -> None:
    same = pictures.spread([square_at(4, 4, 6)] * 4)
    assert same["x_sd"] == same["y_sd"] == same["centre_distance"] == 0
    two = pictures.spread([square_at(0, 0, 8), square_at(24, 0, 8)])
    assert two["centre_distance"] == pytest.approx(24 / 32, abs=1e-3)
    assert two["x_sd"] == pytest.approx(12 / 32, abs=1e-3) and two["y_sd"] == 0


def test_box_mask_covers_the_shape_grown_by_the_padding() -> None:
    mask = np.asarray(pictures.box_mask(square_at(10, 12, 5), padding=1)) > 0
    ys, xs = np.nonzero(mask)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (9, 15, 11, 17)
    assert mask.sum() == 7 * 7


def test_normalised_entropy() -> None:
    assert normalised_entropy({k: 12 for k in world.SHAPES}, 5) == pytest.approx(1.0)
    assert normalised_entropy({"cross": 60}, 5) == 0
    skewed = normalised_entropy({"cross": 40, "circle": 20}, 5)
    assert 0 < skewed < 0.5


def test_grid_has_a_row_per_label_and_the_pictures_zoomed() -> None:
    rows = [(f"row {r}", [square_at(random.Random(r).randint(0, 20), 4, 6) for _ in range(3)]) for r in range(2)]
    sheet = pictures.grid(rows, columns=3)
    side = 32 * pictures.ZOOM
    assert sheet.size == (pictures.LABEL_WIDTH + 3 * (side + pictures.GAP), 2 * (side + pictures.GAP))
    first = sheet.crop((pictures.LABEL_WIDTH, 0, pictures.LABEL_WIDTH + side, side)).resize((32, 32), Image.Resampling.BOX)
    assert np.array_equal(np.asarray(first), np.asarray(rows[0][1][0]))


def test_docs_uses_is_the_renderers_output_for_the_committed_figures() -> None:
    figures = json.loads(FIGURES.read_text())
    assert (ROOT / "docs" / "uses.md").read_text() == render.markdown(figures, images="uses")
    for use in figures["uses"]:
        assert (FIGURES.parent / f"{use['key']}.png").is_file(), use["key"]
    assert (FIGURES.parent / "overview.png").is_file()


def test_pages_show_each_bar_and_a_failed_one_as_failed() -> None:
    figures = copy.deepcopy(json.loads(FIGURES.read_text()))
    first = figures["uses"][0]["bars"][0]
    first.update(value=0.1, passed=False)
    text, page = render.markdown(figures, images="g"), render.page(figures, images="g")
    for use in figures["uses"]:
        assert f"(g/{use['key']}.png)" in text and f'src="g/{use["key"]}.png"' in page
        for bar in use["bars"]:
            assert bar["label"] in text and html.escape(bar["label"]) in page
    assert f"| {first['label']} | 10.0% | 80.0% | FAIL |" in text
    assert '<span class="fail">FAIL</span>' in page and "<script" not in page


def test_the_train_tab_shows_the_committed_page() -> None:
    from sdconcepts.ui.train_tab import USES_DOC, uses_markdown

    assert USES_DOC == ROOT / "docs" / "uses.md" and USES_DOC.is_file()
    shown = uses_markdown()
    figures = json.loads((ROOT / "docs" / "uses" / "figures.json").read_text(encoding="utf-8"))
    for use in figures["uses"]:  # every use's title, and every picture named by its path instead of shown
        assert f"## {use['title']}" in shown
    assert "![" not in shown and "(picture: Text-guided synthesis, docs/uses/text_guided.png)" in shown
    assert "<background>" not in shown and "&lt;background> background" in shown
