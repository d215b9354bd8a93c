"""The deterministic validation loss, the best step and the early stop, on the tiny real models (SD 1 and SDXL)."""

from __future__ import annotations

import math
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sdconcepts.embeddings.files import load_embedding
from sdconcepts.hypernetworks.files import load_hypernetwork
from sdconcepts.training import (
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    create_embedding_file,
    create_hypernetwork_file,
    train_embedding,
    train_hypernetwork,
)
from sdconcepts.training.dataset import TrainingDataset, read_images
from sdconcepts.training.outputs import LossLog
from sdconcepts.training.trainables import TrainingError
from sdconcepts.training.training_model import TrainingModel
from sdconcepts.training.validation import ValidationSet, automatic_interval, settled


def _new_embedding(model: Any, folder: Path, name: str = "toytri") -> Path:
    rows = TrainingModel(model).token_rows("triangle", 2)
    width = 80 if isinstance(rows, dict) else 48
    return create_embedding_file(folder, name, rows, vectors=2, width=width)


def _config(dataset: Path, tmp_path: Path, **fields: Any) -> EmbeddingTrainingConfig:
    base: dict[str, Any] = {"dataset": str(dataset), "template": "subject", "width": 32, "height": 32,
                            "log_directory": str(tmp_path / "log"), "save_every": 0, "preview_every": 0,
                            "max_steps": 3, "learn_rate": "0.05", "validate_every": 1}
    return EmbeddingTrainingConfig(**{**base, **fields})


def _run_folder(tmp_path: Path, name: str = "toytri") -> Path:
    return tmp_path / "log" / time.strftime("%Y-%m-%d") / name


# -- the early stop rule -----------------------------------------------------------------------------------------


def _first_stop(values: list[float], window: int) -> int | None:
    return next((n for n in range(1, len(values) + 1) if settled(values[:n], window)), None)


def test_the_stop_rule_waits_until_the_loss_has_settled() -> None:
    rng = random.Random(0)
    # A loss that falls by half and levels off (a scatter of 0.001): the rule stops once the last 5 checks vary by at
    # most 2 % of the run's variance, when most of the fall is behind, never in the first two windows.
    falling = [0.5 + 0.5 * math.exp(-i / 8) + rng.gauss(0, 0.001) for i in range(60)]
    stop = _first_stop(falling, window=5)
    assert stop is not None and stop > 10 and (falling[stop - 1] - 0.5) / 0.5 < 0.2, stop
    # A loss that only scatters has not settled by this rule (its window varies like the whole run): no stop.
    assert _first_stop([0.5 + rng.gauss(0, 0.002) for _ in range(60)], window=5) is None
    assert settled([0.5] * 9, 5) is None and settled([0.5] * 10, 5) == (0.0, 0.02)  # needs 2 windows of checks
    assert settled([0.5] * 9 + [math.nan], 5) is None  # a non-finite check never stops the run by itself


def test_automatic_interval_keeps_checks_rare_relative_to_the_work_of_the_steps() -> None:
    assert automatic_interval(1, 1) == 64 and automatic_interval(4, 1) == 16 and automatic_interval(64, 4) == 10
    # Denser with early stop: 3.75 x 8 samples' worth of pictures between checks, at least 2 steps.
    assert automatic_interval(5, 1, early_stop=True) == 6 and automatic_interval(1, 1, early_stop=True) == 30
    assert automatic_interval(64, 4, early_stop=True) == 2


# -- the loss itself ---------------------------------------------------------------------------------------------


