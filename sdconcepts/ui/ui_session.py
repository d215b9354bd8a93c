"""What one running web UI holds: its folders, the embedding and hypernetwork libraries, and the loaded model.

No gradio here: the standalone app and the host adapter both build a ``UiSession`` and hand it to ``ui.app``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sdconcepts.embeddings.conversion import MapCache, default_map_cache
from sdconcepts.embeddings.library import EmbeddingLibrary
from sdconcepts.file_names import path_problem
from sdconcepts.hash_cache import HashCache
from sdconcepts.hypernetworks.attach import attention_widths
from sdconcepts.hypernetworks.files import HypernetworkFileError
from sdconcepts.hypernetworks.hypernetwork import Hypernetwork
from sdconcepts.hypernetworks.library import LoadedHypernetworks, hypernetwork_library
from sdconcepts.hypernetworks.tags import ResolvedHypernetworks, resolve_hypernetworks
from sdconcepts.model_shape import EMBEDDED_XL_MODEL_DIR, read_model_shape, shape_of_loaded
from sdconcepts.prompts.network_tags import parse_extra_network_tags
from sdconcepts.threads import apply_threads, parse_threads

__all__ = ["DEFAULT_MODEL_LABEL", "HOST_MODEL_LABEL", "HostModelSource", "UiConfig", "UiError", "UiSession",
           "contained_path", "scan_models"]

DEFAULT_MODEL_LABEL = "toyworld (embedded)"
XL_MODEL_LABEL = "toyworld-xl (embedded)"
HOST_MODEL_LABEL = "the web UI's loaded model"
MODEL_SUFFIXES = (".safetensors", ".ckpt")
READ_BATCH = 100  # files a background read takes between pauses
READ_PAUSE_S = 0.05
READ_YIELD_S = 0.5  # the background reader waits this long after a card tab's last request


def _lower_thread_priority() -> None:
    # On Linux a thread has its own nice value: the reader then gets the CPU (and with it the GIL) after requests do.
    if hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except OSError:
            pass


class UiError(ValueError):
    """A request the UI cannot carry out; the message is shown to the user as it is."""


def whole_number(value: Any, label: str) -> int:
    """A form's number as an int, or UiError: 1.5 was silently truncated to 1, NaN was Python's own error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UiError(f"{label} must be a number, got {value!r}") from None
    if not number.is_integer():
        raise UiError(f"{label} must be a whole number, got {value}")
    return int(number)


class HostModelSource(Protocol):
    """Inside a web UI host: the host's loaded model, seen without a second copy (``sdconcepts.host.model``)."""

    def load(self) -> Any:
        """A LoadedModel over the host's current weights; ValueError (one sentence) when there is none to use."""
        ...

    def loaded_width(self) -> int | None:
        """Its text width when it was loaded already; None otherwise (nothing is loaded to answer)."""
        ...

    def loaded(self) -> Any:
        """The LoadedModel when it was loaded already; None otherwise (nothing is loaded to answer)."""
        ...


