"""What the running web UI offers, looked up function by function: A1111 1.10, Forge, reForge, Forge-Classic.

The hosts share module names but not functions (read from their trees, ``../shared/hosts``):

- **Forge** (2.x, ``backend/``) loads its selected checkpoint with ``sd_models.forge_model_reload()`` and places
  weights with ``backend.memory_management.load_models_gpu``; each text engine of its model holds its own embedding
  database, and its Textual Inversion page another (``ui_extra_networks_textual_inversion.embedding_db``).
- **reForge** and **Forge-Classic** fork the *old* Forge (``ldm_patched`` + ``modules_forge``): no
  ``forge_model_reload``; ``shared.sd_model`` loads the selected checkpoint as in A1111, the weights are placed by
  ``ldm_patched.modules.model_management.load_models_gpu``, and embeddings live in A1111's
  ``sd_hijack.model_hijack.embedding_db``. reForge keeps A1111's hypernetwork list (``shared.reload_hypernetworks``);
  Forge-Classic has none.
- **A1111** has ``shared.sd_model`` (lazy load), ``sd_hijack.model_hijack.embedding_db`` and
  ``shared.reload_hypernetworks``.

Every function below looks up what it calls and uses the equivalent the host has; where none exists it raises
``HostModelError`` or returns one sentence for the page (and logs it): never an ``AttributeError`` from deep inside.
Host ``modules.*`` are imported inside functions only (``sdconcepts.host`` imports without a host).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "HostModelError",
    "MEMORY_MANAGERS",
    "load_forge_model",
    "memory_manager",
    "place_forge_patchers",
    "reload_embeddings",
    "reload_hypernetworks",
]

log = logging.getLogger(__name__)

# Where each generation of Forge keeps ``load_models_gpu`` (newest first).
MEMORY_MANAGERS = ("backend.memory_management", "ldm_patched.modules.model_management")


class HostModelError(ValueError):
    """The host's model cannot be used by our tab (none loaded, Flux, a function the host lacks); one sentence."""


def _module(name: str) -> Any:
    """The host's module ``name``, or None where the host has no such module (never a stray same-named package:
    only modules found on the host's path are imported, and an import error of a present module propagates)."""
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    return importlib.import_module(name)


def load_forge_model() -> Any:
    """The host's loaded model, loading the selected checkpoint when none is: Forge's ``forge_model_reload()``,
    else (the old-Forge forks) A1111's lazy ``shared.sd_model``."""
    from modules import sd_models, shared  # lazy: host only

    reload = getattr(sd_models, "forge_model_reload", None)
    try:
        if callable(reload):
            model, _ = reload()
            return model
        if "sd_model" in dir(shared) or hasattr(type(shared), "sd_model"):
            return shared.sd_model
    except (ValueError, FileNotFoundError) as exc:  # Forge: "You do not have any model!"; A1111: no checkpoints
        raise HostModelError(f"the web UI has no model loaded: {exc}") from None
    raise HostModelError(
        "this web UI offers neither sd_models.forge_model_reload nor shared.sd_model, so our tab cannot reach its "
        "model; choose a checkpoint file in the Model dropdown instead"
    )


def memory_manager() -> Callable[[list[Any]], Any] | None:
    """The host's ``load_models_gpu`` (Forge's ``backend`` or old Forge's ``ldm_patched``), None when it has none."""
    for name in MEMORY_MANAGERS:
        module = _module(name)
        load = getattr(module, "load_models_gpu", None) if module is not None else None
        if callable(load):
            return load  # type: ignore[no-any-return]
    return None


def place_forge_patchers(patchers: Sequence[Any]) -> None:
    """As the host's own sampling does before it computes: its memory manager loads the patchers (and their LoRAs)
    where they compute; refused in one sentence where the host has no memory manager we know."""
    load = memory_manager()
    if load is None:
        raise HostModelError(
            f"this web UI has no load_models_gpu in {' or '.join(MEMORY_MANAGERS)}, so its model's weights cannot "
            "be placed for training; choose a checkpoint file in the Model dropdown instead"
        )
    load(list(patchers))


def _call_reload(database: Any, **wanted: Any) -> None:
    """``database.load_textual_inversion_embeddings`` with those of ``wanted``'s keyword arguments it accepts."""
    method = database.load_textual_inversion_embeddings
    try:
        accepted = set(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        accepted = set()
    method(**{k: v for k, v in wanted.items() if k in accepted})


def reload_embeddings() -> str | None:
    """Reload every embedding database the host has, so that its txt2img uses a file we just wrote.

    A1111/reForge/Forge-Classic: ``sd_hijack.model_hijack.embedding_db``; Forge: the text engines' databases of its
    loaded model and its Textual Inversion page's. None when at least one was reloaded, else one sentence.
    """
    reloaded: list[str] = []
    sd_hijack = _module("modules.sd_hijack")
    database = getattr(getattr(sd_hijack, "model_hijack", None), "embedding_db", None)
    if database is not None:
        _call_reload(database, force_reload=True)
        reloaded.append("sd_hijack")
    # Forge 2.x: one database per text engine of the loaded model (read once when the model was built). The model
    # is read where the host keeps it, never loaded for this.
    sd_models = _module("modules.sd_models")
    model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
    for attribute in dir(model) if model is not None else ():
        if attribute.startswith("text_processing_engine"):
            engine_db = getattr(getattr(model, attribute, None), "embeddings", None)
            if engine_db is not None and hasattr(engine_db, "load_textual_inversion_embeddings"):
                _call_reload(engine_db)
                reloaded.append(attribute)
    cards = _module("modules.ui_extra_networks_textual_inversion")
    cards_db = getattr(cards, "embedding_db", None)
    if cards_db is not None and cards_db is not database:
        _call_reload(cards_db, force_reload=True, sync_with_sd_model=False)
        reloaded.append("cards")
    if reloaded:
        return None
    message = ("this web UI has no embedding database we know how to reload; the file is saved: press Refresh on "
               "its Textual Inversion page")
    log.warning(message)
    return message


def reload_hypernetworks() -> None:
    """Rescan the host's hypernetwork list where it keeps one (A1111, reForge: ``shared.reload_hypernetworks``).

    Forge and Forge-Classic have no list of their own: our Hypernetworks page and tag resolver (``host.forge``) read
    the folder on every refresh and use, so there is nothing to tell them.
    """
    from modules import shared  # lazy: host only

    reload = getattr(shared, "reload_hypernetworks", None)
    if callable(reload):
        reload()
