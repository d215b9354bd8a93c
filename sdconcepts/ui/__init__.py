"""The Gradio web UI: pages laid out and wired here, their decisions in gradio-free handler modules.

What lives here: ``app`` (the whole UI, ``build_ui`` / ``launch_app``) and the ``*_tab`` modules lay out and wire
components; ``controls`` holds the component groups tabs share; ``handlers`` (txt2img and the card tabs), ``cards``,
``img2img_handlers``, ``train_handlers`` (the Train tab's forms and decisions), ``train_jobs`` (the running training
job and its views), ``train_preprocess`` and ``embedding_tools_handlers`` decide without gradio; ``ui_session``
holds what one running UI holds (folders, libraries, the loaded model); ``compat`` alone knows how gradio versions
differ.

Who may import it: the command line (``cli``, to serve the app), the host adapters (``host``, to render it inside
A1111/Forge), tests and bench; no other module of the package. Only the modules here import gradio (ruff's
banned-api rule).
"""
