"""Single-file checkpoint key maps by model family (SDXL here; SD 1/2 in `sdconcepts.checkpoint_files`)."""
