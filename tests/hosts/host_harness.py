"""Start the real A1111 1.10.1 / Forge / reForge / Forge-Classic trees prepared by tools/host_tests.sh and talk to them (stdlib HTTP only).

The trees come from the host kit (``../shared/hosts``: prepare.sh, launch.sh, stop.sh); this module launches them
with ``--api`` (never ``--ui-debug-mode``: that mode skips the host's own extra-network pages), with the random
SD 1.5 test checkpoint symlinked into ``models/Stable-diffusion`` and the test hypernetworks in
``models/hypernetworks``, and keeps at most one host running at a time (each holds a ~4.3 GB fp32 model; the
machine is shared).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

KINDS = ("a1111", "forge", "reforge", "classic")
ENV_DIRS = {kind: f"SDCONCEPTS_{kind.upper()}_DIR" for kind in KINDS}
# Forge-Classic's --embeddings-dir default is models/embeddings (the others: embeddings/).
EMBEDDINGS_DIRS = {"classic": ("models", "embeddings")}
ENV_KIT = "SDCONCEPTS_HOST_KIT"
ENV_CHECKPOINT = "SDCONCEPTS_HOST_CHECKPOINT"
ENV_CHECKPOINT_SD2 = "SDCONCEPTS_HOST_CHECKPOINT_SD2"
ENV_REQUIRED = "SDCONCEPTS_HOSTS_REQUIRED"
CHECKPOINT_NAME = "sd15-random"

# A small, fast request: 64x64 (8x8 latents), 2 Euler steps. Tests override any field.
DEFAULT_TXT2IMG: dict[str, Any] = {
    "prompt": "a red circle on a teal background",
    "negative_prompt": "",
    "steps": 2,
    "width": 64,
    "height": 64,
    "cfg_scale": 7,
    "sampler_name": "Euler",
    "seed": 42,
    "batch_size": 1,
    "n_iter": 1,
}
REQUEST_TIMEOUT = 1800
# What A1111 prints when a request reaches it between its server start and its API set-up (see HostManager._launch).
STARTUP_RACE = "Cannot add middleware after an application has started"


class HostError(RuntimeError):
    pass


@dataclass(frozen=True)
class HypernetworkSpec:
    """A test hypernetwork: A1111's create-form defaults under ``seed``, then every weight perturbed by a seeded
    normal of std ``scale`` (A1111's "Normal" init alone gives ~1e-2 weights whose effect on a 2-step picture is too
    small to see), so that ``<hypernet:name:1>`` visibly changes the image."""

    name: str
    seed: int
    widths: tuple[int, ...] = (768, 320, 640, 1280)
    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation: str = "linear"
    scale: float = 0.03


# The files every launched host gets in models/hypernetworks (names are what prompts use: <hypernet:hn_a:1>).
HYPERNETWORKS: tuple[HypernetworkSpec, ...] = (
    HypernetworkSpec("hn_a", seed=1),
    HypernetworkSpec("hn_b", seed=2, activation="relu"),
    HypernetworkSpec("hn_768", seed=3, widths=(768,)),
)


def write_hypernetwork(folder: str | os.PathLike[str], spec: HypernetworkSpec) -> Path:
    """Write ``spec`` as ``folder/<name>.pt`` with the project's own create/save API (deterministic bytes)."""
    import torch

    from sdconcepts.hypernetworks.files import save_hypernetwork
    from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork

    hypernetwork = create_hypernetwork(
        spec.name,
        spec.widths,
        layer_structure=spec.layer_structure,
        activation=spec.activation,
        generator_seed=spec.seed,
    )
    generator = torch.Generator().manual_seed(spec.seed + 1000)
    with torch.no_grad():
        for parameter in hypernetwork.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * spec.scale)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return save_hypernetwork(hypernetwork, Path(folder) / f"{spec.name}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Host:
    """A running host. ``dest`` is the prepared tree; ``extension`` says whether extensions/sdconcepts is active."""

    kind: str
    dest: Path
    port: int
    extension: bool
    flags: tuple[str, ...]
    launch_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def python(self) -> Path:
        """The host's venv interpreter (e.g. to run the host's own code as an oracle in a subprocess)."""
        return self.dest / "venv" / "bin" / "python"

    @property
    def hypernetwork_dir(self) -> Path:
        return self.dest / "models" / "hypernetworks"

    @property
    def embeddings_dir(self) -> Path:
        """Where the host reads embeddings by default (and our tab, inside it, writes them)."""
        return self.dest.joinpath(*EMBEDDINGS_DIRS.get(self.kind, ("embeddings",)))

    @property
    def log_path(self) -> Path:
        return self.dest / "host.log"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.is_file() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def request(self, path: str, body: Mapping[str, Any] | None = None, *, timeout: float = REQUEST_TIMEOUT) -> Any:
        """GET (``body`` None) or POST JSON to ``path``; the decoded JSON answer. HTTP errors raise HostError with the
        host's answer and log tail."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                raw = res.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:2000]
            raise HostError(f"{self.kind} {path}: HTTP {exc.code}: {detail}\n--- host.log tail:\n{self.log_tail()}") from exc
        return json.loads(raw) if raw else None

    def get_text(self, path: str, *, timeout: float = 120) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as res:
            return str(res.read().decode("utf-8", errors="replace"))


def decode_image(b64: str) -> np.ndarray:
    """A base64 PNG from the API as an HxWx3 uint8 array."""
    with Image.open(io.BytesIO(base64.b64decode(b64.split(",", 1)[-1]))) as image:
        return np.asarray(image.convert("RGB")).copy()


def txt2img(host: Host, **params: Any) -> tuple[np.ndarray, str]:
    """POST /sdapi/v1/txt2img with DEFAULT_TXT2IMG updated by ``params``; (first image as HxWx3 uint8, its infotext)."""
    body = {**DEFAULT_TXT2IMG, **params}
    answer = host.request("/sdapi/v1/txt2img", body)
    images = answer.get("images") or []
    if not images:
        raise HostError(f"{host.kind}: txt2img returned no image: {str(answer)[:500]}")
    info = json.loads(answer["info"]) if isinstance(answer.get("info"), str) else answer.get("info", {})
    infotexts = info.get("infotexts") or [""]
    return decode_image(images[0]), str(infotexts[0])


def tab_items(host: Host) -> list[tuple[str, str]]:
    """(label, elem_id) of every tab item of the host's Gradio page (GET /config), in page order."""
    config = host.request("/config")
    return [
        (str(c.get("props", {}).get("label")), str(c.get("props", {}).get("elem_id")))
        for c in config.get("components", [])
        if c.get("type") == "tabitem"
    ]


def config_labels(host: Host) -> list[str]:
    """The labels of the Gradio page's tab items (GET /config); "sdconcepts" is our tab."""
    return [label for label, _ in tab_items(host)]


class HostManager:
    """Launches prepared trees on demand; at most one host runs at a time unless ``max_running`` says otherwise."""

    def __init__(
        self,
        dirs: Mapping[str, Path],
        kit: Path,
        checkpoint: Path,
        *,
        hypernetworks: Iterable[HypernetworkSpec] = HYPERNETWORKS,
        max_running: int = 1,
    ) -> None:
        self.dirs = dict(dirs)
        self.kit = kit
        self.checkpoint = checkpoint
        self.hypernetworks = tuple(hypernetworks)
        self.max_running = max_running
        self.running: list[Host] = []
        self.timings: list[tuple[str, float]] = []
        self._staged: Path | None = None

    def _stage_hypernetworks(self) -> Path:
        if self._staged is None:
            folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"sdconcepts-host-hn-{os.getpid()}"
            shutil.rmtree(folder, ignore_errors=True)
            for spec in self.hypernetworks:
                write_hypernetwork(folder, spec)
            self._staged = folder
        return self._staged

    def _checkpoint_link(self, dest: Path) -> Path:
        return dest / "models" / "Stable-diffusion" / f"{CHECKPOINT_NAME}{self.checkpoint.suffix}"

    def _install_models(self, kind: str, dest: Path) -> None:
        link = self._checkpoint_link(dest)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(self.checkpoint)
        hn_dir = dest / "models" / "hypernetworks"
        hn_dir.mkdir(parents=True, exist_ok=True)
        for source in sorted(self._stage_hypernetworks().glob("*.pt")):
            target = hn_dir / source.name
            # An identical file is left alone: the hosts' cards carry (and sort by) its ctime/mtime, so relaunches of
            # a tree within a session must see the very same files.
            if not (target.is_file() and target.read_bytes() == source.read_bytes()):
                shutil.copy2(source, target)
        # LoRA files with bundled embeddings, and standalone ones to compare with (bundle_checks.py).
        import bundle_checks

        bundle_checks.write_bundle_files(dest, dest.joinpath(*EMBEDDINGS_DIRS.get(kind, ("embeddings",))))

    def get(self, kind: str, *, extension: bool = True, extra_flags: Iterable[str] = ()) -> Host:
        """The running host of ``kind`` (with or without our extension active), launched first when needed."""
        if kind not in self.dirs:
            raise HostError(f"{kind} is not prepared here (set {ENV_DIRS[kind]})")
        flags = tuple(extra_flags) + (() if extension else ("--disable-extra-extensions",))
        for host in self.running:
            if host.kind == kind and host.extension == extension and host.flags == flags:
                return host
        # Stop hosts of the same tree (one launch per tree) and, over the limit, the oldest others.
        for host in [h for h in self.running if h.dest == self.dirs[kind]]:
            self.stop(host)
        while len(self.running) >= self.max_running:
            self.stop(self.running[0])
        return self._launch(kind, extension, flags)

    def _launch(self, kind: str, extension: bool, flags: tuple[str, ...]) -> Host:
        dest = self.dirs[kind]
        self._install_models(kind, dest)
        port = free_port()
        # The checkpoint is always named: a tree's settings remember the last one loaded (a launch on the SD 2 file
        # must not leave the next launch on it).
        ckpt = () if "--ckpt" in flags else ("--ckpt", str(self._checkpoint_link(dest)))
        env = {**os.environ, "LAUNCH_TIMEOUT": os.environ.get("SDCONCEPTS_HOST_LAUNCH_TIMEOUT", "900")}
        t0 = time.monotonic()
        retried = ""
        for attempt in range(2):
            proc = subprocess.run(
                [str(self.kit / "launch.sh"), str(dest), str(port), *ckpt, *flags],
                env=env,
                capture_output=True,
                text=True,
            )
            # A1111's start-up race, not ours: launch.sh polls the port with HTTP requests while A1111 adds its API
            # middleware after the server is up; a request in that window makes starlette build the middleware stack
            # and A1111 exits. First seen in a local CI run on a loaded machine; a second launch is a fresh process.
            if proc.returncode == 0 or attempt or STARTUP_RACE not in proc.stdout + proc.stderr:
                break
            retried = " (relaunched after A1111's start-up race)"
            port = free_port()
        if proc.returncode != 0:
            raise HostError(f"launch.sh {kind} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
        host = Host(kind, dest, port, extension, flags, launch_seconds=time.monotonic() - t0)
        self.timings.append((f"launch {kind}{'' if extension else ' (extension disabled)'}{retried}",
                             host.launch_seconds))
        self.running.append(host)
        return host

    def stop(self, host: Host) -> None:
        subprocess.run([str(self.kit / "stop.sh"), str(host.dest)], capture_output=True, text=True)
        if host in self.running:
            self.running.remove(host)

    def stop_all(self) -> None:
        for host in list(self.running):
            self.stop(host)


def assert_finite_picture(image: np.ndarray) -> None:
    """A real picture: not all black (Forge's NaN conditioning ends as zeros) and not one flat colour."""
    assert image.ndim == 3 and image.shape[2] == 3, image.shape
    assert image.max() > 0, "all-black image (NaN somewhere in the host's pipeline?)"
    assert float(image.std()) > 1.0, f"flat image (std {image.std():.3f})"


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
