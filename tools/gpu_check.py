"""The GPU check (issue 27 item 5), run by ``tools/gpu_check.sh``: everything a CUDA machine should show, one table.

On CUDA (the default where torch sees a GPU), in float16 with random full-size weights built on the GPU (nothing
downloaded; ``backends.tiny.build_reference_random``):

- ``txt2img``: one SD 1.5-shaped image at 512 px and one SDXL-shaped image at 1024 px (20 steps Euler a, CFG 7),
  each prompt with a trained-embedding word and a hypernetwork tag (random vectors and a random A1111 hypernetwork),
  through the product's ``txt2img``;
- ``train``: textual inversion on the SD 1.5-shaped model, 50 steps at 512 px, batch 1: diffusers' example's step
  (``bench/bench_training.py``'s faithful reimplementation), ours eager, ours with ``compile_unet`` (the first step's
  wall time, compiling included, in its own column);
- per row: wall time per image or per step (``torch.cuda.synchronize`` before each clock read), the peak memory of
  the row (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), and whether the output is finite.

``--cpu``: the same rows on the tiny test models (``build_tiny_sd1``/``build_tiny_sdxl``) at 64 px, 3 sampling and
4 training steps, in float32, peak RSS (VmHWM, reset per row through ``/proc/self/clear_refs``) instead of CUDA
memory, torch's threads as the CLI chooses them (``sdconcepts.threads``): CI runs it so that the script cannot rot.
There the compiled row runs the product's compiled path with dynamo's ``eager`` backend (the graphs captured, run
by eager kernels) instead of Inductor, whose C++ build of a UNet takes many minutes on two cores: on the shared
2-core machine at load 9 the whole ``--cpu`` run took 40 s of CPU time (3 min wall), ``aot_eager`` (AOT autograd's
backward capture too) 70 s. ``--compile-backend aot_eager|inductor`` asks for more.

Exit status 1 when a row fails (the table still prints, with the error in its note) or an output is not finite.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WORD = "gpucheck"
HYPERNETWORK = "gpucheck-hn"


@dataclass
class Row:
    part: str
    model: str
    size: int
    what: str
    seconds: float = math.nan  # per image or per step
    first_s: float = math.nan  # the first step (compiling included)
    peak_mb: float = math.nan
    finite: bool | None = None
    note: str = ""


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    sd1_size: int
    xl_size: int
    sample_steps: int
    train_steps: int
    train_size: int
    batch: int
    tiny: bool


class Memory:
    """The peak memory of one row: CUDA's allocator peak, or the process's peak RSS on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return math.nan

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def build(family: str, settings: Settings) -> Any:
    """A model with random weights on the device: the tiny test one (``--cpu``) or the full-size one."""
    from sdconcepts.backends.model_loading import model_from_components
    from sdconcepts.backends.tiny import build_reference_random, build_tiny_sd1, build_tiny_sdxl

    if settings.tiny:
        components = build_tiny_sdxl(0) if family == "sdxl" else build_tiny_sd1(0)
    else:
        with settings.device:  # initialising billions of weights on the GPU takes seconds, on a CPU minutes
            components = build_reference_random(family, seed=0, dtype=settings.dtype)
        # As tests/hosts/random_checkpoint.py: a fresh final LayerNorm makes the conditioning's mean 0, and the
        # default emphasis divides by it (SDXL reads the penultimate layer, before that norm).
        norm = getattr(components["text_encoder"], "text_model", components["text_encoder"]).final_layer_norm
        with torch.no_grad():
            norm.bias.copy_(0.25 + 0.05 * torch.randn(norm.bias.shape, generator=torch.Generator().manual_seed(1)))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = components.get(name)
        if module is not None:
            module.to(settings.device).requires_grad_(False)  # type: ignore[attr-defined]
    model = model_from_components(components, name=f"{family}-random")
    model.device = settings.device
    return model


