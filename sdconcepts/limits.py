"""Size limits and memory estimates: a request that cannot fit is refused before anything big is allocated.

Two independent guards. The *limits* are the web UI's slider maxima (width/height 2048, batch size 8, batch count
100) and a few more for training and hypernetwork creation; they apply on the command line too unless the user
passes ``--no-size-limits``. The *memory check* always applies: it compares a lower-bound estimate of what a request
allocates with the memory available on its device (for the CPU the least of ``MemAvailable`` from ``/proc/meminfo``,
the cgroup's memory limit and the process's rlimits; ``torch.cuda.mem_get_info`` for CUDA) and is skipped where that
is unknown. The estimates count only tensors that must exist at the same time, so a refusal means the request cannot
run; passing the check does not promise it will.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = [
    "MAX_BATCH_COUNT",
    "MAX_BATCH_SIZE",
    "MAX_GRADIENT_ACCUMULATION",
    "MAX_HYPERNETWORK_BYTES",
    "MAX_IMAGE_SIDE",
    "MAX_INFOTEXT_CHARS",
    "MAX_JSON_DEPTH",
    "MAX_LAYER_FACTOR",
    "MAX_MASK_BLUR",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_CHUNKS",
    "MAX_SCAN_ENTRIES",
    "MAX_SOURCE_PIXELS",
    "MAX_TRAIN_BATCH_SIZE",
    "available_memory",
    "format_bytes",
    "generation_bytes",
    "hypernetwork_parameters",
    "memory_problem",
    "training_bytes",
]

# The web UI's slider maxima (ui/app.py, ui/train_tab.py): one set of limits for every entry point.
MAX_IMAGE_SIDE = 2048
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 100
# Training: the batch is also clamped to the dataset size (as A1111 does); 64 images of 512x512 already need tens of
# GB of activations. Gradient accumulation costs time, not memory; 1000 is far beyond any useful value.
MAX_TRAIN_BATCH_SIZE = 64
MAX_GRADIENT_ACCUMULATION = 1000
# A hypernetwork's hidden layers are width * factor wide; A1111's examples use 1-4 ("1, 2, 1", "1, 1.5, 1.5, 1").
# 16 keeps every sensible structure and refuses the "1, 100000, 1" kind that writes gigabytes.
MAX_LAYER_FACTOR = 16.0
# 1 GiB: "1, 16, 1" on A1111's default widths (768, 320, 640, 1280) is about 0.65 GiB.
MAX_HYPERNETWORK_BYTES = 1 << 30
# Source images for preprocessing and training are decoded only below PIL's own decompression-bomb threshold
# (about 89.5 megapixels, a 9459 x 9459 image); the size is read from the file header first.
MAX_SOURCE_PIXELS = 89_478_485
# Prompts and captions: A1111 reads any length, but every 75 tokens are one more text-encoder pass and one more
# 77-token block every attention layer reads at every step. 32768 characters are a few thousand tokens, far beyond
# any prompt written by hand; 64 chunks (4800 tokens) bound what BREAK can make of them. Checked before tokenizing.
MAX_PROMPT_CHARS = 32_768
MAX_PROMPT_CHUNKS = 64
# An infotext holds two prompts and a line of fields: a longer one (PNG Info reads any file) was not written by us.
MAX_INFOTEXT_CHARS = 2 * MAX_PROMPT_CHARS + 16_384
# A1111's mask blur slider ends at 64; a larger sigma costs time in the kernel's length (5 sigma) per pixel.
MAX_MASK_BLUR = 64
# A library folder scan (embeddings, hypernetworks) stops after this many directory entries: tens of thousands of
# files are a big library, a million entries are a disk reached through a link.
MAX_SCAN_ENTRIES = 200_000
# JSON we read (user metadata, the hash cache) is a few levels deep; deeper nesting is refused, never recursed into.
MAX_JSON_DEPTH = 64

# Live activations per latent pixel, in units of the UNet's first block width (a conv input, its output and the
# residual: a lower bound), and at full resolution in units of the VAE decoder's last block width.
_UNET_LIVE_TENSORS = 3
_UNET_TRAINING_TENSORS = 8  # activations kept for backward: a ResNet block and an attention block per level, at least
_VAE_LIVE_TENSORS = 2


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("MemAvailable:"):
                parts = line.split()
                return int(parts[1]) * 1024 if parts[2:3] == ["kB"] else int(parts[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


_CGROUP_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def _read_number(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
        return int(text) if text != "max" else None
    except (OSError, ValueError):
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_available(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """Bytes left under the memory limit of this process's cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)
    and of every cgroup above it, or None when none is limited. A container's limit is not in ``MemAvailable``.

    Usage counts the page cache; its inactive part (``inactive_file``) is reclaimed before the limit bites, so it
    counts as available, as ``docker stats`` counts it.
    """
    try:
        lines = membership.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    best: int | None = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            names = ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            base = root / "memory"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        # The group and its ancestors (each limit applies); in a container's namespace the group's own folder may
        # be the mount's root, which the walk reaches too.
        folder = base / group.strip("/")
        for place in (folder, *folder.parents):
            if not place.is_relative_to(base):
                break
            limit = _read_number(place / names[0])
            if limit is None or limit >= _CGROUP_UNLIMITED:
                continue
            used = (_read_number(place / names[1]) or 0) - _stat_value(place / "memory.stat", names[2])
            free = max(0, limit - max(0, used))
            best = free if best is None else min(best, free)
    return best


def _rlimit_available(status: Path = Path("/proc/self/status")) -> int | None:
    """Bytes this process may still map under its ``RLIMIT_AS`` (address space, against ``VmSize``) and
    ``RLIMIT_DATA`` (private writable memory, against ``VmData``), or None when neither is set (``ulimit -v``)."""
    try:
        import resource  # lazy: Unix only
    except ImportError:
        return None
    try:
        fields = {
            name: int(value.split()[0]) * 1024
            for name, _, value in (line.partition(":") for line in status.read_text(encoding="ascii").splitlines())
            if name in ("VmSize", "VmData")
        }
    except (OSError, ValueError, IndexError):
        fields = {}
    best: int | None = None
    for limit_kind, field in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _hard = resource.getrlimit(limit_kind)
        if soft == resource.RLIM_INFINITY or soft < 0:
            continue
        free = max(0, soft - fields.get(field, 0))
        best = free if best is None else min(best, free)
    return best


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free on ``device`` now, or None when unknown (then the memory check is skipped).

    On the CPU the smallest of ``MemAvailable``, what the cgroup's limit leaves (a container) and what the process's
    rlimits leave (``ulimit -v``/``-d``): a request that passed ``MemAvailable`` under a 2 GiB container failed to
    allocate with a traceback.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            free, _total = torch.cuda.mem_get_info(dev)
        except (RuntimeError, AssertionError, ValueError):
            return None
        return int(free)
    if dev.type == "cpu":
        known = [n for n in (_meminfo_available(), _cgroup_available(), _rlimit_available()) if n is not None]
        return min(known) if known else None
    return None


def memory_problem(needed: int, device: torch.device | str, what: str, *, host_bytes: int = 0) -> str | None:
    """A one-line refusal when ``needed`` bytes exceed the memory available on ``device`` (or, for a GPU,
    ``host_bytes`` exceed the CPU's), else None. On the CPU both counts add up."""
    dev = torch.device(device)
    checks = [(dev, needed + host_bytes)] if dev.type == "cpu" else [(dev, needed), (torch.device("cpu"), host_bytes)]
    for where, count in checks:
        free = available_memory(where)
        if free is None or count <= free:
            continue
        label = "GPU memory" if where.type == "cuda" else "memory"
        return (f"{what} needs at least {format_bytes(count)} of {label}, but only {format_bytes(free)} is "
                "available; use a smaller size or batch")
    return None


def generation_bytes(
    *,
    batch: int,
    images_total: int,
    width: int,
    height: int,
    latent_scale: int,
    latent_channels: int,
    unet_channels: int,
    vae_channels: int,
    dtype_bytes: int,
    guided: bool,
    attention_heads: int = 0,
) -> tuple[int, int]:
    """Lower bounds of the memory txt2img holds at its peak, as (on the model's device, on the CPU).

    On the device: the noise, then the larger of the UNet's activations at the first level (the batch doubled by
    classifier-free guidance) and the VAE decoder's at full resolution. On the CPU: the noise (drawn there in
    float32, as A1111 seeds it), a batch's float32 pixels and every finished image.
    ``attention_heads`` > 0 adds the largest self-attention's score map, ``(h/8 * w/8)^2 * heads * batch``, for
    attention code that materialises it (scaled-dot-product kernels work in tiles and need not).
    """
    latent_pixels = (height // latent_scale) * (width // latent_scale)
    pixels = width * height
    unet_batch = batch * (2 if guided else 1)
    noise = batch * latent_channels * latent_pixels * 4
    unet = unet_batch * latent_pixels * unet_channels * dtype_bytes * _UNET_LIVE_TENSORS
    unet += unet_batch * attention_heads * latent_pixels * latent_pixels * dtype_bytes
    vae = batch * pixels * vae_channels * dtype_bytes * _VAE_LIVE_TENSORS
    images = images_total * pixels * 3 + batch * pixels * 3 * 4
    return noise + max(unet, vae), noise + images


def training_bytes(
    *,
    batch: int,
    images: int,
    width: int,
    height: int,
    latent_scale: int,
    unet_channels: int,
    vae_channels: int,
    dtype_bytes: int,
) -> tuple[int, int]:
    """Lower bounds of a training run's memory, as (on the model's device, on the CPU): on the device the larger of
    one image through the VAE encoder and the UNet activations of one micro-batch kept for the backward pass; on the
    CPU the dataset's pixels (float32, every image kept)."""
    latent_pixels = (height // latent_scale) * (width // latent_scale)
    dataset = images * 3 * width * height * 4
    vae = width * height * vae_channels * dtype_bytes * _VAE_LIVE_TENSORS
    unet = batch * latent_pixels * unet_channels * dtype_bytes * _UNET_TRAINING_TENSORS
    return max(vae, unet), dataset


def hypernetwork_parameters(widths: Sequence[int], layer_structure: Sequence[float], *, layer_norm: bool) -> int:
    """The parameter count of a hypernetwork: per width a (key, value) pair of MLPs with A1111's layer sizes."""
    total = 0
    for width in widths:
        sizes = [int(width * factor) for factor in layer_structure]
        per_module = sum(a * b + b for a, b in zip(sizes, sizes[1:], strict=False))
        if layer_norm:
            per_module += sum(2 * b for b in sizes[1:])
        total += 2 * per_module
    return total