def test_validation_loss_is_deterministic_and_moves_only_with_the_weights(tiny_model: Any, dataset: Path) -> None:
    vectors = TrainingModel(tiny_model).token_rows("triangle", 2)
    assert isinstance(vectors, torch.Tensor)
    trainable = vectors.clone()
    model = TrainingModel(tiny_model, {"toytri": trainable})
    records = read_images(dataset, width=32, height=32)
    data = TrainingDataset(records, model.encode_images, name="toytri", template_lines=["a photo of [name]"],
                           latent_sampling="random", seed=3)
    samples = ValidationSet(data, 1000, seed=3, chunk=3)
    # Timesteps stratified over the whole schedule by default (one in each eighth), over the share asked for
    # otherwise (one in each sixteenth of the noisier half).
    assert sorted(int(t) * 8 // 1000 for c in samples.chunks for t in c.timesteps) == list(range(8))
    noisier = ValidationSet(data, 1000, seed=3, chunk=3, noise_levels=(0.5, 1.0))
    assert sorted(int(t) * 16 // 1000 for c in noisier.chunks for t in c.timesteps) == list(range(8, 16))
    first = samples.loss(model)
    torch.randn(100)  # the global random state does not enter it
    assert samples.loss(model) == first
    # Another set of the same pictures and seed computes the very same value, in other chunks to within rounding.
    assert ValidationSet(data, 1000, seed=3, chunk=3).loss(model) == first
    assert math.isclose(ValidationSet(data, 1000, seed=3, chunk=8).loss(model), first, rel_tol=1e-5)
    with torch.no_grad():
        trainable.add_(torch.randn(trainable.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    moved = samples.loss(model)
    assert abs(moved - first) > 1e-6 * first
    assert ValidationSet(data, 1000, seed=4, chunk=3).loss(model) != moved


# -- runs --------------------------------------------------------------------------------------------------------


def test_best_file_holds_the_weights_of_the_best_step(tiny_model: Any, dataset: Path, tmp_path: Path) -> None:
    path = _new_embedding(tiny_model, tmp_path / "emb")
    start = load_embedding(path).tensor()
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=6, save_every=1),
                                  embeddings_dir=tmp_path / "emb"))
    steps = [e for e in events if e.kind == "step"]
    assert all(e.val_loss is not None for e in steps)
    assert [row[0] for row in steps[0].history] == [0] and all(not e.history for e in steps[1:])
    checks = [(0, steps[0].history[0][2])] + [(e.step, e.val_loss) for e in steps]
    best_step, best_loss = min(checks, key=lambda check: check[1])  # type: ignore[arg-type,return-value]
    copies = _run_folder(tmp_path) / "embeddings"
    best = load_embedding(copies / "toytri-best.pt")
    expected = start if best_step == 0 else load_embedding(copies / f"toytri-{best_step}.pt").tensor()
    assert best.step == best_step and torch.equal(best.tensor(), expected)
    # Each improvement saved it, and the event says so; the end names it.
    running = math.inf
    for event in steps:
        assert (event.best_saved is not None) == (event.val_loss < running)  # type: ignore[operator]
        running = min(running, event.val_loss)  # type: ignore[type-var]
    assert f"Best step {best_step} (validation loss {best_loss:.6f}): {copies / 'toytri-best.pt'}" in events[-1].message
    # The CSV holds the same values in its last column (the check at the start is plotted, not a row).
    rows = (_run_folder(tmp_path) / "textual_inversion_loss.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [step for step, _ in checks[1:]]
    assert [float(r.split(",")[5]) for r in rows] == pytest.approx([value for _, value in checks[1:]], abs=1e-6)


def test_early_stop_ends_a_flat_run_and_a_resumed_run_keeps_the_history(tiny_model: Any, dataset: Path,
                                                                         tmp_path: Path) -> None:
    # A learning rate of 0 keeps the weights, so the validation loss is flat: with a window of 3 checks the rule
    # needs 6 checks (steps 0..5) and stops at step 5.
    for folder in ("one", "split"):
        _new_embedding(tiny_model, tmp_path / folder)
    config = _config(dataset, tmp_path, max_steps=50, learn_rate="0", early_stop=True, early_stop_window=3)
    events = list(train_embedding(tiny_model, "toytri", config, embeddings_dir=tmp_path / "one"))
    assert [(e.kind, e.step) for e in events][-2:] == [("step", 5), ("early_stop", 5)]
    end = events[-1].message
    assert end.startswith("Training stopped early at 5 steps") and "Early stop: the validation loss has settled" in end
    assert "Best step 0" in end and load_embedding(tmp_path / "one" / "toytri.pt").step == 5
    # Interrupted at step 2 and resumed: the resumed run continues the history instead of starting it again.
    stop = threading.Event()
    first = []
    for event in train_embedding(tiny_model, "toytri", config, embeddings_dir=tmp_path / "split", stop=stop):
        first.append(event)
        if event.step == 2:
            stop.set()
    assert first[-1].kind == "interrupted"
    resumed = list(train_embedding(tiny_model, "toytri", config, embeddings_dir=tmp_path / "split"))
    assert [(e.kind, e.step) for e in resumed] == [("step", 3), ("step", 4), ("step", 5), ("early_stop", 5)]
    assert "Best step 0" in resumed[-1].message
    # The resumed run's first event carries the earlier rows, for the Train tab's plot.
    assert [(step, value is not None) for step, _, value in resumed[0].history] == [(1, True), (2, True)]


def test_early_stop_is_refused_without_validation(dataset: Path, tmp_path: Path) -> None:
    from sdconcepts.training.config import ConfigError

    with pytest.raises(ConfigError, match="early stop needs the validation loss"):
        _config(dataset, tmp_path, validate_every=0, early_stop=True).validated()


def test_held_out_share_validates_on_pictures_the_run_does_not_train_on(tiny_model: Any, dataset: Path,
                                                                         tmp_path: Path) -> None:
    import json

    _new_embedding(tiny_model, tmp_path / "emb")
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, max_steps=1,
                                                                validation_share=0.25), embeddings_dir=tmp_path / "emb"))
    assert events[0].val_loss is not None
    settings = json.loads(next(_run_folder(tmp_path).glob("settings-*.json")).read_text())
    assert settings["num_of_dataset_images"] == 3
    with pytest.raises(TrainingError, match="leaves none to train on"):
        list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, validation_share=0.9),
                             embeddings_dir=tmp_path / "emb"))


