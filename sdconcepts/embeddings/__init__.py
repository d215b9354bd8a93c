"""Textual inversion embeddings: the value (`embedding`), its file formats (`files`, with `image_codec` for embeddings inside pictures), the library of embedding
folders with A1111's listing rules (`library`), the generic folder scan it is built on (`folder_scan`, which the
hypernetwork library reuses) and the embedding tools (`tools`: nearest tokens, the mix language, keep/drop).

Pure: torch and safetensors only (no diffusers, gradio or host ``modules``). Anything may import this package except
the root modules it is built on (prompts, safe_load, atomic_files, hash_cache, user_metadata).
"""
