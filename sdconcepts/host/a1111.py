"""The A1111/Forge adapter: registers our tab through ``script_callbacks.on_ui_tabs`` and reads the host's folders.

Host ``modules.*`` are imported only under ``sdconcepts/host/`` and only inside functions, so the rest of the package
(and this file's ``build_tabs``) imports without a host. Our tab holds what the host lacks (the Train tab, the
embedding tools) and trains on the host's loaded model (``host.model``, no second copy); the host's own txt2img is
left alone, and only read for the Train tab's previews when the user asks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdconcepts.host.model import HostModel, reload_host_files
from sdconcepts.host.options import CONVERT_SD1_SETTING, TRAIN_ROOT_DEST, TRAIN_ROOT_OPTION
from sdconcepts.ui.ui_session import UiConfig, UiSession

__all__ = ["HOST_TXT2IMG_IDS", "TAB_ID", "TAB_TITLE", "build_tabs", "host_config", "on_after_component", "register",
           "unregister"]

log = logging.getLogger(__name__)

TAB_TITLE = "sdconcepts"
TAB_ID = "sdconcepts"


# The host's txt2img components our Train tab reads for its previews ("Read parameters from txt2img"), by their
# elem_id in A1111 1.10, Forge, reForge and Forge-Classic (modules/ui.py, ui_toprow.py, scripts/sampler.py, seed.py);
# the keys are train_tab.PREVIEW_FROM_TXT2IMG's sources.
HOST_TXT2IMG_IDS = {"txt2img_prompt": "prompt", "txt2img_neg_prompt": "negative", "txt2img_steps": "steps",
                    "txt2img_sampling": "sampler", "txt2img_scheduler": "schedule", "txt2img_cfg_scale": "cfg_scale",
                    "txt2img_seed": "seed"}


class Registration:
    """The one session a host process serves; dropped (with its model) when the host unloads scripts."""

    session: UiSession | None = None
    blocks: Any = None
    host_model: Any = None  # host.model.HostModel: our view of the host's loaded model
    txt2img: dict[str, Any] = {}  # noqa: RUF012 -- HOST_TXT2IMG_IDS' components, as the host builds its page


def host_config() -> UiConfig:
    """Our folders from the host's settings: ``--embeddings-dir`` (Forge-Classic's default is ``models/embeddings``),
    ``--hypernetwork-dir`` (Forge-Classic lacks it: ``models/hypernetworks``), ``--ckpt-dir``, ``--lora-dir`` (every
    host's Lora extension registers it, default ``models/Lora``: where our session finds bundled embeddings), ``--sdconcepts-train-root``,
    the default-multiplier setting for hypernet tags, and our on-the-fly SD 1.x -> SDXL setting."""
    from modules import paths, shared  # lazy: host only

    cmd_opts = getattr(shared, "cmd_opts", None)
    data_path = Path(getattr(paths, "data_path", "."))
    models_path = Path(getattr(paths, "models_path", data_path / "models"))

    def option(name: str) -> Any:
        return getattr(cmd_opts, name, None) if cmd_opts is not None else None

    def multiplier() -> float:
        try:
            return float(getattr(shared.opts, "extra_networks_default_multiplier", 1.0))
        except (TypeError, ValueError):
            return 1.0

    embeddings = option("embeddings_dir") or data_path / "embeddings"
    hypernetworks = option("hypernetwork_dir") or models_path / "hypernetworks"
    checkpoints = option("ckpt_dir") or models_path / "Stable-diffusion"
    loras = option("lora_dir") or models_path / "Lora"
    device = None
    try:
        from modules import devices  # lazy: host only

        device = str(devices.device) if getattr(devices, "device", None) is not None else None
    except ImportError:
        pass

    if Registration.host_model is None:
        Registration.host_model = HostModel()
    outputs = data_path / "outputs" / "sdconcepts"
    return UiConfig(
        models_dir=Path(checkpoints),
        embeddings_dirs=[Path(embeddings)],
        hypernetworks_dirs=[Path(hypernetworks)],
        outputs_dir=outputs,
        device=device,
        multiplier=multiplier,
        # The Train tab's folders: the default ones (the host's working folder, the folders above) and each
        # --sdconcepts-train-root (registered with the host by preload.py; hosts reject options nobody registered).
        extra_train_roots=[Path(root) for root in option(TRAIN_ROOT_DEST) or ()],
        train_root_option=TRAIN_ROOT_OPTION,
        host_model=Registration.host_model,
        files_changed=reload_host_files,
        lora_dirs=[Path(loras)],
        convert_sd1_on_sdxl=bool(getattr(shared.opts, CONVERT_SD1_SETTING, False)),
    )


def build_tabs(session: UiSession, host_txt2img: dict[str, Any] | None = None) -> list[tuple[Any, str, str]]:
    """What ``on_ui_tabs`` returns: ``[(blocks, title, elem_id)]``. The host loads our JS and CSS files itself.

    Our tab inside a host holds what the host lacks: the Train tab and the embedding tools (``app.build_hosted_ui``);
    prompts, pictures and the card pages are the host's own. ``host_txt2img``: the host's txt2img components the
    Train tab reads for its previews (by default those collected by ``on_after_component``).
    """
    from sdconcepts.ui.app import build_ui  # lazy: gradio

    components = Registration.txt2img if host_txt2img is None else host_txt2img
    return [(build_ui(session, standalone=False, host_txt2img=components), TAB_TITLE, TAB_ID)]


def on_after_component(component: Any, **kwargs: Any) -> None:
    """Keep the host's txt2img components the Train tab reads (A1111 builds txt2img before calling on_ui_tabs)."""
    source = HOST_TXT2IMG_IDS.get(str(kwargs.get("elem_id") or getattr(component, "elem_id", None) or ""))
    if source is not None:
        Registration.txt2img[source] = component


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    if Registration.session is None:
        Registration.session = UiSession(host_config())
    tabs = build_tabs(Registration.session)
    Registration.blocks = tabs[0][0]
    return tabs


def on_app_started(demo: Any, app: Any) -> None:
    """Forge's gradio 4 page: describe our events so its client does not warn about their arguments."""
    from sdconcepts.ui.compat import describe_events_for_the_page  # lazy: gradio

    describe_events_for_the_page(demo, app, Registration.blocks)


def on_ui_settings() -> None:
    """Our setting in the host's Settings (section "sdconcepts"), default off so that our tab's pictures stay A1111's;
    the embedding tools' checkbox in our tab starts from it. The host's own txt2img never converts."""
    from modules import shared  # lazy: host only

    info = shared.OptionInfo(
        False,
        "sdconcepts tab: use SD 1.x embeddings on SDXL models, converted on the fly (A1111 skips them; the infotext "
        "says so)",
        onchange=_convert_setting_changed,
        section=("sdconcepts", "sdconcepts"),
    )
    shared.opts.add_option(CONVERT_SD1_SETTING, info)


def _convert_setting_changed() -> None:
    from modules import shared  # lazy: host only

    if Registration.session is not None:
        Registration.session.convert_sd1_on_sdxl = bool(getattr(shared.opts, CONVERT_SD1_SETTING, False))


def on_model_loaded(_sd_model: Any) -> None:
    """The host loaded another model: drop our view of the old one, which would keep its weights in memory."""
    if Registration.host_model is not None:
        Registration.host_model.forget()


def unregister() -> None:
    """Forget our callbacks and the loaded model; the host calls this before it reloads scripts."""
    from modules import script_callbacks  # lazy: host only

    remove = getattr(script_callbacks, "remove_callbacks_for_function", None)
    if remove is not None:
        remove(on_ui_tabs)
        remove(on_app_started)
        remove(on_model_loaded)
        remove(on_after_component)
        remove(on_ui_settings)
        remove(unregister)
    if Registration.host_model is not None:
        Registration.host_model.forget()
    if Registration.session is not None:
        Registration.session.unload()
    Registration.session = None
    Registration.blocks = None
    Registration.txt2img = {}


def register() -> bool:
    """Register our tab with the host; False (and nothing done) when not running inside A1111/Forge.

    Safe to call again: an earlier registration of the same functions is removed first, so a reload never
    duplicates the tab even on hosts that do not clear callbacks.
    """
    try:
        from modules import script_callbacks  # lazy: host only
    except ImportError:
        return False
    remove = getattr(script_callbacks, "remove_callbacks_for_function", None)
    if remove is not None:
        remove(on_ui_tabs)
        remove(on_app_started)
        remove(on_model_loaded)
        remove(on_after_component)
        remove(on_ui_settings)
        remove(unregister)
    Registration.txt2img = {}
    on_after_component_hook = getattr(script_callbacks, "on_after_component", None)
    if on_after_component_hook is not None:  # without it the previews keep their own settings
        on_after_component_hook(on_after_component)
    script_callbacks.on_ui_tabs(on_ui_tabs)
    on_ui_settings_hook = getattr(script_callbacks, "on_ui_settings", None)
    if on_ui_settings_hook is not None:  # every A1111 1.x / Forge has it
        on_ui_settings_hook(on_ui_settings)
    on_app_started_hook = getattr(script_callbacks, "on_app_started", None)
    if on_app_started_hook is not None:  # every A1111 1.x / Forge has it; older forks may not
        on_app_started_hook(on_app_started)
    on_model_loaded_hook = getattr(script_callbacks, "on_model_loaded", None)
    if on_model_loaded_hook is not None:
        on_model_loaded_hook(on_model_loaded)
    script_callbacks.on_script_unloaded(unregister)
    return True
