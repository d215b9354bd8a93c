"""The drop-in extension: scripts/sdconcepts_ext.py run the way A1111/Forge run it, against a stand-in for the host's
``modules`` package that keeps A1111's callback contract (``modules/script_callbacks.py``: callbacks appended to
lists, ``ui_tabs_callback()`` concatenating their results, ``script_unloaded_callback()`` before a reload,
``remove_callbacks_for_function``). The extension code itself is real."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "browser"))
from library_files import write_library  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

SCRIPT_CALLBACKS = '''
callbacks_ui_tabs = []
callbacks_script_unloaded = []
callbacks_app_started = []
callbacks_after_component = []


def on_after_component(callback, *, name=None):
    callbacks_after_component.append(callback)


def after_component_callback(component, **kwargs):
    for callback in list(callbacks_after_component):
        callback(component, **kwargs)


def on_app_started(callback, *, name=None):
    callbacks_app_started.append(callback)


def on_ui_tabs(callback, *, name=None):
    callbacks_ui_tabs.append(callback)


def on_script_unloaded(callback, *, name=None):
    callbacks_script_unloaded.append(callback)


def remove_callbacks_for_function(callback):
    for callbacks in (callbacks_ui_tabs, callbacks_script_unloaded, callbacks_app_started, callbacks_after_component):
        while callback in callbacks:
            callbacks.remove(callback)


def ui_tabs_callback():
    result = []
    for callback in list(callbacks_ui_tabs):
        result += callback() or []
    return result


def script_unloaded_callback():
    for callback in reversed(list(callbacks_script_unloaded)):
        callback()


def app_started_callback(demo, app):
    for callback in list(callbacks_app_started):
        callback(demo, app)


def clear_callbacks():
    callbacks_ui_tabs.clear()
    callbacks_script_unloaded.clear()
    callbacks_app_started.clear()
    callbacks_after_component.clear()
'''


@pytest.fixture()
def host(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A webui folder with our library in its default places and a ``modules`` package describing it."""
    webui = tmp_path / "webui"
    embeddings, hypernetworks = write_library(webui / "lib", 48)
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    package = tmp_path / "host_modules" / "modules"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "script_callbacks.py").write_text(SCRIPT_CALLBACKS)
    (package / "paths.py").write_text(f"data_path = {str(webui)!r}\nmodels_path = {str(webui / 'models')!r}\n")
    (package / "shared.py").write_text(textwrap.dedent(f"""
        from types import SimpleNamespace
        cmd_opts = SimpleNamespace(embeddings_dir={str(embeddings)!r}, hypernetwork_dir={str(hypernetworks)!r},
                                   ckpt_dir=None)
        opts = SimpleNamespace(extra_networks_default_multiplier=0.8)
    """))
    sys.path.insert(0, str(package.parent))
    try:
        yield {"webui": webui, "embeddings": embeddings, "hypernetworks": hypernetworks}
    finally:
        from sdconcepts.host import a1111

        a1111.Registration.session = None
        sys.path.remove(str(package.parent))
        for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
            del sys.modules[name]


