"""Our view of Forge's loaded model (sdconcepts.host.views) against Forge's own classes, for SD 1.x, SD 2.x and SDXL
(issue 12), without the web UI: forge_views_check.py runs in the prepared Forge tree's venv, builds Forge's engine
objects from tiny checkpoints as Forge's loader does, and compares our view's conditioning (and SDXL's pooled
vector) and UNet output with Forge's own, and the view's memory with Forge's tensors. Full-size SD 2 is tested in the
running host (test_forge_sd2_host_model.py); a full-size SDXL file (about 7 GB, 12 GB in Forge's float32 on the
CPU) does not fit the test machines beside everything else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import host_harness as hh
import pytest

CHECK = Path(__file__).resolve().with_name("forge_views_check.py")


@pytest.mark.parametrize("clip_dtype", ["fp32", "fp16"])
def test_forge_view_matches_forges_own_conditioning_and_unet(host_manager: hh.HostManager, clip_dtype: str) -> None:
    if "forge" not in host_manager.dirs:
        pytest.skip(f"forge not prepared (set {hh.ENV_DIRS['forge']})")
    forge = host_manager.dirs["forge"]
    args = [str(forge / "venv" / "bin" / "python"), str(CHECK), str(forge)]
    if clip_dtype == "fp16":
        args.append("--clip-fp16")  # Forge's default: CLIP held in float16
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    sys.stdout.write(done.stdout)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    checked = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if line.startswith("OK ")]
    assert checked == ["sd1", "sd2", "sdxl"], done.stdout
