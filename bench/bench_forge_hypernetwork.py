"""Benchmark: what ``<hypernet:name:1>`` adds to a generation in the real Forge, against the same Forge without the
tag, interleaved in one run (issue 11: a 768-only hypernetwork at 512 px on an SD-1.5-shaped model, goal ≤ 2 %).

It drives a running Forge (``--api``, this extension installed, an SD 1.5 checkpoint loaded, the hypernetwork file in
its ``models/hypernetworks``) through ``POST /sdapi/v1/txt2img``. Two figures per mode:

- wall time of the request;
- CPU time of the Forge process during the request (``/proc/PID/stat``; given ``--pid`` or ``DEST/host.pid``), which
  other jobs on a shared machine disturb far less than wall time.

Usage: ``python bench/bench_forge_hypernetwork.py --url http://127.0.0.1:7873 --dest FORGE_TREE --name hn_768
[--size 512] [--steps 2] [--repeats 3]``. A warm-up pair runs first (model load, file load, caches).

``--work FILE.pt`` needs no Forge: it times (this process's CPU time, best of the repeats) exactly the calls
Forge makes to our patches in one SD 1.5 sampling step at ``--size`` with CFG (batch 2): 16 transformer blocks, each
an attn1 call on its hidden states (4096/1024/256/64 tokens at 320/640/1280 channels) and an attn2 call on a new
[2, 77, 768] text context, under ``torch.inference_mode``. Divide by a step's time from the run above for the share.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import urllib.request
from pathlib import Path


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    # utime, stime, cutime, cstime (fields 14-17 of stat; index 11-14 after the command name)
    return sum(int(value) for value in fields[11:15]) / ticks


def generate(url: str, prompt: str, size: int, steps: int, pid: int | None) -> tuple[float, float]:
    body = {
        "prompt": prompt, "steps": steps, "width": size, "height": size, "sampler_name": "Euler",
        "cfg_scale": 7, "seed": 42, "override_settings": {"emphasis": "None"},
    }
    request = urllib.request.Request(
        f"{url}/sdapi/v1/txt2img", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    cpu_before = cpu_seconds(pid) if pid else 0.0
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as answer:
        answer.read()
    wall = time.perf_counter() - start
    cpu = cpu_seconds(pid) - cpu_before if pid else float("nan")
    return wall, cpu


def patch_work(path: Path, size: int, repeats: int) -> float:
    """CPU seconds our patches take in one SD 1.5 step (see the module docstring)."""
    import torch

    from sdconcepts.hypernetworks.attach import AttentionPatch
    from sdconcepts.hypernetworks.files import load_hypernetwork

    hypernetwork = load_hypernetwork(path).eval()
    side = size // 8
    # SD 1.5's 16 transformer blocks: (tokens, channels) per block, input -> middle -> output.
    blocks = [(side**2, 320)] * 2 + [(side**2 // 4, 640)] * 2 + [(side**2 // 16, 1280)] * 2 + [(side**2 // 64, 1280)]
    blocks += [(side**2 // 16, 1280)] * 3 + [(side**2 // 4, 640)] * 3 + [(side**2, 320)] * 3
    hidden = [torch.randn(2, tokens, channels) for tokens, channels in blocks]
    best = float("inf")
    with torch.inference_mode():
        patch = AttentionPatch([(hypernetwork, 1.0)])
        for _ in range(repeats):
            text = torch.randn(2, 77, 768)  # Forge builds a new context tensor every step
            start = time.process_time()
            for h in hidden:
                patch.key_value(h, h, cross=False)
                patch.key_value(text, text, cross=True)
            best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="time only our patch calls for one step with this .pt file")
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--dest", type=Path, help="the Forge tree (its host.pid gives the process)")
    parser.add_argument("--pid", type=int)
    parser.add_argument("--name", default="hn_768", help="hypernetwork file name (768-only for the issue's figure)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.work:
        seconds = patch_work(args.work, args.size, max(args.repeats, 5))
        print(f"our patches in one SD 1.5 step at {args.size} px (CFG batch 2), {args.work.name}: {seconds * 1000:.3f} ms CPU")
        return
    pid = args.pid or (int((args.dest / "host.pid").read_text()) if args.dest else None)
    prompts = {"base": "a red circle on a teal background", "tag": f"a red circle on a teal background<hypernet:{args.name}:1>"}
    for prompt in prompts.values():  # warm-up
        generate(args.url, prompt, args.size, args.steps, pid)
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in prompts}
    for _ in range(args.repeats):
        for mode, prompt in prompts.items():
            results[mode].append(generate(args.url, prompt, args.size, args.steps, pid))
    medians = {mode: (statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)) for mode, runs in results.items()}
    print(f"Forge txt2img {args.size}x{args.size}, {args.steps} Euler steps, {args.repeats} interleaved pairs, <hypernet:{args.name}:1>")
    for mode, (wall, cpu) in medians.items():
        print(f"  {mode:5s} wall median {wall:7.2f} s  (all: {', '.join(f'{w:.2f}' for w, _ in results[mode])})   "
              f"process CPU median {cpu:7.2f} s  (all: {', '.join(f'{c:.2f}' for _, c in results[mode])})")
    print(f"  ratio tag/base: wall {medians['tag'][0] / medians['base'][0]:.4f}, process CPU {medians['tag'][1] / medians['base'][1]:.4f}")


if __name__ == "__main__":
    main()
