"""A showcase run: train the recipes on an embedded model, measure the six uses, and write the folder.

The folder: ``figures.json`` (every figure and bar), ``README.md`` and ``index.html`` (the same page), ``grids/``
(one PNG per use), and what was learned from: ``data/`` (pictures and captions), ``embeddings/``,
``hypernetworks/`` (the learned files, loadable in the app), ``logs/`` (the training logs).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdconcepts.showcase import pictures, render, uses
from sdconcepts.showcase.recipes import Recipes, Trainer

log = logging.getLogger(__name__)

MODELS = ("toyworld", "toyworld-xl")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_all(trainer: Trainer, recipes: Recipes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The words and the hypernetwork, trained in turn: (embeddings by word, hypernetworks by name)."""
    embeddings = {
        recipes.object.name: trainer.object_word(recipes.object),
        recipes.style.name: trainer.style_word(recipes.style),
        recipes.balanced.name: trainer.balanced_word(recipes.balanced),
    }
    hypernetworks = {recipes.style.hypernetwork: trainer.style_hypernetwork(recipes.style)}
    return embeddings, hypernetworks


def run_showcase(output: Path, *, model_name: str = "toyworld", recipes: Recipes | None = None,
                 report: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train, measure and write the showcase folder ``output``; returns the figures written to figures.json."""
    import torch  # lazy: torch

    from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, XL_MODEL_DIR, load_model

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; expected one of {', '.join(MODELS)}")
    folder = {"toyworld": DEFAULT_MODEL_DIR, "toyworld-xl": XL_MODEL_DIR}[model_name]
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"the embedded model {model_name} is missing ({folder})")
    output.mkdir(parents=True, exist_ok=True)
    start, cpu_start, load = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
    model = load_model(folder, device="cpu")
    recipes = recipes or Recipes()
    trainer = Trainer(model, model_name, output)
    report("training the words and the hypernetwork")
    embeddings, hypernetworks = train_all(trainer, recipes)
    studio = uses.Studio(model, recipes, embeddings, hypernetworks)
    measured: list[uses.Use] = []
    for measure in (uses.measure_text_guided, uses.measure_style, uses.measure_variation,
                    uses.measure_composition, uses.measure_inpaint, uses.measure_bias):
        result = measure(studio)
        for use in result if isinstance(result, list) else [result]:
            report(f"{use.title}: " + ", ".join(f"{b['label']} {b['value']:.1%} (bar {b['bar']:.0%})"
                                                 for b in use.bars))
            measured.append(use)
    grids = output / "grids"
    grids.mkdir(exist_ok=True)
    for use in measured:
        pictures.grid(use.rows).save(grids / f"{use.key}.png", optimize=True)
    overview(measured).save(grids / "overview.png", optimize=True)
    figures = {
        "run": {"model": model_name, "samples": uses.SAMPLES, "steps": uses.STEPS, "sampler": uses.SAMPLER,
                "cfg_scale": uses.CFG, "seconds": round(time.perf_counter() - start, 1),
                "cpu_seconds": round(_cpu_seconds() - cpu_start, 1), "threads": torch.get_num_threads(),
                "load": round(load, 2), "train_seconds": trainer.seconds},
        "uses": [{"key": u.key, "title": u.title, "what": u.what, "note": u.note, "bars": u.bars,
                  "figures": u.figures} for u in measured],
        "passed": all(b["passed"] for u in measured for b in u.bars),
    }
    write_pages(output, figures, images="grids")
    return figures


def overview(measured: list[uses.Use]) -> Any:
    """The one picture of what the product does: the object's training pictures, then the learned word in contexts
    the prompt names, then with the learned style (rows taken from the variation, text-guided and composition
    grids)."""
    by_key = {use.key: use for use in measured}
    rows = [by_key["variation"].rows[0], by_key["text_guided"].rows[-1], by_key["composition"].rows[-1]]
    return pictures.grid(rows)


def write_pages(output: Path, figures: dict[str, Any], *, images: str) -> None:
    """figures.json, README.md and index.html in ``output``."""
    (output / "figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    (output / "README.md").write_text(render.markdown(figures, images=images))
    (output / "index.html").write_text(render.page(figures, images=images))
