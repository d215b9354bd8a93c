"""Benchmark: what the validation loss costs a training run at default settings (issue #27: at most 10 %).

An embedding is trained on the embedded toy-world model (or ``--ckpt``) at its own size on 5 toy-world pictures with
the defaults (learning rate, template, the automatic validation interval), at batch 1 and batch 4. Two figures per
batch size, each within one run:

- ``share``: the CPU time spent in validation checks (``ValidationSet.loss`` timed from outside) over the CPU time
  of the whole run with validation on, start-up excluded (the run's own steps and checks only);
- ``on/off``: the CPU time of the same run with validation on over the run with it off (``--validate-every 0``),
  interleaved (on, off, on, off, ...) so that a busy machine slows both alike; medians.

CPU time of this process (``time.process_time``), one thread unless ``--threads``. The machine may be shared: the
ratios are what to read, absolute times only context.

Usage: ``python bench/bench_validation.py [--steps 240] [--rounds 3] [--batches 1,4] [--threads 1] [--ckpt PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run(model: Any, data: Path, work: Path, batch: int, steps: int, validate_every: int) -> tuple[float, float, int]:
    """(CPU seconds of the run's steps, CPU seconds in checks, checks) for one fresh embedding."""
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding, validation
    from sdconcepts.training.training_model import TrainingModel

    folder = Path(tempfile.mkdtemp(dir=work))
    create_embedding_file(folder, "toy", TrainingModel(model).token_rows("shape", 2), vectors=2)
    config = EmbeddingTrainingConfig(dataset=str(data), template="subject", width=model.default_size,
                                     height=model.default_size, batch_size=batch, max_steps=steps, save_every=0,
                                     preview_every=0, log_directory=str(folder / "log"), validate_every=validate_every)
    spent = [0.0, 0]
    original = validation.ValidationSet.loss

    def timed(self: Any, target: Any) -> float:
        start = time.process_time()
        try:
            return original(self, target)
        finally:
            spent[0] += time.process_time() - start
            spent[1] += 1

    validation.ValidationSet.loss = timed  # type: ignore[method-assign]
    try:
        events = train_embedding(model, "toy", config, embeddings_dir=folder)
        first = next(events)  # the dataset encoded and the first step (and the start check) done
        start = time.process_time()
        checks_before = spent[0]
        for _ in events:
            pass
        total = time.process_time() - start
    finally:
        validation.ValidationSet.loss = original  # type: ignore[method-assign]
    assert first.kind == "step"
    return total, spent[0] - checks_before, int(spent[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()

    import torch

    from sdconcepts.backends.model_loading import load_model
    from sdconcepts.toyworld.concept import write_concept
    from sdconcepts.training.validation import automatic_interval

    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt, device="cpu")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        write_concept(data, count=5, seed=3, shape="triangle", colour="yellow")
        for batch in (int(b) for b in args.batches.split(",")):
            on, off, shares, checks = [], [], [], 0
            for _ in range(args.rounds):
                total, in_checks, checks = _run(model, data, work, batch, args.steps, -1)
                on.append(total)
                shares.append(in_checks / total)
                off.append(_run(model, data, work, batch, args.steps, 0)[0])
            row = {"model": model.name, "size": model.default_size, "batch": batch, "steps": args.steps,
                   "every": automatic_interval(batch, 1), "checks": checks,
                   "share": statistics.median(shares), "on_over_off": statistics.median(on) / statistics.median(off),
                   "cpu_s_on": statistics.median(on), "cpu_s_off": statistics.median(off)}
            results.append(row)
            print(f"batch {batch}: every {row['every']} steps, {checks} checks in {args.steps - 1} steps: "
                  f"{row['share']:.1%} of the run's CPU time in checks; on/off {row['on_over_off']:.3f} "
                  f"({row['cpu_s_on']:.1f} vs {row['cpu_s_off']:.1f} CPU-s)", flush=True)
    print(json.dumps({"load_average": os.getloadavg(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
