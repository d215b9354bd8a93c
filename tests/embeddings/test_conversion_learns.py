"""SD 1.x -> SDXL conversion, measured: an embedding trained on the SD-1 toy model, converted, used on toyworld-xl.

The embedding is trained as ``tests/training/test_training_learns.py`` trains it (5 pictures of a yellow triangle on
brown, captions naming nothing, 4 vectors, 500 steps), then converted four ways and scored by the probe over 60
generations of "a photo of a toytri" on toyworld-xl: our fitted map (both halves derived: toyworld-xl's clip_l is
32 wide, the SD-1 model's table 48), the same with clip_g zeroed (clip_l only), SD.Next's nearest-token method, the
global map without its anchor (ablation), and the plain words "a photo of a yellow triangle". The bar: the converted embedding shows the whole concept (shape,
colour, background) in >= 60 % of generations. ``python tests/embeddings/test_conversion_learns.py`` prints the
table of docs/sdxl-conversion.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR, XL_MODEL_DIR

pytestmark = [pytest.mark.slow]

TI = {"shape": "triangle", "colour": "yellow", "background": "brown", "vectors": 4, "steps": 500, "batch": 5,
      "learn_rate": "0.01:200, 0.005", "init": "triangle"}
SAMPLES = 60
BAR = 0.6


def _generate(model: Any, prompt: str, embeddings: Mapping[str, torch.Tensor] | None = None) -> list[Any]:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams

    params = GenerationParams(prompt=prompt, steps=20, sampler="DDIM", cfg_scale=5.0, seed=1000, batch_size=20,
                              batch_count=SAMPLES // 20)
    return txt2img(model, params, embeddings=embeddings, size_limits=False).images


def _rates(images: Sequence[Any]) -> dict[str, float]:
    from sdconcepts.toyworld.probe import classify

    expect = {k: TI[k] for k in ("shape", "colour", "background")}
    found = classify(images)
    out = {name: round(sum(f[name] == value for f in found) / len(found), 4) for name, value in expect.items()}
    out["all"] = round(sum(all(f[n] == v for n, v in expect.items()) for f in found) / len(found), 4)
    return out


def _table(model: Any, encoder: str = "text_encoder") -> torch.Tensor:
    return getattr(model, encoder).get_input_embeddings().weight.detach().float().cpu()


def measure(work: Path) -> dict[str, Any]:
    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.backends.tokenizer import BOS_ID, EOS_ID
    from sdconcepts.embeddings.conversion import MapCache, convert_embedding, nearest_token_vectors
    from sdconcepts.embeddings.files import load_embedding
    from sdconcepts.toyworld.concept import write_concept
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.training_model import TrainingModel

    sd1 = load_model(DEFAULT_MODEL_DIR, device="cpu")
    write_concept(work / "concept", count=5, seed=4242, shape=TI["shape"], colour=TI["colour"],
                  background=TI["background"])
    create_embedding_file(work / "embeddings", "toytri", TrainingModel(sd1).token_rows(TI["init"], TI["vectors"]),
                          vectors=TI["vectors"])
    config = EmbeddingTrainingConfig(dataset=str(work / "concept"), template="subject", width=32, height=32,
                                     batch_size=TI["batch"], max_steps=TI["steps"], learn_rate=TI["learn_rate"],
                                     save_every=0, preview_every=0, log_directory=str(work / "log"))
    start = time.perf_counter()
    list(train_embedding(sd1, "toytri", config, embeddings_dir=work / "embeddings"))
    train_seconds = time.perf_counter() - start
    trained = load_embedding(work / "embeddings" / "toytri.pt")

    xl = load_model(XL_MODEL_DIR, device="cpu")
    source, clip_l, clip_g = _table(sd1), _table(xl), _table(xl, "text_encoder_2")
    cache = MapCache(None)
    start = time.perf_counter()
    converted = convert_embedding(trained, source, clip_l, clip_g, cache)
    convert_seconds = time.perf_counter() - start
    maps = {key: cache.get(source, table) for key, table in (("clip_l", clip_l), ("clip_g", clip_g))}
    pair = converted.vectors
    nearest = nearest_token_vectors(trained.tensor(), source, {"clip_l": clip_l, "clip_g": clip_g},
                                    hidden=(BOS_ID, EOS_ID))
    vectors = trained.tensor()
    ways = {
        "fitted map, anchored (ours)": torch.cat([pair["clip_l"], pair["clip_g"]], dim=-1),
        "ours, clip_l only (clip_g zeroed)": torch.cat([pair["clip_l"], torch.zeros_like(pair["clip_g"])], dim=-1),
        "nearest token (SD.Next)": torch.cat([nearest["clip_l"], nearest["clip_g"]], dim=-1),
        "fitted map, global (no anchor)": torch.cat([maps["clip_l"].apply(vectors), maps["clip_g"].apply(vectors)],
                                                    dim=-1),
    }
    prompt = "a photo of a toytri"
    plain = f"a photo of a {TI['colour']} {TI['shape']}"
    rows = {name: _rates(_generate(xl, prompt, {"toytri": vectors})) for name, vectors in ways.items()}
    rows[f'plain words "{plain}"'] = _rates(_generate(xl, plain))
    return {
        "rows": rows,
        "on the SD-1 model it was trained on": _rates(_generate(sd1, prompt, {"toytri": trained.tensor()})),
        "train_seconds": round(train_seconds, 1),
        "convert_seconds": round(convert_seconds, 2),
        "maps": {key: {"tokens": m.tokens, "alpha": m.alpha, "heldout_cosine": m.heldout_cosine,
                       "fit_seconds": m.seconds} for key, m in maps.items()},
        "samples": SAMPLES,
        "settings": TI,
    }


def test_converted_sd1_embedding_shows_the_concept_on_toyworld_xl(tmp_path: Path) -> None:
    for folder in (DEFAULT_MODEL_DIR, XL_MODEL_DIR):
        if not (folder / "model_index.json").is_file():
            pytest.skip(f"the embedded model {folder} is missing")
    report = measure(tmp_path)
    print(json.dumps(report, indent=1))
    ours = report["rows"]["fitted map, anchored (ours)"]["all"]
    assert ours >= BAR, report
    plain = next(v for k, v in report["rows"].items() if k.startswith("plain words"))
    assert plain["all"] <= ours - 0.3, report


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(Path(tmp))
    print(json.dumps(result, indent=1), flush=True)
    for name, rates in result["rows"].items():
        print(f"| {name} | {rates['all']:.1%} | {rates['shape']:.1%} | {rates['colour']:.1%} | "
              f"{rates['background']:.1%} |", file=sys.stderr)