@dataclass
class UiConfig:
    """Where the UI finds things. ``multiplier`` is read on every card render (a host setting may change it)."""

    ckpt: Path | None = None
    models_dir: Path | None = None
    embeddings_dirs: Sequence[Path] = ()
    hypernetworks_dirs: Sequence[Path] = ()
    outputs_dir: Path | None = None
    # img2img/inpaint results (A1111's outputs/img2img-images); None: beside txt2img's, in outputs_dir.
    img2img_outputs_dir: Path | None = None
    # The Train tab's default log directory: A1111's "textual_inversion" (relative to the working folder: inside a host
    # its data folder); the standalone app puts it under ./outputs instead of the folder it was started in.
    train_log_dir: str = "textual_inversion"
    device: str | None = None
    multiplier: Callable[[], float] = field(default=lambda: 1.0)
    # Folders that paths typed into the Train tab (preprocess source/destination, dataset, log directory, template
    # file) must lie in. None: the working folder when the session starts, plus the folders above.
    train_roots: Sequence[Path] | None = None
    # Folders allowed besides those (inside a host: each ``--sdconcepts-train-root``).
    extra_train_roots: Sequence[Path] = ()
    # How the user adds a folder to those (named in the refusal): our server's option, or the one the extension
    # registers with its host (``preload.py``).
    train_root_option: str = "--train-root"
    # Read-only sources listed before the folders above (the shipped examples, ``sdconcepts.toyworld.examples``): a file of
    # the same name in a user folder wins, and nothing is ever written here (training writes to the first user folder).
    extra_embeddings_dirs: Sequence[Path] = ()
    extra_hypernetworks_dirs: Sequence[Path] = ()
    # Inside a host: its loaded model is the default choice, and the host reloads the files we write.
    host_model: HostModelSource | None = None
    files_changed: Callable[[str], str | None] | None = None
    # The file that keeps file hashes across runs (``sdconcepts.hash_cache``); None: the user cache folder's.
    hash_cache: Path | None = None
    # SD 1.x embeddings in a prompt on an SDXL model are converted on the fly (``embeddings.conversion``); off by
    # default so that images stay A1111's (which skips them). The Embedding tools panel toggles it.
    convert_sd1_on_sdxl: bool = False
    # LoRA files whose bundled embeddings are words while the LoRA is in the prompt (``embeddings.bundles``).
    lora_dirs: Sequence[Path] = ()
    # torch's CPU threads, set before each generation and training run: "auto" or a count (``sdconcepts.threads``);
    # None leaves them alone (inside a host, whose choice stands).
    cpu_threads: str | None = None


def scan_models(folder: Path | None) -> list[Path]:
    """Checkpoints under ``folder``: single files (``.safetensors``, ``.ckpt``) and diffusers folders, recursively."""
    if folder is None or not folder.is_dir():
        return []
    found: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
            if not any(parent in found for parent in path.parents):
                found.append(path)
        elif path.is_dir() and (path / "model_index.json").is_file() and (path / "unet").is_dir():
            found.append(path)
    return found


def contained_path(value: str | Path, roots: Sequence[Path], label: str, option: str = "--train-root") -> Path:
    """``value`` resolved (symlinks followed, relative to the working folder), or UiError when it lies outside every
    folder in ``roots``.

    A server started with ``--listen`` takes these paths from anyone who can reach the page; A1111 reads and writes
    wherever they point. Here they stay inside the folders the server was started with (``option``: ``--train-root``
    for our server, ``--sdconcepts-train-root`` inside a host).
    """
    problem = path_problem(str(value))
    if problem is not None:
        raise UiError(f"{label}: {problem}")
    resolved = Path(value).resolve()
    allowed = [Path(root).resolve() for root in roots]
    if any(resolved == root or resolved.is_relative_to(root) for root in allowed):
        return resolved
    folders = ", ".join(str(root) for root in allowed) or "none"
    raise UiError(f"{label}: {str(value)!r} is outside the folders this server may use ({folders}); "
                  f"start it with {option} DIR to allow another folder")


def _size_text(path: Path) -> str:
    try:
        size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return "size unknown"
    return f"{size / 2**30:.1f} GB" if size >= 2**30 else f"{size / 2**20:.0f} MB"