def test_hypernetwork_validation_runs_without_dropout_and_saves_the_best(tiny_model: Any, dataset: Path,
                                                                          tmp_path: Path) -> None:
    create_hypernetwork_file(tmp_path, "drop", widths=(48, 32, 64), seed=1, use_dropout=True,
                             dropout_structure=[0, 0.5, 0])
    config = HypernetworkTrainingConfig(dataset=str(dataset), template="filewords", width=32, height=32, max_steps=2,
                                        save_every=0, preview_every=0, learn_rate="0", validate_every=1,
                                        log_directory=str(tmp_path / "log"))
    events = list(train_hypernetwork(tiny_model, "drop", config, hypernetworks_dir=tmp_path))
    values = [events[0].history[0][2], *(e.val_loss for e in events if e.kind == "step")]
    assert values[0] is not None and values == [values[0]] * 3  # weights unchanged, dropout off: the same value
    best = load_hypernetwork(_run_folder(tmp_path, "drop") / "hypernetworks" / "drop-best.pt")
    assert best.step == 0 and "drop-best.pt" in events[-1].message


def test_sdxl_embedding_best_file_is_an_sdxl_embedding(tiny_sdxl: Any, dataset: Path, tmp_path: Path) -> None:
    path = _new_embedding(tiny_sdxl, tmp_path / "emb")
    events = list(train_embedding(tiny_sdxl, "toytri", _config(dataset, tmp_path, max_steps=2, width=16, height=16),
                                  embeddings_dir=tmp_path / "emb"))
    assert all(e.val_loss is not None for e in events if e.kind == "step")
    best = load_embedding(_run_folder(tmp_path) / "embeddings" / f"toytri-best{path.suffix}")
    assert best.is_sdxl and best.vector_count == 2


def test_loss_log_adds_the_validation_column_to_an_a1111_csv(tmp_path: Path) -> None:
    csv = tmp_path / "textual_inversion_loss.csv"
    csv.write_text("step,epoch,epoch_step,loss,learn_rate\n1,0,0,0.5000000,0.005\n2,0,1,0.4000000,0.005\n")
    log = LossLog(csv, resume_step=2)
    log.add(3, 0, 2, 0.3, 0.005, 0.25)
    assert csv.read_text().splitlines() == ["step,epoch,epoch_step,loss,learn_rate,val_loss",
                                            "1,0,0,0.5000000,0.005,", "2,0,1,0.4000000,0.005,",
                                            "3,0,2,0.3000000,0.005,0.2500000"]
    assert LossLog(csv).history() == [(1, 0.5, None), (2, 0.4, None), (3, 0.3, 0.25)]


