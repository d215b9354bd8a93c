"""Embeddings bundled in LoRA files inside the real hosts (issue 23, Forge #345): the files every launched host gets, and
the checks that Forge and its forks use the bundled words while the LoRA is in the prompt, as A1111 1.10 does.

Files (written before each launch by ``host_harness``; Forge reads its embeddings folder only when it loads a model):

- ``models/Lora/sdc_bundle.safetensors``: no LoRA weights, only ``bundle_emb.sdcword.string_to_param.*`` (vectors V)
  and ``bundle_emb.sdctaken.string_to_param.*`` (vectors W), A1111's keys (a1111-compat §1.4);
- ``models/Lora/sdc_nan.safetensors``: ``bundle_emb.sdcnan.string_to_param.*`` with a NaN (bad input);
- ``models/Lora/sdc_xl.safetensors``: ``bundle_emb.sdcxl.clip_l``/``clip_g``, an SDXL pair (does not fit SD 1.5);
- in the embeddings folder ``sdcsame.safetensors`` (V again, a standalone file) and ``sdctaken.safetensors`` (X, not
  W: the folder's word must win).

The LoRA files carry no LoRA weights, so a picture with ``<lora:sdc_bundle:1>`` differs from one without only through
the bundled words: ``sdcword <lora:sdc_bundle:1>`` must be the picture of ``sdcsame`` (same vectors through the same
engine), and differ from ``sdcword`` without the LoRA (the plain text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import host_harness as hh
import numpy as np

LORA = "sdc_bundle"
NAN_LORA = "sdc_nan"
XL_LORA = "sdc_xl"  # an SDXL pair (clip_l 768 + clip_g 1280): fits no SD 1.5 model
PROMPT = "a red circle on a teal background"
VECTORS = 2


def _vectors(seed: int) -> Any:
    import torch

    # Large against a CLIP token embedding (~0.02 per value), so that the word visibly changes a 2-step picture.
    return torch.randn(VECTORS, 768, generator=torch.Generator().manual_seed(seed)) * 0.5


def _write_if_changed(path: Path, tensors: dict[str, Any]) -> None:
    """safetensors bytes, rewritten only when different (the hosts' cards carry mtimes; relaunches see the same files)."""
    from safetensors.torch import save

    data = save({key: value.contiguous() for key, value in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.is_file() and path.read_bytes() == data):
        path.write_bytes(data)


def write_bundle_files(dest: Path, embeddings_dir: Path) -> None:
    """The LoRA files and the standalone embeddings described above, in the prepared tree ``dest``."""
    v, w, x = _vectors(231), _vectors(232), _vectors(233)
    nan = _vectors(234)
    nan[0, 0] = float("nan")
    loras = dest / "models" / "Lora"
    _write_if_changed(
        loras / f"{LORA}.safetensors",
        {
            "bundle_emb.sdcword.string_to_param.*": v,
            "bundle_emb.sdctaken.string_to_param.*": w,
        },
    )
    _write_if_changed(loras / f"{NAN_LORA}.safetensors", {"bundle_emb.sdcnan.string_to_param.*": nan})
    pair = {"bundle_emb.sdcxl.clip_l": v, "bundle_emb.sdcxl.clip_g": _vectors(235).repeat(1, 2)[:, :1280]}
    _write_if_changed(loras / f"{XL_LORA}.safetensors", pair)
    _write_if_changed(embeddings_dir / "sdcsame.safetensors", {"emb_params": v})
    _write_if_changed(embeddings_dir / "sdctaken.safetensors", {"emb_params": x})


def bundle_requests() -> dict[str, dict[str, Any]]:
    """The txt2img requests (on hh.DEFAULT_TXT2IMG) whose pictures the checks compare."""
    return {
        "word, no lora": {"prompt": f"{PROMPT}, sdcword"},
        "word with lora": {"prompt": f"{PROMPT}, sdcword <lora:{LORA}:1>"},
        "standalone file": {"prompt": f"{PROMPT}, sdcsame"},
        "taken with lora": {"prompt": f"{PROMPT}, sdctaken <lora:{LORA}:1>"},
        "taken, no lora": {"prompt": f"{PROMPT}, sdctaken"},
    }


def check_bundled_words(
    host: hh.Host, results: dict[str, tuple[np.ndarray, str]], *, ti_hashes: bool
) -> dict[str, float]:
    """The pictures of ``bundle_requests`` show the bundled vectors in use while the LoRA is in the prompt, the
    folder's word winning over a bundled one of the same name, and (``ti_hashes``) A1111's ``TI hashes`` entry."""
    for image, _ in results.values():
        hh.assert_finite_picture(image)
    plain = results["word, no lora"][0]
    bundled, info = results["word with lora"]
    figures = {
        "word vs plain text": hh.mean_abs_diff(bundled, plain),
        "word vs standalone file": hh.mean_abs_diff(bundled, results["standalone file"][0]),
        "taken with vs without lora": hh.mean_abs_diff(results["taken with lora"][0], results["taken, no lora"][0]),
    }
    # The word is the bundle's vectors: the picture of the same vectors as a standalone embedding file (the same
    # conditioning through the same engine), and not the word as plain text.
    # (Deterministic figures on the random SD 1.5 file: Forge and reForge 5.2, Forge-Classic 0.84.)
    assert figures["word vs plain text"] > 0.5, figures
    assert figures["word vs standalone file"] < 0.5, figures
    # The embeddings folder's sdctaken wins over the bundle's (A1111: "Skip bundle embedding").
    assert figures["taken with vs without lora"] < 0.5, figures
    assert f"<lora:{LORA}:1>" in info, info
    if ti_hashes:
        assert f"sdcword: {LORA}" in info, info
    return figures


def check_bundle_lifetime_and_bad_input(host: hh.Host, plain_before: np.ndarray) -> None:
    """After a generation with the LoRA the word is plain text again; a bundle with NaN vectors, and an SDXL pair on
    this SD 1.5 model, are one line each in the console, the picture is made and no traceback is printed."""
    again, _ = hh.txt2img(host, prompt=f"{PROMPT}, sdcword")
    assert np.array_equal(again, plain_before), "the bundled word outlived its LoRA's generation"
    logged_before = len(host.log_text())
    image, _ = hh.txt2img(host, prompt=f"{PROMPT}, sdcnan <lora:{NAN_LORA}:1>")
    hh.assert_finite_picture(image)
    log = host.log_text()[logged_before:]
    ours = [line for line in log.splitlines() if "sdcnan" in line and "sdconcepts: " in line]
    assert len(ours) == 1 and "NaN" in ours[0], host.log_tail()
    assert "Traceback" not in log, host.log_tail()
    logged_before = len(host.log_text())
    image, _ = hh.txt2img(host, prompt=f"{PROMPT}, sdcxl <lora:{XL_LORA}:1>")
    hh.assert_finite_picture(image)
    log = host.log_text()[logged_before:]
    ours = [line for line in log.splitlines() if "sdcxl" in line and "sdconcepts: " in line]
    assert len(ours) == 1 and "does not fit" in ours[0], host.log_tail()
    assert "Traceback" not in log, host.log_tail()


def check_in_forge_family(host: hh.Host) -> str:
    """Every check above on a Forge-family host (our extension registers the bundled words there); a line of figures."""
    logged_before = len(host.log_text())
    results = {name: hh.txt2img(host, **body) for name, body in bundle_requests().items()}
    figures = check_bundled_words(host, results, ti_hashes=True)
    assert "Traceback" not in host.log_text()[logged_before:], host.log_tail()
    check_bundle_lifetime_and_bad_input(host, results["word, no lora"][0])
    return f"[{host.kind}] bundled word mean |diff|: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items())