def txt2img_row(family: str, size: int, settings: Settings, memory: Memory) -> Row:
    """One image with an embedding word and a hypernetwork tag, through the product's txt2img."""
    import numpy

    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.attach import attention_widths
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork
    from sdconcepts.hypernetworks.tags import resolve_in_memory

    row = Row("txt2img", f"{family} random", size, f"{settings.sample_steps} steps Euler a, emb + hypernet")
    model = build(family, settings)
    vectors = torch.randn(2, int(model.context_width), generator=torch.Generator().manual_seed(2)) * 0.02
    hypernetwork = create_hypernetwork(HYPERNETWORK, attention_widths(model.unet), generator_seed=3)
    hypernetwork.to(settings.device).eval()  # float32, as the library loads one (hypernetworks/library.py)
    prompt = f"a photo of {WORD} on a table <hypernet:{HYPERNETWORK}:1>"
    params = GenerationParams(
        prompt=prompt,
        negative_prompt="blurry",
        steps=settings.sample_steps,
        seed=4,
        width=size,
        height=size,
        sampler="Euler a",
        cfg_scale=7.0,
    )

    def image() -> Any:
        resolved = resolve_in_memory(prompt, {HYPERNETWORK: hypernetwork}, model.unet)
        return txt2img(
            model, params, embeddings={WORD: vectors.to(settings.device)}, hypernetworks=resolved, size_limits=False
        )

    image()  # warm-up: kernels chosen, caches filled
    memory.reset()
    start = time.perf_counter()
    result = image()
    memory.sync()
    row.seconds = time.perf_counter() - start
    row.peak_mb = memory.peak_mb()
    pixels = torch.from_numpy(numpy.asarray(result.images[0], dtype=numpy.float32))
    row.finite = bool(pixels.std() > 0)  # a NaN latent decodes to a black (constant) picture
    # The infotext keeps a hypernetwork's tag only when it was loaded and applied; a warning names what was not.
    problems = [w for w in result.warnings if WORD in w or HYPERNETWORK in w]
    if f"<hypernet:{HYPERNETWORK}:1>" not in result.infotexts[0]:
        problems.append("the hypernetwork's tag is not in the infotext")
    row.note = "; ".join(problems) if problems else "embedding and hypernetwork applied"
    if problems:
        row.finite = False
    return row


def _data(folder: Path, size: int) -> Path:
    from bench_training import make_images

    return make_images(folder, size)


def _ours_steps(model: Any, data: Path, work: Path, settings: Settings, compile_unet: bool) -> Iterator[Any]:
    """Our training run as the CLI starts it (no saves or previews), one step event per ``next``."""
    from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
    from sdconcepts.training.training_model import TrainingModel

    rows = TrainingModel(model).token_rows("toy", 2)
    create_embedding_file(work / "embeddings", WORD, rows, vectors=2, overwrite=True)
    config = EmbeddingTrainingConfig(
        dataset=str(data),
        template="subject",
        width=settings.train_size,
        height=settings.train_size,
        batch_size=settings.batch,
        max_steps=10**9,
        save_every=0,
        preview_every=0,
        learn_rate="0.005",
        compile_unet=compile_unet,
        log_directory=str(work / "log"),
    )
    for event in train_embedding(model, WORD, config, embeddings_dir=work / "embeddings", stop=threading.Event()):
        if event.kind == "step":
            yield event
        elif event.kind != "preparing":
            raise RuntimeError(f"training ended early ({event.kind}): {event.message}")


def _timed_steps(step: Callable[[], float], count: int, memory: Memory, row: Row) -> None:
    memory.reset()
    times, losses = [], []
    for _ in range(count):
        start = time.perf_counter()
        losses.append(step())
        memory.sync()
        times.append(time.perf_counter() - start)
    row.first_s = times[0]
    row.seconds = statistics.median(times[min(2, count - 1) :])
    row.peak_mb = memory.peak_mb()
    row.finite = all(math.isfinite(v) for v in losses)


def train_rows(settings: Settings, memory: Memory) -> list[Row]:
    """TI on the SD 1.5-shaped model: the example's step, ours eager, ours compiled."""
    size, steps = settings.train_size, settings.train_steps
    what = f"TI {steps} steps, batch {settings.batch}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp) / "data", size)
        for method, label in (
            ("example", "diffusers' example"),
            ("eager", "ours eager"),
            ("compiled", "ours compiled"),
        ):
            row = Row("train", "sd1 random", size, f"{what}, {label}")
            try:
                _train_row(row, method, data, Path(tmp) / method, settings, memory)
            except Exception as exc:  # noqa: BLE001 - the row says what failed; the others still run
                row.note = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                traceback.print_exc()
            rows.append(row)
            _free(settings)
    return rows


def _train_row(row: Row, method: str, data: Path, work: Path, settings: Settings, memory: Memory) -> None:
    from bench_training import example_stepper

    model = build("sd1", settings)
    if method == "example":
        example = example_stepper(model, data, settings.train_size, settings.batch)

        def step() -> float:
            example()
            return 0.0  # the example's step returns nothing; its table is checked below

        _timed_steps(step, settings.train_steps, memory, row)
        row.finite = bool(torch.isfinite(model.text_encoder.get_input_embeddings().weight).all())
        return
    events = _ours_steps(model, data, work, settings, method == "compiled")
    _timed_steps(lambda: float(next(events).loss), settings.train_steps, memory, row)
    if method == "compiled":
        row.note = _compiled_note(model)


