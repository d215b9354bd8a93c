"""Forge adapter: ``<hypernet:name:M>`` in Forge's own txt2img/img2img/hires pass, and its Hypernetworks card page.

Forge parses the tag but its UNet never reads loaded hypernetworks. Here the ``hypernet`` extra network (same
registry name, replacing Forge's no-op) resolves the tags of each pass and keeps them on the processing object; an
always-visible script then, before every sampling, puts a clone of Forge's UNet patcher carrying our ``attn1``/``attn2``
patches into ``p.sd_model.forge_objects`` (Forge rebuilds that from its LoRA-applied copy before each sampling, so
nothing leaks into the next one). The math is ``sdconcepts.hypernetworks.attach.AttentionPatch`` (the engine's chains).

A1111 has hypernetworks natively: nothing here registers unless the host is Forge (``is_forge``). Host ``modules.*``
are imported inside functions only, so this file imports without a host.
"""

from __future__ import annotations

import html
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdconcepts.hypernetworks.attach import AttentionPatch, attention_widths
from sdconcepts.hypernetworks.files import HypernetworkFileError, read_hypernetwork_info, shorthash
from sdconcepts.hypernetworks.hypernetwork import Hypernetwork
from sdconcepts.hypernetworks.library import LoadedHypernetworks, find_hypernetworks
from sdconcepts.hypernetworks.tags import resolve_hypernetworks
from sdconcepts.prompts.network_tags import ExtraNetworkTag

__all__ = [
    "ForgeHypernetworks",
    "PAGE_TITLE",
    "fit_note",
    "STATE_ATTRIBUTE",
    "hypernetwork_folder",
    "infotext_hashes",
    "is_forge",
    "register",
    "always_visible_script",
    "script_class",
]

log = logging.getLogger(__name__)

PAGE_TITLE = "Hypernetworks"
# The hypernetworks of the pass being sampled, on Forge's processing object (set by activate, read by the script).
STATE_ATTRIBUTE = "sdconcepts_hypernetworks"
INFOTEXT_FIELD = "Hypernet hashes"
# SD 1.x/2.x/XL attention widths: self-attention on the UNet channels, cross-attention on the text context.
_FALLBACK_WIDTHS = (320, 640, 1280, 768, 1024, 2048)


def is_forge() -> bool:
    """True where the UNet runs through Forge's patchers: Forge and the old-Forge forks (reForge, Forge-Classic) ship
    ``modules_forge``; A1111 does not. What each offers beyond that is looked up where it is used
    (``host.capabilities``, the checks in ``register`` and ``patch_unet``)."""
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


def hypernetwork_folder() -> Path:
    """``--hypernetwork-dir``; Forge-Classic and reForge lack the option: ``models/hypernetworks`` there."""
    from modules import paths, shared  # lazy: host only

    folder = getattr(getattr(shared, "cmd_opts", None), "hypernetwork_dir", None)
    if folder:
        return Path(folder)
    models = getattr(paths, "models_path", None) or os.path.join(getattr(paths, "data_path", "."), "models")
    return Path(models) / "hypernetworks"


def infotext_hashes(used: list[tuple[str, str]]) -> str:
    """``name: hash, ...`` as A1111's ``Lora hashes``/``TI hashes``; names lose ``:`` and ``,``."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in used)


class ForgeHypernetworks:
    """The files of Forge's hypernetwork folder (``hypernetworks.library``'s listing rules) and the loaded ones."""

    def __init__(self) -> None:
        self._loaded = LoadedHypernetworks()
        self._names: dict[str, Path] = {}

    def refresh(self) -> dict[str, Path]:
        self._names = find_hypernetworks([hypernetwork_folder()])
        return dict(self._names)

    def names(self) -> dict[str, Path]:
        return dict(self._names)

    def path(self, name: str) -> Path | None:
        if name not in self._names:
            self.refresh()  # a file added since the last scan is found without pressing Refresh
        return self._names.get(name)

    def load(self, path: Path, device: torch.device) -> Hypernetwork:
        return self._loaded.load(path, device)


_FILES = ForgeHypernetworks()


def _file_hash(path: Path, name: str) -> str:
    """A1111's 10-digit shorthash through the host's hash cache (shared with its pages), else computed here."""
    try:
        from modules import hashes  # lazy: host only

        digest = hashes.sha256(str(path), f"hypernet/{name}")
        if digest:
            return str(digest)[:10]
    except Exception:  # the host cache is an optimisation; hashing the file ourselves gives the same digest
        log.debug("host hash cache unavailable for %s", path, exc_info=True)
    return shorthash(path)


def _unet_of(p: Any) -> Any:
    forge_objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    return getattr(forge_objects, "unet", None)


def _unet_widths(unet: Any) -> set[int] | None:
    """The attention widths of a Forge UNet patcher's model; None when it holds no torch module."""
    model = getattr(getattr(unet, "model", None), "diffusion_model", None)
    return attention_widths(model) if isinstance(model, torch.nn.Module) else None


