"""The Gradio web UI: ``app`` lays out and wires, ``handlers`` and ``cards`` decide, ``session`` holds state.

Only the modules in this package import gradio, and only ``compat`` knows how gradio versions differ.
"""