def _compiled_note(model: Any) -> str:
    from sdconcepts.backends.compiled import compiled_unet

    found = compiled_unet(model.unet)
    return found.fallback or "compiled"


def _free(settings: Settings) -> None:
    import gc

    gc.collect()
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()


def print_table(rows: list[Row], settings: Settings, memory_name: str) -> None:
    device = torch.cuda.get_device_name(settings.device) if settings.device.type == "cuda" else "CPU"
    print(
        f"\n== GPU check: torch {torch.__version__}, {device}, {str(settings.dtype).replace('torch.', '')}"
        f"{' (tiny models: --cpu)' if settings.tiny else ''}"
    )
    header = f"{'part':8s} {'model':12s} {'px':>5s} {'s/item':>8s} {'first s':>8s} {memory_name:>12s} {'finite':>6s}  what; note"
    print(header)
    print("-" * len(header))
    for r in rows:
        finite = "-" if r.finite is None else ("yes" if r.finite else "NO")
        first = "" if math.isnan(r.first_s) else f"{r.first_s:8.2f}"
        print(
            f"{r.part:8s} {r.model:12s} {r.size:5d} {r.seconds:8.3f} {first:>8s} {r.peak_mb:12.0f} {finite:>6s}  "
            f"{r.what}; {r.note}"
        )
    ex, eager, compiled = (
        [r for r in rows if r.part == "train" and r.what.endswith(k)] for k in ("example", "eager", "compiled")
    )
    if ex and eager and compiled and eager[0].seconds > 0:
        print(
            f"training step: example / ours eager {ex[0].seconds / eager[0].seconds:.2f}x, "
            f"ours compiled / ours eager {compiled[0].seconds / eager[0].seconds:.2f}x"
        )


def settings_from(args: argparse.Namespace) -> Settings:
    cuda = not args.cpu and torch.cuda.is_available()
    if not cuda and not args.cpu:
        raise SystemExit("gpu_check: torch sees no CUDA device here; run with --cpu for the CPU check")
    if args.cpu:
        return Settings(
            torch.device("cpu"), torch.float32, 64, 64, args.sample_steps or 3, args.train_steps or 4, 64, 1, tiny=True
        )
    return Settings(
        torch.device("cuda"),
        torch.float16,
        512,
        1024,
        args.sample_steps or 20,
        args.train_steps or 50,
        args.train_size,
        args.batch,
        tiny=False,
    )


def use_compile_backend(backend: str) -> None:
    """Make ``torch.compile`` (as the product calls it) use ``backend`` instead of the product's own (Inductor, after
    its CPU rewrite of wide convolutions: ``sdconcepts.backends.compiled``)."""
    if backend == "inductor":
        return
    original = torch.compile

    def compile_with(model: Any = None, **kwargs: Any) -> Any:
        kwargs["backend"] = backend
        return original(model, **kwargs)

    torch.compile = compile_with  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU (what CI runs)")
    parser.add_argument("--parts", default="txt2img,train")
    parser.add_argument("--sample-steps", type=int, default=0, help="default: 20 (CUDA), 3 (--cpu)")
    parser.add_argument("--train-steps", type=int, default=0, help="default: 50 (CUDA), 4 (--cpu)")
    parser.add_argument("--train-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--compile-backend", default=None, help="default: inductor (CUDA), eager (--cpu)")
    args = parser.parse_args()
    settings = settings_from(args)
    use_compile_backend(args.compile_backend or ("eager" if args.cpu else "inductor"))
    if settings.device.type == "cpu":
        from sdconcepts.threads import apply_threads

        apply_threads()  # the CLI's choice: the free cores (on a busy machine more threads wait for each other)
    memory = Memory(settings.device)
    rows: list[Row] = []
    started = time.perf_counter()
    parts = args.parts.split(",")
    if "txt2img" in parts:
        for family, size in (("sd1", settings.sd1_size), ("sdxl", settings.xl_size)):
            try:
                rows.append(txt2img_row(family, size, settings, memory))
            except Exception as exc:  # noqa: BLE001 - the row says what failed; the others still run
                traceback.print_exc()
                rows.append(Row("txt2img", f"{family} random", size, "", note=f"FAILED: {type(exc).__name__}: {exc}"))
            _free(settings)
    if "train" in parts:
        rows.extend(train_rows(settings, memory))
    print_table(rows, settings, "peak MB CUDA" if settings.device.type == "cuda" else "peak RSS MB")
    print(f"total {time.perf_counter() - started:.0f} s")
    failed = [r for r in rows if r.note.startswith("FAILED") or r.finite is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