def _model_widths(unet: Any) -> set[int]:
    widths = _unet_widths(unet)
    return set(_FALLBACK_WIDTHS) if widths is None else widths


def _warn(p: Any, message: str) -> None:
    """A warning in the host's UI (the comments under the image) and in the console."""
    log.warning(message)
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(message)


class ExtraNetworkHypernet:
    """Forge's ``hypernet`` extra network, replaced: resolves a pass's tags into loaded hypernetworks on ``p``.

    Duck-typed to the host's ``ExtraNetwork`` (the registry only calls ``activate``/``deactivate`` and reads
    ``name``).
    """

    def __init__(self, files: ForgeHypernetworks = _FILES) -> None:
        self.name = "hypernet"
        self.files = files

    def activate(self, p: Any, params_list: list[Any]) -> None:
        from modules import shared  # lazy: host only

        items = [list(getattr(params, "items", []) or []) for params in params_list]
        # A1111's "Add hypernetwork to prompt" setting, when Forge still has it.
        additional = getattr(shared.opts, "sd_hypernetwork", "None")
        if additional and additional != "None" and self.files.path(additional) is not None:
            if not any(entry and entry[0] == additional for entry in items):
                multiplier = getattr(shared.opts, "extra_networks_default_multiplier", 1.0)
                p.all_prompts = [f"{prompt}<hypernet:{additional}:{multiplier}>" for prompt in p.all_prompts]
                items.append([additional, str(multiplier)])

        unet = _unet_of(p)
        device = getattr(unet, "load_device", None) or torch.device("cpu")
        tags = [ExtraNetworkTag("hypernet", tuple(str(item) for item in entry)) for entry in items if entry]
        resolved = resolve_hypernetworks(
            tags, self.files.path, lambda path: self.files.load(path, device), widths=lambda: _model_widths(unet),
            forge_folder=hypernetwork_folder,
        )
        for warning in resolved.warnings:
            _warn(p, warning)
        chain = resolved.chain
        used = [(name, _file_hash(path, name)) for name, path in resolved.used]
        setattr(p, STATE_ATTRIBUTE, chain)
        if used:
            p.extra_generation_params[INFOTEXT_FIELD] = infotext_hashes(used)

    def deactivate(self, p: Any) -> None:
        if hasattr(p, STATE_ATTRIBUTE):
            delattr(p, STATE_ATTRIBUTE)


class _ForgePatch:
    """The attn1/attn2 patches for one sampling: Forge calls ``patch(n, context, value, extra_options)``."""

    def __init__(self, chain: list[tuple[Hypernetwork, float]]) -> None:
        self.patch = AttentionPatch(chain)

    def self_attention(self, n: Any, context: Any, value: Any, extra_options: Any) -> tuple[Any, Any, Any]:
        key, value = self.patch.key_value(context, value, cross=False)
        return n, key, value

    def cross_attention(self, n: Any, context: Any, value: Any, extra_options: Any) -> tuple[Any, Any, Any]:
        key, value = self.patch.key_value(context, value, cross=True)
        return n, key, value


def patch_unet(p: Any) -> bool:
    """Swap ``p``'s UNet patcher for a clone carrying the pass's hypernetworks; False when there are none."""
    chain = getattr(p, STATE_ATTRIBUTE, None)
    unet = _unet_of(p)
    if not chain or unet is None:
        return False
    missing = [name for name in ("clone", "set_model_attn1_patch", "set_model_attn2_patch") if not hasattr(unet, name)]
    if missing:
        _warn(p, f"hypernetworks: this web UI's UNet patcher has no {', '.join(missing)}; the <hypernet:> tags of "
                 "this generation had no effect")
        return False
    patched = unet.clone()
    patch = _ForgePatch(chain)
    patched.set_model_attn1_patch(patch.self_attention)
    patched.set_model_attn2_patch(patch.cross_attention)
    p.sd_model.forge_objects.unet = patched
    return True


def always_visible_script(name: str, title: str, *, process: Callable[[Any], object] | None = None,
                          before_every_sampling: Callable[[Any], object] | None = None) -> type | None:
    """A subclass of the host's ``Script`` named ``name``, always visible and without UI, that calls ``process(p)``
    when a generation starts and ``before_every_sampling(p)`` before each sampling pass; None outside Forge.
    ``scripts/`` exposes it at module level, where the host looks for Script classes."""
    if not is_forge():
        return None
    from modules import scripts  # lazy: host only

    namespace: dict[str, Any] = {
        "sorting_priority": 0,
        "title": lambda self: title,
        "show": lambda self, is_img2img: scripts.AlwaysVisible,
        "ui": lambda self, is_img2img: [],
    }
    if process is not None:
        namespace["process"] = lambda self, p, *args: process(p)
    if before_every_sampling is not None:
        namespace["process_before_every_sampling"] = lambda self, p, *args, **kwargs: before_every_sampling(p)
    return type(name, (scripts.Script,), namespace)


