"""The ``toyworld`` command: train, eval, concept, score, showcase (and train-probe), wired into an argparse parser.

The toy-world model code (diffusers) is imported inside the handlers so that building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdconcepts.toyworld import probe, world
from sdconcepts.toyworld.concept import load_images, write_concept
from sdconcepts.toyworld.evaluate import evaluate, format_report
from sdconcepts.toyworld.probe import score

log = logging.getLogger(__name__)


class UsageError(Exception):
    """A user mistake: reported as one line on stderr with exit code 2."""


def _guard(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (UsageError, ValueError, FileNotFoundError) as error:
            print(f"sdconcepts toyworld: error: {error}", file=sys.stderr)
            return 2

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def parse_expect(text: str) -> dict[str, str]:
    """Parse ``shape=triangle,colour=yellow`` into a dict, validating names and values."""
    expect: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name == "color":
            name = "colour"
        if not sep or not value:
            raise UsageError(f"bad --expect item {part!r}; expected NAME=VALUE, e.g. shape=triangle")
        if name not in world.ATTRIBUTES:
            raise UsageError(f"unknown attribute {name!r} in --expect; expected one of {', '.join(world.ATTRIBUTES)}")
        if value not in world.ATTRIBUTES[name]:
            raise UsageError(
                f"unknown {name} {value!r} in --expect; expected one of {', '.join(world.ATTRIBUTES[name])}"
            )
        expect[name] = value
    if not expect:
        raise UsageError("--expect names no attribute; e.g. --expect shape=triangle,colour=yellow")
    return expect


@_guard
def cmd_train(args: argparse.Namespace) -> int:
    """Train the toy-world model from scratch and write a diffusers folder."""
    from sdconcepts.toyworld import models  # lazy: diffusers
    from sdconcepts.toyworld.model_training import TrainConfig, train  # lazy: diffusers

    config = TrainConfig(
        seed=args.seed,
        threads=args.threads,
        vae_steps=args.vae_steps,
        steps=args.steps,
        batch=args.batch,
        save_every=args.save_every,
        device=args.device,
        init=args.init or "",
        family=args.family,
        teacher=args.teacher or "",
        vae=args.vae or (str(models.MODEL_DIR) if args.family == "sdxl" and not args.init else ""),
    )
    summary = train(config, Path(args.out))
    print(json.dumps(summary, indent=2))
    return 0


@_guard
def cmd_train_probe(args: argparse.Namespace) -> int:
    """Train the probe classifier and write it to the package assets."""
    accuracy = probe.main(steps=args.steps, seed=args.seed, threads=args.threads)
    print(json.dumps({"held_out_accuracy": accuracy}, indent=2))
    return 0


@_guard
def cmd_eval(args: argparse.Namespace) -> int:
    """Generate from random prompts and score colour, shape and background through the probe."""
    model = Path(args.model) if args.model else None
    if args.model == "toyworld-xl" and model is not None and not model.exists():
        from sdconcepts.toyworld.models import XL_MODEL_DIR  # lazy: diffusers

        model = XL_MODEL_DIR
    if model is not None and not (model / "model_index.json").is_file():
        raise UsageError(f"{model} is not a diffusers model folder (no model_index.json)")
    if args.samples < 1:
        raise UsageError("--samples must be at least 1")
    report = evaluate(
        model, samples=args.samples, seed=args.seed, steps=args.steps, guidance=args.guidance, sampler=args.sampler
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


@_guard
def cmd_concept(args: argparse.Namespace) -> int:
    """Write concept training images with captions that never name the fixed attributes."""
    fixed = {"shape": args.shape, "colour": args.colour, "background": args.background}
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    paths = write_concept(Path(args.out), count=args.count, seed=args.seed, **fixed)
    print(f"wrote {len(paths)} images to {args.out}")
    return 0


@_guard
def cmd_score(args: argparse.Namespace) -> int:
    """Report the hit rate of each expected attribute over a folder of images."""
    expect = parse_expect(args.expect)
    folder = Path(args.dir)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    images = load_images(folder)
    if not images:
        raise UsageError(f"no images (.png, .jpg, .webp) in {folder}")
    rates = score(images, expect)
    if args.json:
        print(json.dumps({"images": len(images), "expect": expect, "hit_rate": rates}, indent=2))
    else:
        print(f"{len(images)} images")
        for name, rate in rates.items():
            print(f"{name:<10} {expect[name]:<8} {rate:6.1%}")
    return 0


@_guard
def cmd_showcase(args: argparse.Namespace) -> int:
    """Train words and a hypernetwork on an embedded model, measure the six uses and write the showcase folder."""
    from sdconcepts.showcase.run import run_showcase  # lazy: torch, diffusers

    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} exists and is not a folder")
    figures = run_showcase(output, model_name=args.model, report=print)
    print(f"wrote {output / 'index.html'} and {output / 'README.md'} ({figures['run']['seconds']:.0f} s); "
          + ("every bar passed" if figures["passed"] else "some bars FAILED (see figures.json)"))
    return 0


def add_toyworld_parser(subparsers: Any) -> None:
    """Add the ``toyworld`` command and its sub-commands to an argparse ``subparsers`` object."""
    toy = subparsers.add_parser("toyworld", help="the embedded toy-world model: train, evaluate, concept images")
    sub = toy.add_subparsers(dest="toyworld_command", required=True)

    p = sub.add_parser("train", help="train the toy-world model from scratch on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="toyworld-model", help="output diffusers folder (default: ./toyworld-model)")
    p.add_argument("--steps", type=int, default=3000, help="UNet + text encoder steps (default 3000)")
    p.add_argument("--vae-steps", type=int, default=1200, help="VAE steps (default 1200)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads; results are deterministic per count")
    p.add_argument("--save-every", type=int, default=0, help="also save EMA snapshots every N steps (OUT-stepN)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; the shipped weights are CPU-trained)")
    p.add_argument("--init", default=None, help="continue training from this diffusers folder (keeps its VAE)")
    p.add_argument("--family", choices=("sd1", "sdxl"), default="sd1",
                   help="model layout (default sd1; sdxl: two text encoders and SDXL's added conditioning)")
    p.add_argument("--vae", default=None,
                   help="take the VAE from this diffusers folder and skip the VAE stage (default for sdxl: the "
                        "shipped SD-1 toy-world model's VAE, trained on the same world)")
    p.add_argument("--teacher", default=None,
                   help="distil: train the UNet to predict this diffusers folder's noise prediction (a model with "
                        "the same VAE, e.g. the shipped SD-1 toy-world model) instead of the drawn noise")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-probe", help="train the probe classifier into the package assets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_train_probe)

    p = sub.add_parser("eval", help="score generations from random prompts through the probe")
    p.add_argument("--samples", type=int, default=240)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="DDIM")
    p.add_argument("--model", default=None, help="diffusers folder, or toyworld-xl for the shipped SDXL-layout one (default: the shipped "
                   "SD-1 toy-world model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("concept", help="write concept images whose captions omit the fixed attributes")
    p.add_argument("--shape", choices=world.SHAPES)
    p.add_argument("--colour", "--color", dest="colour", choices=tuple(world.COLOURS))
    p.add_argument("--background", choices=tuple(world.BACKGROUNDS))
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_concept)

    p = sub.add_parser("showcase", help="the six uses of textual inversion: train, measure, write grids and pages")
    p.add_argument("--output", required=True, help="the folder to write (figures.json, index.html, README.md, grids, "
                   "and the learned embeddings and hypernetwork)")
    p.add_argument("--model", choices=("toyworld", "toyworld-xl"), default="toyworld",
                   help="the embedded model (default toyworld, the SD-1 one)")
    p.set_defaults(func=cmd_showcase)

    p = sub.add_parser("score", help="hit rate of each expected attribute over a folder of images")
    p.add_argument("dir")
    p.add_argument("--expect", required=True, help="e.g. shape=triangle,colour=yellow,background=navy")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_score)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``toyworld`` on its own (until the main CLI wires it in)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m sdconcepts.toyworld")
    add_toyworld_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["toyworld", *(argv if argv is not None else sys.argv[1:])])
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
