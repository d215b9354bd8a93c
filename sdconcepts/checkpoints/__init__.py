"""A1111 single-file checkpoints (the LDM/CompVis and SGM key layouts) and their conversion to diffusers' layout.

`files` reads and writes the files, tells the family and prediction type apart and infers the model configs;
`configs` holds the reference configs and what tensor shapes say; the key maps live by family: `layout` (UNet, VAE,
OpenCLIP tower; shared), `sd` (SD 1.x/2.x), `sdxl` (SGM layout). Pure: torch and safetensors only. Anything may
import this package (building diffusers models from it is `sdconcepts.backends.single_file`); it imports only the
root's safe_load and atomic_files.
"""
