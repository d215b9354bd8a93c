"""Serve our tab the way A1111/Forge do, for the browser test: the host builds its txt2img page first (a ``gr.Blocks``
whose components it announces to ``script_callbacks.on_after_component``: prompt, negative prompt, steps, sampler,
schedule type, CFG scale, seed under A1111 1.10's elem_ids), then calls ``on_ui_tabs``, then renders every page as an
item of one ``gr.Tabs`` (A1111 ``modules/ui.py``). Our Train tab reads the host's txt2img for its previews; nothing
of ours writes to it. The host injects ``javascript/*.js`` and ``style.css`` into the page; here the same file runs
on page load and the same stylesheet is passed as css. The real hosts are driven by tests/hosts.

    python tests/browser/hosted_app.py PORT MODEL EMBEDDINGS_DIR HYPERNETWORKS_DIR OUTPUTS_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from sdconcepts.host.a1111 import build_tabs, on_after_component  # noqa: E402
from sdconcepts.ui.app import install_js, read_css  # noqa: E402
from sdconcepts.ui.compat import QUEUE_KWARGS, blocks_kwargs, launch_kwargs  # noqa: E402
from sdconcepts.ui.ui_session import UiConfig, UiSession  # noqa: E402


def announce(component: gr.components.Component) -> None:
    """What A1111's patched gradio component constructor does after each component (modules/gradio_extensons.py)."""
    on_after_component(component, elem_id=component.elem_id)


def main() -> None:
    port, model, embeddings, hypernetworks, outputs = sys.argv[1:6]
    session = UiSession(
        UiConfig(
            ckpt=Path(model) if model != "-" else None,
            embeddings_dirs=[Path(embeddings)],
            hypernetworks_dirs=[Path(hypernetworks)],
            outputs_dir=Path(outputs),
        )
    )
    with gr.Blocks(analytics_enabled=False) as txt2img:
        # A1111 1.10's txt2img fields the Train tab's previews read; A1111's sampler and schedule type are apart.
        announce(gr.Textbox(label="Prompt", elem_id="txt2img_prompt", value="the host's own prompt", lines=2))
        announce(gr.Textbox(label="Negative prompt", elem_id="txt2img_neg_prompt", value="", lines=2))
        announce(gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="txt2img_steps"))
        announce(gr.Dropdown(["DPM++ 2M", "Euler a", "LMS"], value="DPM++ 2M", label="Sampling method",
                             elem_id="txt2img_sampling"))
        announce(gr.Dropdown(["Automatic", "Karras"], value="Karras", label="Schedule type",
                             elem_id="txt2img_scheduler"))
        announce(gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id="txt2img_cfg_scale"))
        announce(gr.Number(value=-1, label="Seed", elem_id="txt2img_seed", precision=0))
    tabs = build_tabs(session)  # A1111 calls ui_tabs_callback() after building txt2img, before its page
    css = read_css()
    with gr.Blocks(analytics_enabled=False, title="host", **blocks_kwargs(css)) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                txt2img.render()
            for interface, label, ifid in tabs:
                with gr.Tab(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    install_js(demo)
    demo.queue(**QUEUE_KWARGS)  # A1111 queues with concurrency_count=64
    demo.launch(server_name="127.0.0.1", server_port=int(port), prevent_thread_lock=False, **launch_kwargs(css))


if __name__ == "__main__":
    main()
