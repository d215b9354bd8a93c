"""Embeddings bundled in LoRA files inside Forge and its forks (Forge #345): the bundle's words exist in the host's own
txt2img/img2img while the LoRA is in the prompt, as in A1111 1.10.

A1111's Lora extension loads ``bundle_emb.*`` keys itself (a1111-compat §1.4; ``embeddings.bundles``); Forge's
``sd_forge_lora`` and the Lora extensions of reForge and Forge-Classic dropped that code. Here the ``lora`` extra
network in the host's registry is wrapped: after the host's own ``activate`` (which loads the LoRAs named in the
prompt), the bundles of the LoRA files it loaded are read with ``embeddings.bundles`` (safetensors only; a pickle is
never unpickled) and registered by name in the host's embedding database(s) with A1111's precedence (a word of the
embeddings folder wins); the next ``activate`` and ``deactivate`` remove them again. A LoRA the host itself already
gave bundled embeddings (``Network.bundle_embeddings`` not empty) is left to the host.

Where the host's text engines do not write ``TI hashes`` (Forge 2 writes ``TI: names``), the always-visible script
adds A1111's entry for a bundled word it used, ``word: <lora name>``, under the host's own settings "Add Textual
Inversion hashes to infotext" and "Add Lora name as TI hashes for bundled Textual Inversion".

Nothing registers on A1111 (``forge.is_forge``). Host ``modules.*`` are imported inside functions only.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdconcepts.embeddings.bundles import BundleCache, BundledEmbedding, find_lora_files, list_bundled
from sdconcepts.host.forge import always_visible_script, is_forge

__all__ = ["BundledLora", "BundleWords", "register", "script_class"]

log = logging.getLogger(__name__)

INFOTEXT_FIELD = "TI hashes"


@dataclass
class _Registered:
    """A bundled word put into one host embedding database: what to take out again."""

    db: Any
    model: Any  # the old-Forge forks' register_embedding_by_name also takes the model; None on Forge 2
    name: str
    embedding: Any  # the host's Embedding object
    lora: str  # the LoRA's name as the prompt gave it (A1111's BundledTIHash)


def _lora_module() -> Any:
    """The host's Lora extension's ``networks`` module (every Forge-family host imports it under that name)."""
    module = sys.modules.get("networks")
    return module if module is not None and hasattr(module, "loaded_networks") else None


def _lora_folder() -> Path:
    """``--lora-dir`` (A1111, Forge, reForge and Forge-Classic each register it in their Lora extension's preload, default
    ``models/Lora``)."""
    from modules import paths, shared  # lazy: host only

    folder = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    return Path(folder) if folder else Path(getattr(paths, "models_path", "models")) / "Lora"


def _loaded_loras(params_list: list[Any]) -> list[tuple[str, Path, bool]]:
    """(name in the prompt, file, whether the host already loaded its bundles) of each LoRA this pass loaded: the
    host's ``networks.loaded_networks`` when it has one, else the prompt's names looked up in the Lora folder."""
    module = _lora_module()
    if module is not None:
        found = []
        for net in list(module.loaded_networks):
            on_disk = getattr(net, "network_on_disk", None)
            filename = getattr(on_disk, "filename", None)
            if filename:
                name = str(getattr(net, "mentioned_name", None) or getattr(net, "name", ""))
                found.append((name, Path(filename), bool(getattr(net, "bundle_embeddings", None))))
        return found
    files = find_lora_files([_lora_folder()])
    names = [str(params.positional[0]) for params in params_list if getattr(params, "positional", None)]
    return [(name, files[name], False) for name in dict.fromkeys(names) if name in files]


def _host_databases(sd_model: Any) -> list[tuple[Any, Any]]:
    """(database, model argument) of every embedding database the loaded model's prompts go through: Forge 2 keeps one
    per text engine (``text_processing_engine``, ``_l``/``_g`` on SDXL); reForge and Forge-Classic keep A1111's one
    ``sd_hijack.model_hijack.embedding_db``, whose ``register_embedding_by_name`` also takes the model."""
    found = []
    for value in list(vars(sd_model).values()) if sd_model is not None else []:
        db = getattr(value, "embeddings", None)
        if hasattr(db, "register_embedding_by_name") and hasattr(db, "word_embeddings"):
            found.append((db, None))
    if found:
        return found
    try:
        from modules import sd_hijack  # lazy: host only

        db = sd_hijack.model_hijack.embedding_db
    except (ImportError, AttributeError):
        return []
    return [(db, sd_model)]


def _host_embedding(db: Any, bundled: BundledEmbedding) -> Any:
    """The host's own Embedding object for ``bundled``, made by the host's ``create_embedding_from_data`` from the
    vectors we read (the module that defines the database's class)."""
    module = sys.modules.get(type(db).__module__)
    create = getattr(module, "create_embedding_from_data", None)
    if create is None:
        raise AttributeError(f"{type(db).__module__} has no create_embedding_from_data")
    vectors = bundled.embedding.vectors
    data: dict[str, Any] = dict(vectors) if not hasattr(vectors, "shape") else {"string_to_param": {"*": vectors}}
    name = bundled.embedding.name
    return create(data, name, filename=f"{bundled.lora}/{name}")


def _ti_hash(lora: str) -> str | None:
    """A1111's ``BundledTIHash``: the LoRA's name, when "Add Lora name as TI hashes for bundled Textual Inversion"."""
    from modules import shared  # lazy: host only

    return lora if getattr(shared.opts, "lora_bundled_ti_to_infotext", True) else None


class BundleWords:
    """The bundled words registered for the pass being prepared, and the file reads kept between passes."""

    def __init__(self) -> None:
        self.registered: list[_Registered] = []
        self.cache: BundleCache = {}
        self.warned: set[str] = set()

    def _warn_once(self, message: str) -> None:
        if message not in self.warned:
            self.warned.add(message)
            log.warning("sdconcepts: %s", message)

    def remove_all(self) -> None:
        """Take every word registered here out of its database (a word the host has since replaced stays)."""
        for entry in reversed(self.registered):
            if entry.db.word_embeddings.get(entry.name) is not entry.embedding:
                continue
            try:
                if entry.model is not None:
                    entry.db.register_embedding_by_name(None, entry.model, entry.name)
                else:
                    entry.db.register_embedding_by_name(None, entry.name)
            except Exception:  # a model unloaded since: its database goes with it
                log.debug("could not unregister %s", entry.name, exc_info=True)
        self.registered.clear()

    def register(self, sd_model: Any, loras: list[tuple[str, Path, bool]]) -> list[str]:
        """Register the bundles of ``loras`` (name, file, loaded by the host itself) in the model's databases;
        the words registered."""
        self.remove_all()
        databases = _host_databases(sd_model)
        if not databases:
            return []
        for lora_name, path, native in loras:
            if native:
                continue
            found, problems = list_bundled({lora_name: path}, self.cache)
            for reason in problems.values():  # a broken file, a bundle that is no embedding: one line each
                self._warn_once(reason)
            for bundled in found:
                self._register_one(databases, bundled, lora_name)
        return list(dict.fromkeys(entry.name for entry in self.registered))

    def _register_one(self, databases: list[tuple[Any, Any]], bundled: BundledEmbedding, lora_name: str) -> None:
        name = bundled.embedding.name
        if any(name in db.word_embeddings for db, _model in databases):
            # A1111: 'Skip bundle embedding: "name" as it was already loaded from embeddings folder' (the folder's
            # word, or the same word bundled in an earlier LoRA of the prompt, wins)
            self._warn_once(f'skip bundle embedding "{name}" of {bundled.lora.name}: the word is already loaded')
            return
        for db, model in databases:
            try:
                embedding = _host_embedding(db, bundled)
            except Exception as exc:  # the host's reader refused what ours accepted: one line, the rest go on
                self._warn_once(f"bundled embedding {name} in {bundled.lora.name}: {exc}")
                return
            expected = getattr(db, "expected_shape", -1)
            if expected not in (-1, None) and expected != getattr(embedding, "shape", None):
                self._warn_once(
                    f"bundled embedding {name} in {bundled.lora.name}: width {embedding.shape} does not "
                    f"fit this model's {expected}"
                )
                continue
            embedding.shorthash = _ti_hash(lora_name)  # what reForge's and Forge-Classic's engines write
            if model is not None:
                db.register_embedding_by_name(embedding, model, name)
            else:
                db.register_embedding_by_name(embedding, name)
            self.registered.append(_Registered(db, model, name, embedding, lora_name))

    def infotext_hashes(self, used_names: list[str]) -> list[str]:
        """``word: lora`` for each registered word among ``used_names`` (names as the host's infotext writes them)."""
        lora_of = {entry.name.replace(":", "").replace(",", ""): entry.lora for entry in self.registered}
        return [f"{name}: {lora_of[name]}" for name in used_names if name in lora_of]


def _sd_model() -> Any:
    from modules import shared  # lazy: host only

    return shared.sd_model


_WORDS = BundleWords()


class BundledLora:
    """The host's ``lora`` extra network, wrapped: its own ``activate``/``deactivate`` first, then the bundled words.

    Duck-typed to the host's ``ExtraNetwork``; every other attribute is the wrapped network's.
    """

    def __init__(self, inner: Any, words: BundleWords = _WORDS) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", "lora")
        self.words = words

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self.inner, attribute)

    def activate(self, p: Any, params_list: list[Any]) -> None:
        self.inner.activate(p, params_list)
        try:
            self.words.register(getattr(p, "sd_model", None) or _sd_model(), _loaded_loras(params_list))
        except Exception:  # never break the host's generation over a bundle: said once, the LoRA itself still applies
            log.warning("sdconcepts: bundled embeddings could not be registered", exc_info=True)

    def deactivate(self, p: Any) -> None:
        try:
            self.inner.deactivate(p)
        finally:
            self.words.remove_all()