class UiSession:
    """Libraries are scanned again (cheaply) whenever the UI asks; one model is kept loaded at a time."""

    def __init__(self, config: UiConfig) -> None:
        self.config = config
        # Hashes (shown and searched on the cards) are kept across runs: a restart reads headers, not whole files.
        self.hashes = hashes = (HashCache(config.hash_cache) if config.hash_cache is not None
                                else HashCache.default())
        self.embeddings = EmbeddingLibrary([*config.extra_embeddings_dirs, *config.embeddings_dirs], hashes=hashes)
        self.hypernetworks = hypernetwork_library(
            [*config.extra_hypernetworks_dirs, *config.hypernetworks_dirs], hashes=hashes
        )
        # The card tabs' cards per kind, rebuilt when the library or a setting they depend on changes.
        self.card_lists: dict[str, Any] = {}
        self.card_cache: dict[Any, Any] = {}  # per kind: the cards of unchanged files, reused by the next rebuild
        # Fitted token maps for SD 1.x -> SDXL conversion, per pair of token tables (kept on disk beside the hashes).
        self.token_maps = (MapCache(Path(config.hash_cache).parent / "token-maps") if config.hash_cache is not None
                           else default_map_cache())
        self.convert_sd1_on_sdxl = bool(config.convert_sd1_on_sdxl)
        # The hypernetworks the last generation used, fully loaded.
        self.loaded_hypernetworks = LoadedHypernetworks()
        self._reader: threading.Thread | None = None
        self._last_view = 0.0
        self._reader_lock = threading.Lock()
        self._model: Any = None
        self._model_label: str | None = None
        self._model_lock = threading.Lock()
        self.generate_lock = threading.Lock()
        if config.train_roots is not None:
            self._train_roots = [Path(root) for root in config.train_roots]
        else:
            data = [*config.embeddings_dirs, *config.hypernetworks_dirs, config.outputs_dir, config.img2img_outputs_dir]
            self._train_roots = [Path.cwd(), *(Path(p) for p in data if p is not None)]
        self._train_roots += [Path(root) for root in config.extra_train_roots]

    def read_in_background(self) -> None:
        """Read the files lazy scans listed, a batch at a time, in a daemon thread (one at a time per session).

        The card tabs read the files of the page they show at once; this completes the rest (details, hashes for
        search, the skipped list) without holding a request. Nothing runs when nothing is pending.
        """
        with self._reader_lock:
            if self._reader is not None and self._reader.is_alive():
                return
            if not (self.embeddings.files.pending() or self.hypernetworks.pending()):
                return
            self._reader = threading.Thread(target=self._read_pending, name="sdconcepts-library-reader", daemon=True)
            self._reader.start()

    def note_view(self) -> None:
        """A card tab is being used (typing, paging): the background reader steps aside for a moment."""
        self._last_view = time.monotonic()

    def _read_pending(self) -> None:
        # Quiet reads: the card tabs rebuild their cards once at the end, not after every batch; files the tabs
        # show meanwhile are read by the views themselves.
        _lower_thread_priority()
        try:
            while True:
                # Someone is typing in a search box or paging: their requests share this process's GIL.
                while time.monotonic() - self._last_view < READ_YIELD_S:
                    time.sleep(READ_YIELD_S / 4)
                read = self.embeddings.read_pending(READ_BATCH, quiet=True)
                read += self.hypernetworks.read_pending(READ_BATCH // 4, quiet=True)
                if read == 0:
                    return
                # Let request threads in between batches (the GIL is shared with the handlers).
                time.sleep(READ_PAUSE_S)
        finally:
            self.embeddings.files.touch()
            self.hypernetworks.touch()
            self.hashes.save(force=True)

    def train_roots(self) -> list[Path]:
        """The folders Train-tab paths must lie in (``UiConfig.train_roots``)."""
        return list(self._train_roots)

    def resolve_hypernetworks(self, prompt: str, unet: Any) -> tuple[ResolvedHypernetworks[Path], list[str]]:
        """Resolve the prompt's hypernet tags through the library (``hypernetworks.tags.resolve_hypernetworks``):
        (what sampling takes, the warnings about files that were skipped, said before the generation's own).

        Only the hypernetworks the prompt names are loaded (as A1111 does); those the previous generation used are
        reused while their file is unchanged, the others dropped, so only what the current prompt uses stays in
        memory. ``unet`` (None: no width check) gives the attention widths a hypernetwork must fit.
        """
        _, tags = parse_extra_network_tags(prompt)
        named = {t.args[0] for t in tags if t.name == "hypernet" and t.args}
        self.hypernetworks.read(r.path for r in self.hypernetworks.records() if r.pending and r.name in named)
        records = self.hypernetworks.records()
        # A skipped file's name is known (its tag "could not be loaded"); say why, as the tab does, for the tags
        # written with a strength (``<hypernet:name:...>``).
        with_strength = {t.args[0] for t in tags if t.name == "hypernet" and len(t.args) > 1}
        warnings = [f"hypernetwork file {r.path} was skipped: {r.error}" for r in records
                    if r.item is None and r.name in with_strength]
        files: dict[str, Path] = {}
        for record in records:  # a later duplicate wins, unless only an earlier one could be read
            if record.item is not None or record.name not in files:
                files[record.name] = record.path
        errors = {r.path: r.error for r in records if r.item is None}

        def load(path: Path) -> Hypernetwork:
            if path in errors:  # said above
                raise HypernetworkFileError(str(errors[path]))
            return self.loaded_hypernetworks.load(path)

        resolved = resolve_hypernetworks(
            tags, files.get, load, widths=None if unet is None else (lambda: attention_widths(unet))
        )
        self.loaded_hypernetworks.keep_only(path for _, path in resolved.used)
        order = {r.path: i for i, r in enumerate(records)}
        failed = sorted((s for s in resolved.skipped if s.file not in errors), key=lambda s: order[s.file])
        return resolved, [*warnings, *(s.ui_warning() for s in failed)]

    def readable(self, text: str) -> str:
        """``text`` (a warning) with the server's absolute folders shortened: a file in a listed folder is named
        from that folder's last two parts ("models/hypernetworks/x.pt"), anything else under the working folder
        relative to it. The page need not show where the server keeps its files (a host's install path)."""
        config = self.config
        folders = [*config.extra_embeddings_dirs, *config.embeddings_dirs, *config.extra_hypernetworks_dirs,
                   *config.hypernetworks_dirs, config.outputs_dir, config.img2img_outputs_dir]
        prefixes: dict[str, str] = {}
        for folder in (Path(f) for f in folders if f is not None):
            short = Path(*folder.parts[-2:]).as_posix() + "/" if folder.parts else ""
            for form in {str(folder.absolute()), str(folder.resolve())}:
                prefixes[form + os.sep] = short
        prefixes.setdefault(str(Path.cwd()) + os.sep, "")
        for prefix in sorted(prefixes, key=len, reverse=True):
            if os.path.isabs(prefix):
                text = text.replace(prefix, prefixes[prefix])
        return text

    def hypernetwork_hashes(self, resolved: ResolvedHypernetworks[Path]) -> dict[str, str]:
        """Name -> SHA-256 of the hypernetworks a generation uses (its infotext's ``Hypernet hashes``): the scan's
        hash where it has one, else read once per file version through the hash cache."""
        known = {r.path: r.hash for r in self.hypernetworks.records() if r.hash}
        hashes: dict[str, str] = {}
        for name, path in resolved.used:
            digest = known.get(path)
            if digest is None:
                stat = path.stat()
                digest = self.hashes.sha256(str(path), (stat.st_mtime_ns, stat.st_size, stat.st_ino))
            hashes[name] = digest
        return hashes

    # -- models -----------------------------------------------------------------------------------------------

    def model_choices(self) -> dict[str, Path | None]:
        """Dropdown label -> model path (None: the embedded default model, or the host's), default first.

        Inside a host, its loaded model comes first, and every checkpoint file is labelled with the memory that a
        separate second copy would take: nobody loads one without seeing that.
        """
        host = self.config.host_model is not None
        choices: dict[str, Path | None] = {HOST_MODEL_LABEL: None} if host else {}
        choices[DEFAULT_MODEL_LABEL] = None

        if (EMBEDDED_XL_MODEL_DIR / "model_index.json").is_file():
            choices[XL_MODEL_LABEL] = EMBEDDED_XL_MODEL_DIR
        if self.config.ckpt is not None:
            choices[str(self.config.ckpt)] = self.config.ckpt
        root = self.config.models_dir
        for path in scan_models(root):
            label = str(path.relative_to(root)) if root is not None else str(path)
            if host:
                label = f"{label} (loads a second copy: {_size_text(path)})"
            choices.setdefault(label, path)
        return choices

    def default_choice(self) -> str:
        """The ``--ckpt`` model when one was given, else the host's model inside a host, else the embedded model."""
        if self.config.ckpt is not None:
            return str(self.config.ckpt)
        return HOST_MODEL_LABEL if self.config.host_model is not None else DEFAULT_MODEL_LABEL

    def files_changed(self, kind: str) -> str | None:
        """We wrote an ``embedding`` or ``hypernetwork`` file: tell the host (it reloads its lists). None when done,
        else one sentence for the page (the host could not be told; the file is saved)."""
        if self.config.files_changed is not None:
            return self.config.files_changed(kind)
        return None

    def set_cpu_threads(self, value: str) -> str:
        """The page's CPU threads setting: "auto" or a count, used from the next job on; UiError when it is neither."""
        try:
            self.config.cpu_threads = parse_threads(str(value))
        except ValueError as exc:
            raise UiError(str(exc)) from None
        return self.config.cpu_threads

    def use_cpu_threads(self) -> None:
        """Set torch's thread count for the job about to run, as configured (``UiConfig.cpu_threads``)."""
        if self.config.cpu_threads is not None:
            apply_threads(self.config.cpu_threads)

    def model(self, label: str) -> Any:
        """The model behind a dropdown label, loading it (and dropping the previous one) when it changed."""
        choices = self.model_choices()
        if label not in choices:
            raise UiError(f"model {label!r} is no longer available; refresh the model list")
        with self._model_lock:
            host = self.config.host_model
            if host is not None and label == HOST_MODEL_LABEL:
                # Never kept here: the host's source drops its view when the host loads another model.
                self._model, self._model_label = None, label
                try:
                    return host.load()
                except ValueError as exc:
                    raise UiError(str(exc)) from exc
            if self._model is not None and self._model_label == label:
                return self._model
            from sdconcepts.backends.model_loading import ModelLoadError, load_model  # lazy: transformers, diffusers

            self._model = None
            try:
                model = load_model(choices[label], device=self.config.device)
            except ModelLoadError as exc:
                raise UiError(str(exc)) from exc
            self._model, self._model_label = model, label
            return model

    def loaded_model_label(self) -> str | None:
        return self._model_label

    def unload(self) -> None:
        with self._model_lock:
            self._model = None
            self._model_label = None

    def model_shape(self, label: str | None = None) -> Any:
        """The ``model_shape.ModelShape`` of a model (its hypernetwork widths, native size), without loading it when
        its files say; None when only loading would tell (a ``.ckpt`` not loaded yet)."""
        label = label or self._model_label or self.default_choice()
        if label == HOST_MODEL_LABEL and self.config.host_model is not None:
            # The host's model (its None path would name the embedded toy model): known once our view of it exists,
            # else None (A1111's own form defaults), never loaded just to draw a form.
            view = self.config.host_model.loaded()
            return shape_of_loaded(view) if view is not None else None
        if self._model is not None and self._model_label == label:
            return shape_of_loaded(self._model)
        choices = self.model_choices()
        if label not in choices:
            return None
        return read_model_shape(choices[label])

    def context_width(self, label: str | None = None) -> int | None:
        """The text width embeddings must have for a model, without loading it when its config says."""
        label = label or self._model_label or self.default_choice()
        if label == HOST_MODEL_LABEL and self.config.host_model is not None:
            return self.config.host_model.loaded_width()
        if self._model is not None and self._model_label == label:
            return int(self._model.context_width)
        path = self.model_choices().get(label)
        if path is None and label == DEFAULT_MODEL_LABEL:
            from sdconcepts.backends.model_loading import DEFAULT_MODEL_DIR  # lazy: transformers, diffusers

            path = DEFAULT_MODEL_DIR
        if path is not None and path.is_dir():
            try:
                # SDXL's context is both text encoders' hidden states side by side (768 + 1280).
                encoders = [path / "text_encoder"] + ([path / "text_encoder_2"] if (path / "text_encoder_2").is_dir() else [])
                return sum(
                    int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["hidden_size"])
                    for folder in encoders
                )
            except (OSError, ValueError, KeyError, TypeError):
                return None
        if path is not None:
            # A single file not loaded yet: its safetensors header tells (a .ckpt pickle only once it is loaded).
            shape = self.model_shape(label)
            return shape.context_width if shape is not None else None
        return None

    def is_sdxl(self, label: str | None = None) -> bool | None:
        """Whether a model is SDXL (its embeddings are clip_l + clip_g pairs), without loading it when its files
        say; None when only loading would tell (a ``.ckpt`` not loaded yet, the host's model before it loads)."""
        label = label or self._model_label or self.default_choice()
        if self._model is not None and self._model_label == label:
            return bool(self._model.is_sdxl)
        if label == HOST_MODEL_LABEL and self.config.host_model is not None:
            view = self.config.host_model.loaded()
            return bool(view.is_sdxl) if view is not None else None
        shape = self.model_shape(label)
        return shape.sdxl if shape is not None else None
