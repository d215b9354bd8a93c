"""A1111 hypernetworks: the module (`hypernetwork`), its ``.pt`` files (`files`), attaching it to a UNet's
to_k/to_v (`attach`), and the hypernetwork library (`library`: A1111's listing rules and the one cache of loaded
hypernetworks that the web UI, the CLI and the Forge adapter share).

Pure: torch and safetensors only (no diffusers, gradio or host ``modules``). Anything may import this package except
the root modules and the embeddings package that it is built on.
"""