def _run_extension_script() -> ModuleType:
    """What A1111's ``scripts.load_scripts`` does: execute the file under its base name, not kept in sys.modules."""
    path = ROOT / "scripts" / "sdconcepts_ext.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extension_registers_one_tab_and_unregisters_before_a_reload(host: dict[str, Any]) -> None:
    import gradio as gr
    from modules import script_callbacks

    _run_extension_script()
    module = _run_extension_script()  # executed twice (a host that does not clear callbacks): still one tab
    # An A1111-like host (no modules_forge): no Forge script, no hypernet network or page of ours.
    assert not hasattr(module, "SdconceptsHypernetworks")
    assert not hasattr(module, "SdconceptsBundledEmbeddings")  # A1111 loads bundled embeddings itself
    assert len(script_callbacks.callbacks_app_started) == 1
    assert len(script_callbacks.callbacks_after_component) == 1
    # The host builds its txt2img page first, announcing each component (A1111's patched gradio constructors).
    with gr.Blocks():
        host_prompt = gr.Textbox(elem_id="txt2img_prompt")
        script_callbacks.after_component_callback(host_prompt, elem_id="txt2img_prompt")
        host_steps = gr.Slider(1, 150, elem_id="txt2img_steps")
        script_callbacks.after_component_callback(host_steps, elem_id="txt2img_steps")
        other = gr.Textbox(elem_id="img2img_prompt")
        script_callbacks.after_component_callback(other, elem_id="img2img_prompt")
    tabs = script_callbacks.ui_tabs_callback()
    assert [(title, elem_id) for _, title, elem_id in tabs] == [("sdconcepts", "sdconcepts")]
    blocks = tabs[0][0]
    assert isinstance(blocks, gr.Blocks)
    ids = {c.get("props", {}).get("elem_id") for c in blocks.config["components"]}
    # What the host lacks: the Train tab and the embedding tools; prompts and card pages are the host's.
    assert {"sdconcepts_train_root", "sdconcepts_ti_tools", "sdconcepts_train_read_txt2img"} <= ids
    assert not ids & {"sdconcepts_prompt", "sdconcepts_generate", "sdconcepts_ti_cards", "sdconcepts_hn_cards"}
    # The Train buttons read the host's txt2img prompt and steps for the previews, never its img2img.
    inputs = {i for d in blocks.config["dependencies"] for i in d["inputs"]}
    assert {host_prompt._id, host_steps._id} <= inputs and other._id not in inputs
    from sdconcepts.host import a1111

    assert a1111.Registration.session is not None
    assert list(a1111.Registration.session.config.embeddings_dirs) == [host["embeddings"]]

    script_callbacks.app_started_callback(None, None)  # gradio 3 or no demo: nothing to describe, no error
    script_callbacks.script_unloaded_callback()  # "Reload UI": the host unloads scripts first
    assert script_callbacks.ui_tabs_callback() == []
    assert script_callbacks.callbacks_app_started == []
    script_callbacks.clear_callbacks()
    _run_extension_script()
    assert len(script_callbacks.ui_tabs_callback()) == 1


def test_host_folders_fall_back_when_the_host_has_no_hypernetwork_option(host: dict[str, Any]) -> None:
    from modules import shared

    from sdconcepts.host.a1111 import host_config
    from sdconcepts.host.forge import hypernetwork_folder

    assert hypernetwork_folder() == Path(host["hypernetworks"])
    del shared.cmd_opts.hypernetwork_dir  # Forge-Classic removed --hypernetwork-dir
    config = host_config()
    webui = host["webui"]
    assert list(config.hypernetworks_dirs) == [webui / "models" / "hypernetworks"]
    assert hypernetwork_folder() == webui / "models" / "hypernetworks"  # Forge's tag and page read the same folder
    assert list(config.embeddings_dirs) == [host["embeddings"]]
    assert config.models_dir == webui / "models" / "Stable-diffusion"
    assert config.outputs_dir == webui / "outputs" / "sdconcepts"
    assert config.multiplier() == 0.8


def test_host_lora_folder_and_conversion_setting(host: dict[str, Any]) -> None:
    """Our tab's bundled-embedding cards read the host's ``--lora-dir`` (every host's Lora extension registers it,
    default ``models/Lora``); the on-the-fly SD 1.x -> SDXL conversion follows our host setting, off by default."""
    from modules import shared

    from sdconcepts.host.a1111 import host_config
    from sdconcepts.host.options import CONVERT_SD1_SETTING

    webui = host["webui"]
    config = host_config()
    assert list(config.lora_dirs) == [webui / "models" / "Lora"]
    assert config.convert_sd1_on_sdxl is False
    shared.cmd_opts.lora_dir = str(webui / "my-loras")
    setattr(shared.opts, CONVERT_SD1_SETTING, True)
    config = host_config()
    assert list(config.lora_dirs) == [webui / "my-loras"]
    assert config.convert_sd1_on_sdxl is True


def test_outside_a_host_the_script_registers_nothing() -> None:
    from sdconcepts.host.a1111 import register

    assert "modules" not in sys.modules
    assert register() is False
