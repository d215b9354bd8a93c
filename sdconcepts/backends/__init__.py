"""Edges over diffusers/transformers: the only package allowed to import them.

`model_loading` loads a model into a `loaded_model.LoadedModel`; `prompt_encoder` turns prompts into conditioning
(A1111's chunks, emphasis and embedding placement, SD 1/2 and SDXL); `sampling` runs txt2img and img2img from
`sampler_start`'s noise or init latents; `single_file` builds models from A1111 checkpoint files; `tiny` builds small
test models; `tokenizer` holds the shipped CLIP tokenizer. Imported by the edges (cli, ui, host, training's
backend port, toyworld) and by nothing in the pure core.
"""
