"""Serve our tab the way A1111/Forge do, for the browser test: the host's page is a ``gr.Blocks`` with a ``gr.Tabs``
whose items render each ``on_ui_tabs`` Blocks (A1111 ``modules/ui.py``), next to the host's own txt2img prompt
(``#txt2img_prompt``) that our cards must never touch. The host injects ``javascript/*.js`` and ``style.css`` into
the page; here the same file runs on page load and the same stylesheet is passed as css.

    python tests/browser/hosted_app.py PORT MODEL EMBEDDINGS_DIR HYPERNETWORKS_DIR OUTPUTS_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from sdconcepts.host.a1111 import build_tabs  # noqa: E402
from sdconcepts.ui.app import install_js, read_css  # noqa: E402
from sdconcepts.ui.compat import QUEUE_KWARGS, blocks_kwargs, launch_kwargs  # noqa: E402
from sdconcepts.ui.ui_session import UiConfig, UiSession  # noqa: E402


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
    tabs = build_tabs(session)  # built before the host's page, as A1111 calls ui_tabs_callback() first
    css = read_css()
    with gr.Blocks(analytics_enabled=False, title="host", **blocks_kwargs(css)) as demo:
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("txt2img", id="txt2img", elem_id="tab_txt2img"):
                gr.Textbox(label="Prompt", elem_id="txt2img_prompt", value="the host's own prompt", lines=2)
            for interface, label, ifid in tabs:
                with gr.Tab(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
    install_js(demo)
    demo.queue(**QUEUE_KWARGS)  # A1111 queues with concurrency_count=64
    demo.launch(server_name="127.0.0.1", server_port=int(port), prevent_thread_lock=False, **launch_kwargs(css))


if __name__ == "__main__":
    main()