def script_class() -> type | None:
    """The always-visible script that patches the UNet before every sampling; None outside Forge."""
    return always_visible_script("SdconceptsHypernetworks", "sdconcepts hypernetworks",
                                 before_every_sampling=patch_unet)


def fit_note(path: Path, model_widths: set[int] | None) -> str:
    """A card's warning for a file that fits no attention layer of the loaded model ("" when it fits, or when no
    model is loaded); read from the file's pickle alone, no weights."""
    if not model_widths:
        return ""
    try:
        widths = set(read_hypernetwork_info(path).widths)
    except HypernetworkFileError as exc:
        return f"Cannot be used: {exc}"
    if widths & model_widths:
        return ""
    return (f"Fits no attention layer of the loaded model: its modules are for widths {sorted(widths)}, the model's "
            f"layers read {sorted(model_widths)}.")


def _loaded_model_widths() -> set[int] | None:
    """The attention widths of the model the host has loaded, None when none is (never loads one)."""
    from modules import sd_models  # lazy: host only

    model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
    return _unet_widths(getattr(getattr(model, "forge_objects", None), "unet", None))


def _page() -> Any:
    from modules import shared, ui_extra_networks  # lazy: host only

    files = _FILES

    class HypernetworksPage(ui_extra_networks.ExtraNetworksPage):  # type: ignore[misc,name-defined]
        """Forge's Hypernetworks cards: our folder listing, the host's card page machinery."""

        def __init__(self) -> None:
            super().__init__(PAGE_TITLE)
            self.model_widths: set[int] | None = None
            files.refresh()

        def refresh(self) -> None:
            files.refresh()

        def create_item(self, name: str, index: int | None = None, enable_filter: bool = True) -> dict[str, Any] | None:
            full_path = files.names().get(name)
            if full_path is None:
                return None
            stem, ext = os.path.splitext(str(full_path))
            digest = None
            try:
                from modules.hashes import sha256_from_cache  # lazy: host only

                digest = sha256_from_cache(str(full_path), f"hypernet/{name}")
            except Exception:
                digest = None
            search_terms = [self.search_terms_from_path(stem)]
            if digest:
                search_terms.append(digest)
            quote = ui_extra_networks.quote_js
            widths = self.model_widths if self.model_widths is not None else _loaded_model_widths()
            note = html.escape(fit_note(full_path, widths))
            description = self.find_description(stem)
            return {
                "name": name,
                "filename": str(full_path),
                "shorthash": digest[:10] if digest else None,
                "preview": self.find_preview(stem),
                "description": f"{note} {description or ''}".strip() if note else description,
                "search_terms": search_terms,
                # A JS expression: the host's default-multiplier setting is read in the page at click time.
                "prompt": quote(f"<hypernet:{name}:") + " + opts.extra_networks_default_multiplier + " + quote(">"),
                "local_preview": f"{stem}.preview.{shared.opts.samples_format}",
                "sort_keys": {"default": index, **self.get_sort_keys(str(full_path))},
            }

        def list_items(self) -> Any:
            self.model_widths = _loaded_model_widths()  # once per listing, not per card
            try:
                for index, name in enumerate(list(files.names())):
                    item = self.create_item(name, index)
                    if item is not None:
                        yield item
            finally:
                self.model_widths = None

        def allowed_directories_for_previews(self) -> list[str]:
            return [str(hypernetwork_folder())]

    return HypernetworksPage()


def _before_ui() -> None:
    from modules import extra_networks, ui_extra_networks  # lazy: host only

    extra_networks.register_extra_network(ExtraNetworkHypernet())
    pages = getattr(ui_extra_networks, "extra_pages", [])
    if not any(getattr(page, "title", None) == PAGE_TITLE for page in pages):
        ui_extra_networks.register_page(_page())


def register() -> bool:
    """Inside Forge: replace the ``hypernet`` extra network and add the Hypernetworks page before the UI is built.

    False, and nothing registered, on A1111 (native hypernetworks) or outside a host.
    """
    if not is_forge():
        return False
    from modules import script_callbacks, scripts  # lazy: host only

    if not hasattr(scripts.Script, "process_before_every_sampling"):
        # Every Forge generation has this hook (Forge, reForge, Forge-Classic); a fork without it cannot be patched.
        log.warning("sdconcepts: this web UI's scripts have no process_before_every_sampling hook, so <hypernet:> "
                    "tags cannot be applied here; its own hypernetwork handling is left as it is")
        return False
    remove = getattr(script_callbacks, "remove_callbacks_for_function", None)
    if remove is not None:
        remove(_before_ui)
    script_callbacks.on_before_ui(_before_ui)
    return True