def test_the_bench_replay_of_a_dense_validation_curve_gives_the_real_early_stop(tiny_model: Any, dataset: Path,
                                                                                tmp_path: Path) -> None:
    # bench/bench_early_stop_rules.py chooses stop rules by replaying the checks of an every-step validation curve;
    # that is only sound if the validation draws nothing from training's randomness (one trajectory with and without
    # checks) and the replay's checks fall on the steps a real run checks.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_early_stop_rules as rules

    for folder in ("dense", "stop"):
        _new_embedding(tiny_model, tmp_path / folder)
    # Learning for 6 steps, then a rate of 0: a falling curve that goes flat, so the rule stops at a later check
    # than its first possible one. The dense run checks every step on the early stop's samples (early stop on, with
    # a window too long to stop it).
    fields: dict[str, Any] = {"max_steps": 12, "learn_rate": "0.05:6, 0"}
    dense = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, **fields, early_stop=True,
                                                               early_stop_window=50),
                                 embeddings_dir=tmp_path / "dense"))
    assert dense[-1].kind != "early_stop"
    curve = [dense[0].history[0][2], *(e.val_loss for e in dense if e.kind == "step")]
    every, window = 2, 2
    replayed = rules.stop_step(curve, every, rules.shipped_rule(window))
    events = list(train_embedding(tiny_model, "toytri", _config(dataset, tmp_path, **fields, validate_every=every,
                                                                early_stop=True, early_stop_window=window),
                                  embeddings_dir=tmp_path / "stop"))
    real = events[-1].step if events[-1].kind == "early_stop" else None
    assert real is not None and real > (2 * window - 1) * every and replayed == real, (replayed, real, curve)
    checked = [e.val_loss for e in events if e.kind == "step" and e.val_loss is not None]
    assert checked == pytest.approx([curve[step] for step in range(every, real + 1, every)], rel=1e-6)


def test_the_bench_parameter_signals_read_adams_state_and_tell_a_drift_from_a_random_walk() -> None:
    # bench/bench_early_stop_rules.py recovers each step's gradient from AdamW's first moment and computes its
    # signals from the recorded state: on a real AdamW (as the embedding trains: weight decay 0), a constant gradient
    # direction is coherent and drifts, independent gradients are a random walk (coherence about 1/sqrt(8)).
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_early_stop_rules as rules

    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(48, generator=generator)
    for kind in ("drift", "walk"):
        vectors = torch.zeros(48, requires_grad=True)
        optimizer = torch.optim.AdamW([vectors], lr=0.01, weight_decay=0.0)
        state: dict[str, list[list[float]]] = {"vectors": [vectors.tolist()], "exp_avg": [[]], "exp_avg_sq": [[]]}
        grads = []
        for _ in range(40):
            noise = torch.randn(48, generator=generator)
            vectors.grad = (direction + 0.3 * noise) if kind == "drift" else noise
            grads.append(vectors.grad.clone())
            optimizer.step()
            moments = optimizer.state[vectors]
            state["vectors"].append(vectors.tolist())
            state["exp_avg"].append(moments["exp_avg"].tolist())
            state["exp_avg_sq"].append(moments["exp_avg_sq"].tolist())
        signals = rules.parameter_signals({"state": state})
        late = signals["coherence"][10:]
        if kind == "drift":
            assert min(late) > 0.9 and min(signals["drift"][10:]) > 0.9 and min(signals["pflug"][11:]) > 0
        else:
            assert 0.2 < statistics.mean(late) < 0.5, statistics.mean(late)
    # The gradients come back from the moments (the recovery the signals rest on).
    m = torch.tensor(state["exp_avg"][1:])
    recovered = torch.cat([m[:1], m[1:] - 0.9 * m[:-1]]) / 0.1
    assert torch.allclose(recovered, torch.stack(grads), atol=1e-4)