def wrap_lora_network() -> bool:
    """Put ``BundledLora`` around the registered ``lora`` network; False while there is none (idempotent)."""
    from modules import extra_networks  # lazy: host only

    current = extra_networks.extra_network_registry.get("lora")
    if current is None:
        return False
    if not isinstance(current, BundledLora):
        extra_networks.register_extra_network(BundledLora(current))
    return True


def add_infotext_hashes(p: Any, words: BundleWords = _WORDS) -> None:
    """A1111's ``TI hashes`` entry for the bundled words this pass used, where the host's engines wrote none (Forge 2
    writes ``TI: names``); A1111 writes it only with "Add Textual Inversion hashes to infotext" on."""
    from modules import shared  # lazy: host only

    params = getattr(p, "extra_generation_params", None)
    if params is None or not getattr(shared.opts, "textual_inversion_add_hashes_to_infotext", True):
        return
    used = [name.strip() for name in str(params.get("TI", "")).split(",") if name.strip()]
    written = str(params.get(INFOTEXT_FIELD, "") or "")
    present = {entry.split(":", 1)[0].strip() for entry in written.split(",") if entry.strip()}
    added = [entry for entry in words.infotext_hashes(used) if entry.split(":", 1)[0] not in present]
    if added and getattr(shared.opts, "lora_bundled_ti_to_infotext", True):
        params[INFOTEXT_FIELD] = ", ".join([written, *added] if written else added)


def script_class() -> type | None:
    """The always-visible script: wraps the ``lora`` network before each run (in case our ``before_ui`` ran before the
    Lora extension's) and adds the ``TI hashes`` entry before each sampling; None outside Forge."""
    return always_visible_script("SdconceptsBundledEmbeddings", "sdconcepts bundled embeddings",
                                 process=lambda p: wrap_lora_network(), before_every_sampling=add_infotext_hashes)


def _before_ui() -> None:
    wrap_lora_network()


def register() -> bool:
    """Inside Forge and its forks: wrap the ``lora`` extra network once the UI is about to be built. False, and
    nothing registered, on A1111 (which loads bundled embeddings itself) or outside a host."""
    if not is_forge():
        return False
    from modules import script_callbacks  # lazy: host only

    remove = getattr(script_callbacks, "remove_callbacks_for_function", None)
    if remove is not None:
        remove(_before_ui)
    script_callbacks.on_before_ui(_before_ui)
    return True
