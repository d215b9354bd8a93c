"""Single-file checkpoint key maps by model family: `layout` (UNet, VAE, OpenCLIP tower; shared), `sd` (SD 1.x/2.x),
`sdxl` (SGM layout). Reading, detection and config inference are `sdconcepts.checkpoint_files`."""
