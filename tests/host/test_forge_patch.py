"""The Forge side without Forge: ``AttentionPatch`` (what Forge's attn1/attn2 patches return), the width warning in
our engine, and the host adapter's pure parts (A1111 detection, infotext hashes, the path+mtime cache).

Forge calls its patches with the context and the value input separately, under ``torch.inference_mode``; the patch
must give ``to_k``/``to_v`` exactly A1111's chained inputs there too.
"""

from __future__ import annotations

import os
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdconcepts.host import forge
from sdconcepts.hypernetworks.attach import AttentionPatch
from sdconcepts.hypernetworks.files import save_hypernetwork
from sdconcepts.hypernetworks.hypernetwork import apply_hypernetworks, create_hypernetwork, width_mismatch


def _chain() -> list[tuple[Any, float]]:
    first = create_hypernetwork("a", (768, 320), weight_init="XavierNormal", generator_seed=1)
    second = create_hypernetwork(
        "b", (768, 320), activation="relu", layer_norm=True, weight_init="XavierNormal", generator_seed=2
    )
    return [(first, 0.8), (second, -0.5)]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
@pytest.mark.parametrize("cross", [True, False])
def test_patch_gives_a1111s_key_and_value_inputs(mode: str, cross: bool) -> None:
    chain = _chain()
    width = 768 if cross else 320
    g = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77 if cross else 64, width, generator=g)
    expected_key, expected_value = apply_hypernetworks(context, chain)
    patch = AttentionPatch(chain)
    manager: Any = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}[mode]
    with manager():
        source = context.clone()
        key, value = patch.key_value(source, source, cross=cross)
        key_again, value_again = patch.key_value(source, source, cross=cross)  # the cached / folded path
    # Self-attention with only affine modules is folded into one map: equal up to float rounding.
    torch.testing.assert_close(key.detach(), expected_key.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(value.detach(), expected_value.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(key, key_again) and torch.equal(value, value_again)
    assert not torch.equal(key, context) and not torch.equal(key, value)


def test_patch_passes_other_widths_and_zero_strength_through() -> None:
    chain = _chain()
    context = torch.randn(1, 16, 640)
    with torch.inference_mode():
        key, value = AttentionPatch(chain).key_value(context, context, cross=False)
    assert key is context and value is context
    zero = [(hypernetwork, 0.0) for hypernetwork, _ in chain]
    text = torch.randn(1, 77, 768)
    with torch.inference_mode():
        key, value = AttentionPatch(zero).key_value(text, text, cross=True)
    assert torch.equal(key, text) and torch.equal(value, text)


def test_patch_order_matters_as_in_a1111() -> None:
    chain = _chain()
    text = torch.randn(1, 77, 768)
    with torch.no_grad():
        forward, _ = AttentionPatch(chain).key_value(text, text, cross=True)
        backward, _ = AttentionPatch(chain[::-1]).key_value(text, text, cross=True)
    assert not torch.allclose(forward, backward)
    torch.testing.assert_close(backward, apply_hypernetworks(text, chain[::-1])[0])


def test_cross_attention_chain_runs_once_per_distinct_context() -> None:
    chain = _chain()
    calls = []
    module = chain[0][0].pair(768)[0]
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    patch = AttentionPatch(chain)
    with torch.inference_mode():
        first = torch.randn(2, 77, 768)
        for _ in range(16):  # 16 cross-attention layers in SD 1.x read the same context in a step
            patch.key_value(first, first, cross=True)
        second = torch.randn(2, 77, 768)
        patch.key_value(second, second, cross=True)
    handle.remove()
    assert len(calls) == 2


def test_width_mismatch_warning() -> None:
    hypernetwork = create_hypernetwork("wide", (1024, 1280))
    assert width_mismatch("wide", hypernetwork, {320, 640, 1280, 768}) is None
    message = width_mismatch("wide", create_hypernetwork("sdxl", (2048,)), {320, 640, 1280, 768})
    assert message is not None and "'wide'" in message and "2048" in message and "768" in message


def test_engine_warns_about_a_file_whose_widths_fit_no_layer(tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.tags import resolve_in_memory

    params = GenerationParams(prompt="a cat", steps=2, seed=5, sampler="Euler", cfg_scale=5.0)
    hypernetworks = {"sd1": create_hypernetwork("sd1", (768,), weight_init="XavierNormal", generator_seed=3)}
    plain = txt2img(tiny_model, params, hypernetworks=resolve_in_memory("a cat", hypernetworks, tiny_model.unet))
    tagged = txt2img(
        tiny_model, GenerationParams(**{**params.__dict__, "prompt": "a cat <hypernet:sd1:1>"}),
        hypernetworks=resolve_in_memory("a cat <hypernet:sd1:1>", hypernetworks, tiny_model.unet),
    )
    assert any("'sd1'" in w and "none of which fits" in w for w in tagged.warnings)
    assert np.array_equal(np.asarray(tagged.images[0]), np.asarray(plain.images[0]))
    assert not plain.warnings


def test_adapter_outside_forge_registers_nothing() -> None:
    assert forge.is_forge() is False
    assert forge.register() is False
    assert forge.script_class() is None


def test_infotext_hashes_in_a1111s_hashes_format() -> None:
    assert forge.infotext_hashes([("a,b:c", "0123456789"), ("x", "abcdefabcd")]) == "abc: 0123456789, x: abcdefabcd"


def test_loaded_files_are_cached_by_path_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "style.pt"
    save_hypernetwork(create_hypernetwork("style", (768,), generator_seed=1), path)
    files = forge.ForgeHypernetworks()
    first = files.load(path, torch.device("cpu"))
    assert files.load(path, torch.device("cpu")) is first
    save_hypernetwork(create_hypernetwork("style", (768,), weight_init="XavierNormal", generator_seed=2), path)
    later = time.time() + 5
    os.utime(path, (later, later))
    reloaded = files.load(path, torch.device("cpu"))
    assert reloaded is not first
    assert not torch.equal(reloaded.pair(768)[0].first_linear().weight, first.pair(768)[0].first_linear().weight)


class _PatcherWithoutAttentionPatches:
    """A UNet patcher of a fork that lacks Forge's attn1/attn2 patch setters (only ``clone``)."""

    def clone(self) -> _PatcherWithoutAttentionPatches:
        return _PatcherWithoutAttentionPatches()


def test_a_patcher_without_attention_patches_is_said_under_the_image_not_a_traceback() -> None:
    comments: list[str] = []
    unet = _PatcherWithoutAttentionPatches()
    p = types.SimpleNamespace(sd_model=types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet)),
                              comment=comments.append)
    setattr(p, forge.STATE_ATTRIBUTE, _chain())
    assert forge.patch_unet(p) is False
    assert p.sd_model.forge_objects.unet is unet
    assert len(comments) == 1 and "set_model_attn1_patch, set_model_attn2_patch" in comments[0], comments
    assert "had no effect" in comments[0]


def test_outside_a_host_the_capabilities_say_what_is_missing_in_one_sentence() -> None:
    from sdconcepts.host import capabilities

    assert capabilities.memory_manager() is None  # neither Forge's backend nor ldm_patched here
    message = capabilities.reload_embeddings()
    assert message is not None and "press Refresh" in message and "\n" not in message
    with pytest.raises(capabilities.HostModelError, match="no load_models_gpu in backend.memory_management or "
                                                          "ldm_patched.modules.model_management"):
        capabilities.place_forge_patchers([])


def test_the_card_page_marks_a_file_that_fits_no_layer_of_the_loaded_model(tmp_path: Path) -> None:
    """Our Hypernetworks page in Forge/Forge-Classic (issue 26 item 16): a file whose modules fit none of the loaded
    model's attention widths says so on its card; one that fits, or any file while no model is loaded, says nothing."""
    xl = save_hypernetwork(create_hypernetwork("xl", (2048,)), tmp_path / "xl.pt")
    sd1 = save_hypernetwork(create_hypernetwork("sd1", (768, 320)), tmp_path / "sd1.pt")
    sd15_widths = {320, 640, 1280, 768}
    note = forge.fit_note(xl, sd15_widths)
    assert note.startswith("Fits no attention layer") and "[2048]" in note and "[320, 640, 768, 1280]" in note
    assert forge.fit_note(sd1, sd15_widths) == ""
    assert forge.fit_note(xl, None) == "" and forge.fit_note(xl, set()) == ""
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a pickle")
    assert forge.fit_note(broken, sd15_widths).startswith("Cannot be used:")
