"""The host's loaded model (A1111's ``shared.sd_model``, Forge's and its forks' ``forge_objects``) as our LoadedModel,
no copy.

Our tab trains and generates on the checkpoint the web UI already holds (SD 1.x, 2.x, XL): the host's tensors are
seen under their LDM key names (Forge's text encoders under their transformers names: `sdconcepts.host.views`) and
``backends.model_loading.model_sharing_weights`` builds our modules over that same memory (new
``Parameter`` objects, ``requires_grad`` False; the host's modules, flags and hooks are never touched, so its own
images stay bit-identical). Forge loads its patchers through its own memory manager first, as its sampling does.

Also: after we write an embedding or hypernetwork, the host's databases are reloaded so that its txt2img uses the
file at once. Host ``modules.*`` / ``backend.*`` are imported inside functions only.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sdconcepts.host import capabilities, views
from sdconcepts.host.capabilities import HostModelError
from sdconcepts.host.forge import is_forge

__all__ = ["HostModel", "HostModelError", "reload_host_files"]

log = logging.getLogger(__name__)


# (host weights for model_sharing_weights, checkpoint name, short hash, prediction type, the host's model object)
_View = tuple[views.HostWeights, str, str | None, str, Any]


def _a1111_view() -> _View:
    from modules import shared  # lazy: host only

    model = shared.sd_model  # A1111 loads its selected checkpoint here when none is loaded yet
    if model is None:
        raise HostModelError("the web UI has no model loaded; select a checkpoint in its dropdown first")
    prediction = "v_prediction" if getattr(model, "parameterization", "eps") == "v" else "epsilon"
    return views.a1111_weights(model), *_checkpoint_names(model), prediction, model


def _forge_view() -> _View:
    """Forge and its forks: the patchers in ``forge_objects``. What loads the model and what places its weights is
    looked up, as each generation of Forge names it differently (``host.capabilities``)."""
    model = capabilities.load_forge_model()
    objects = getattr(model, "forge_objects", None)
    if model is None or objects is None:
        raise HostModelError("the web UI has no model loaded; select a checkpoint in its dropdown first")
    try:
        views.forge_family(getattr(objects.clip, "cond_stage_model", None))
        prediction = views.forge_prediction(objects)
    except views.UnsupportedHostModel as exc:
        raise HostModelError(str(exc)) from None
    # As the host's own sampling does: its memory manager puts the patchers where they compute (and applies LoRAs).
    capabilities.place_forge_patchers([objects.unet, objects.clip.patcher, objects.vae.patcher])
    return views.forge_weights(objects), *_checkpoint_names(model), prediction, model


def _checkpoint_names(model: Any) -> tuple[str, str | None]:
    info = getattr(model, "sd_checkpoint_info", None)
    name = getattr(info, "name_for_extra", None) or getattr(info, "model_name", None) or "web UI model"
    short = getattr(info, "shorthash", None)
    return str(name), (str(short) if short else None)


class HostModel:
    """Our view of the host's model, rebuilt when the host's model or the memory of its weights changed.

    The view holds references to the host's tensors, so it is dropped as soon as the host loads another model
    (``forget``, from ``on_model_loaded``): otherwise it would keep the old weights alive beside the new ones.
    """

    def __init__(self) -> None:
        # Reentrant: A1111 loads its model on our first access, and its on_model_loaded callback calls forget()
        # on this thread while load() holds the lock.
        self._lock = threading.RLock()
        self._key: tuple[int, int] | None = None
        self._model: Any = None

    def load(self) -> Any:
        from sdconcepts.backends.model_loading import (  # lazy: transformers, diffusers
            ModelLoadError,
            model_sharing_weights,
        )

        with self._lock:
            weights, name, short_hash, prediction, owner = _forge_view() if is_forge() else _a1111_view()
            state, text_encoders, family = weights
            tensors = [*state.items(), *((f"text{i}.{k}", v) for i, te in enumerate(text_encoders or []) for k, v in te.items())]
            # Where every tensor lives: moved weights (Forge offloading, a dtype change) invalidate the view.
            key = (id(owner), hash(tuple((k, v.data_ptr(), str(v.device), v.dtype) for k, v in tensors)))
            if self._model is not None and self._key == key:
                self._model.name, self._model._hash = name, short_hash
                return self._model
            self._model = self._key = None  # the old view goes before the new one is built
            try:
                model = model_sharing_weights(state, name=name, short_hash=short_hash, prediction_type=prediction,
                                              text_encoders=text_encoders, family=family)
            except ModelLoadError as exc:
                raise HostModelError(f"the web UI's model cannot be used: {exc}") from None
            self._model, self._key = model, key
            log.info("training and generating on the web UI's model %s (shared weights, %s)", name, model.dtype)
            return model

    def loaded_width(self) -> int | None:
        """The text width of the view when it exists (no loading: asked while the page is built)."""
        model = self._model
        return int(model.context_width) if model is not None else None

    def loaded(self) -> Any:
        """The view when it exists (no loading: asked while the page is built), else None."""
        return self._model

    def forget(self, *_args: Any) -> None:
        with self._lock:
            self._model = None
            self._key = None


def reload_host_files(kind: str) -> str | None:
    """Make the host see files we wrote: its embedding databases reload, its hypernetwork list is rescanned.

    Returns None when done, else one line for the page (also logged): the file is saved either way.
    """
    try:
        if kind == "embedding":
            return capabilities.reload_embeddings()
        if kind == "hypernetwork":
            capabilities.reload_hypernetworks()
    except Exception as exc:  # noqa: BLE001 - the file is saved; a host that cannot reload must not fail the run
        message = f"the web UI did not reload its {kind} files ({type(exc).__name__}: {exc}); press Refresh on its page"
        log.warning(message)
        return message
    return None
