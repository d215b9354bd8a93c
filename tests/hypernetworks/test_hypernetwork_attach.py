"""Attaching hypernetworks to a real (tiny) diffusers UNet: the trio, exact detach, fast paths, txt2img and the CLI.

The tiny UNet has self-attention at widths 32 and 64 and cross-attention at 48 (its text width), so a module per
width hits exactly the layers A1111 would hit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdconcepts.hypernetworks.attach import attach_hypernetworks, attention_layers
from sdconcepts.hypernetworks.hypernetwork import HypernetworkError, apply_hypernetworks, create_hypernetwork


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(2, 77, 48, generator=g)


def _unet_out(unet: Any, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, t, ctx = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample  # type: ignore[no-any-return]


def _visible(name: str, **kwargs: Any) -> Any:
    """A hypernetwork whose effect is large enough to see in a tiny model's pixels."""
    kwargs.setdefault("weight_init", "XavierNormal")
    return create_hypernetwork(name, (48, 32, 64), generator_seed=len(name), **kwargs)


def _hook_count(unet: Any) -> int:
    return sum(len(layer.to_k._forward_pre_hooks) + len(layer.to_v._forward_pre_hooks) for layer in attention_layers(unet))


def test_layers_found_in_the_tiny_unet(tiny_model: Any) -> None:
    layers = attention_layers(tiny_model.unet)
    assert len(layers) == 32
    assert {(layer.cross, layer.width) for layer in layers} == {(True, 48), (False, 32), (False, 64)}
    assert all(layer.name.endswith("attn2") == layer.cross for layer in layers)


@pytest.mark.parametrize("fast", [True, False])
def test_trio_strength_zero_attach_and_exact_remove(tiny_model: Any, inputs: Any, fast: bool) -> None:
    unet = tiny_model.unet
    base = _unet_out(unet, inputs)
    hypernetwork = _visible("trio", activation="relu")
    with attach_hypernetworks(unet, [(hypernetwork, 0.0)], fast=fast):
        assert torch.equal(_unet_out(unet, inputs), base)
    handle = attach_hypernetworks(unet, [(hypernetwork, 1.0)], fast=fast)
    assert len(handle.layers) == 32 and handle.attached
    changed = _unet_out(unet, inputs)
    assert (changed - base).abs().max() > 1e-3
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.attached and _hook_count(unet) == 0
    assert torch.equal(_unet_out(unet, inputs), base)
    # a width-only hypernetwork touches only its layers: 16 cross-attention layers here
    with attach_hypernetworks(unet, [(create_hypernetwork("text", (48,)), 1.0)], fast=fast) as text_only:
        assert len(text_only.layers) == 16 and all(name.endswith("attn2") for name in text_only.layers)
    with attach_hypernetworks(unet, [(create_hypernetwork("other", (1024,)), 1.0)], fast=fast) as unused:
        assert unused.layers == ()


def test_hooks_replace_only_key_and_value_inputs() -> None:
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attention = Attention(query_dim=32, cross_attention_dim=48, heads=2, dim_head=16).eval()
    hypernetwork = _visible("kv", activation="tanh")
    hidden, context = torch.randn(2, 10, 32), torch.randn(2, 7, 48)

    def reference(hidden_states: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        key_in, value_in = apply_hypernetworks(ctx, [(hypernetwork, 0.8)])
        q, k, v = attention.to_q(hidden_states), attention.to_k(key_in), attention.to_v(value_in)
        q, k, v = (t.view(2, -1, 2, 16).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, -1, 32)
        return attention.to_out[0](out)  # type: ignore[no-any-return]

    with torch.no_grad():
        for fast in (True, False):
            with attach_hypernetworks(attention, [(hypernetwork, 0.8)], fast=fast):
                got = attention(hidden, encoder_hidden_states=context)
            torch.testing.assert_close(got, reference(hidden, context))
        self_attention = Attention(query_dim=32, heads=2, dim_head=16).eval()
        with attach_hypernetworks(self_attention, [(hypernetwork, 0.8)]):
            got = self_attention(hidden)
        key_in, value_in = apply_hypernetworks(hidden, [(hypernetwork, 0.8)])
        q = self_attention.to_q(hidden).view(2, -1, 2, 16).transpose(1, 2)
        k = self_attention.to_k(key_in).view(2, -1, 2, 16).transpose(1, 2)
        v = self_attention.to_v(value_in).view(2, -1, 2, 16).transpose(1, 2)
        expected = self_attention.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, -1, 32))
        torch.testing.assert_close(got, expected)


def test_fast_paths_match_a1111s_computation(tiny_model: Any, inputs: Any) -> None:
    unet = tiny_model.unet
    text_only = create_hypernetwork("text", (48,), activation="relu", weight_init="XavierNormal", generator_seed=1)
    cases = [
        ([(text_only, 0.9)], 0.0),  # cross-attention cache: the same arithmetic, computed once
        ([(_visible("lin"), 1.0)], 1e-5),  # A1111's default "linear" modules: folded self-attention maps
        ([(_visible("nl", activation="swish", layer_norm=True), 0.7), (_visible("zero"), 0.0),
          (_visible("second", activation="relu", layer_structure=[1, 1.5, 1.5, 1]), -0.4)], 1e-5),
    ]
    for pairs, tolerance in cases:
        with attach_hypernetworks(unet, pairs, fast=False):
            plain = _unet_out(unet, inputs)
        with attach_hypernetworks(unet, pairs, fast=True):
            fast = _unet_out(unet, inputs)
            again = _unet_out(unet, inputs)
        assert torch.equal(fast, again)
        if tolerance == 0:
            assert torch.equal(fast, plain)
        else:
            torch.testing.assert_close(fast, plain, rtol=tolerance, atol=tolerance)


def test_fast_paths_follow_in_place_changes(tiny_model: Any, inputs: Any) -> None:
    unet = tiny_model.unet
    x, t, ctx = inputs
    for hypernetwork in (_visible("affine"), _visible("nonlinear", activation="relu")):
        with attach_hypernetworks(unet, [(hypernetwork, 1.0)]):
            context = ctx.clone()
            before = _unet_out(unet, (x, t, context))
            with torch.no_grad():
                for parameter in hypernetwork.parameters():
                    parameter.mul_(1.5)  # what an optimizer step does between previews
            after_weights = _unet_out(unet, (x, t, context))
            with torch.no_grad():
                context.mul_(0.5)  # an in-place edit of the context itself
            after_context = _unet_out(unet, (x, t, context))
        with attach_hypernetworks(unet, [(hypernetwork, 1.0)], fast=False):
            expected_weights = _unet_out(unet, (x, t, ctx))
            expected_context = _unet_out(unet, (x, t, ctx * 0.5))
        assert not torch.allclose(before, after_weights)
        torch.testing.assert_close(after_weights, expected_weights, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(after_context, expected_context, rtol=1e-5, atol=1e-5)


def test_training_moves_every_hypernetwork_parameter_and_no_model_parameter(tiny_model: Any, inputs: Any) -> None:
    unet = tiny_model.unet
    x, t, ctx = inputs
    # A1111's own initialisation (Normal: tiny second layers) with layer norm, relu and dropout, all widths.
    hypernetwork = create_hypernetwork(
        "train", (48, 32, 64), activation="relu", layer_norm=True, use_dropout=True,
        dropout_structure=[0, 0.1, 0], generator_seed=0,
    )
    model_before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    hn_before = [p.detach().clone() for p in hypernetwork.parameters()]
    optimizer = torch.optim.AdamW(hypernetwork.parameters(), lr=1e-3)
    hypernetwork.train()
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with attach_hypernetworks(unet, [(hypernetwork, 0.3)]):  # the strength is forced to 1 while training
        for _ in range(3):
            loss = F.mse_loss(unet(x, t, encoder_hidden_states=ctx).sample, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    hypernetwork.eval()
    for before, after in zip(hn_before, hypernetwork.parameters(), strict=True):
        assert not torch.equal(before, after.detach())
    for name, p in unet.named_parameters():
        assert p.grad is None and torch.equal(model_before[name], p.detach()), name


def test_fused_projections_are_refused() -> None:
    from diffusers.models.attention_processor import Attention

    attention = Attention(query_dim=32, cross_attention_dim=48, heads=2, dim_head=16)
    attention.fuse_projections()
    with pytest.raises(HypernetworkError, match="fused"):
        attach_hypernetworks(attention, [(create_hypernetwork("f", (48,)), 1.0)])
    assert len(attention.to_k._forward_pre_hooks) == 0


# ---- txt2img and the CLI -----------------------------------------------------------------------------------------


def _pixels(result: Any) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


def test_txt2img_applies_tags_and_detaches(tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams
    from sdconcepts.hypernetworks.files import HypernetworkFileError
    from sdconcepts.hypernetworks.tags import resolve_hypernetworks, resolve_in_memory
    from sdconcepts.prompts.network_tags import parse_extra_network_tags

    hypernetworks = {"style": _visible("style", activation="relu")}

    def run(prompt: str, resolved: Any = None, **kwargs: Any) -> Any:
        params = GenerationParams(prompt=prompt, steps=3, seed=5, sampler="Euler", cfg_scale=5.0)
        resolved = resolved or resolve_in_memory(prompt, hypernetworks, tiny_model.unet)
        return txt2img(tiny_model, params, hypernetworks=resolved, **kwargs)

    def unreadable(name: str) -> Any:
        raise HypernetworkFileError(f"{name}: not a hypernetwork")

    plain = run("a cat")
    tagged = run("a cat <hypernet:style:0.8>")
    assert np.abs(_pixels(tagged) - _pixels(plain)).max() > 0
    assert "<hypernet:style:0.8>" in tagged.infotexts[0] and not tagged.warnings
    assert np.array_equal(_pixels(run("a cat <hypernet:style:0>")), _pixels(plain))
    unknown = run("a cat <hypernet:missing:1>")
    assert np.array_equal(_pixels(unknown), _pixels(plain))
    assert any("missing" in w for w in unknown.warnings)
    listed = run("a cat <hypernet:broken>", resolve_hypernetworks(
        parse_extra_network_tags("a cat <hypernet:broken>")[1], {"broken": "broken"}.get, unreadable))
    assert any("could not be loaded" in w for w in listed.warnings)

    def fail(done: int, _total: int) -> None:
        if done == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run("a cat <hypernet:style:1>", progress=fail)
    assert _hook_count(tiny_model.unet) == 0
    assert np.array_equal(_pixels(run("a cat")), _pixels(plain))


def test_cli_generate_uses_the_hypernetworks_folder(
    tiny_model_dir: Path, tmp_path: Path, capsys: Any, monkeypatch: Any
) -> None:
    from sdconcepts.cli import main
    from sdconcepts.hypernetworks.files import save_hypernetwork
    from sdconcepts.images import read_infotext

    folder = tmp_path / "models" / "hypernetworks"
    save_hypernetwork(_visible("inner-name", activation="relu"), folder / "sub" / "mine.pt")
    (folder / "broken.pt").write_bytes(b"not a pickle")
    outputs = []
    monkeypatch.chdir(tmp_path)  # the second run finds ./models/hypernetworks by default
    for prompt, folder_args in (("a dog", ["--hypernetworks-dir", str(folder)]),
                                ("a dog <hypernet:mine:0.8> <hypernet:broken>", [])):
        out = tmp_path / f"{len(outputs)}.png"
        code = main(["generate", "--ckpt", str(tiny_model_dir), "--prompt", prompt, "--steps", "2", "--seed", "3",
                     *folder_args, "--output", str(out), "--device", "cpu"])
        assert code == 0
        outputs.append(out)
    err = capsys.readouterr().err
    assert "skipped hypernetwork broken" in err and "broken.pt" in err
    assert "<hypernet:mine:0.8>" in (read_infotext(outputs[1]) or "")
    from PIL import Image

    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in outputs)
    assert np.abs(a - b).max() > 0


def test_half_precision_unet_with_float32_hypernetworks() -> None:
    """As A1111 on fp16 models: the modules stay float32, inputs are cast to them and results cast back."""
    from sdconcepts.backends.tiny import build_tiny_sd1

    unet = build_tiny_sd1()["unet"].to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(2, 4, 8, 8, generator=g).to(torch.bfloat16),
        torch.tensor([500]),
        torch.randn(2, 77, 48, generator=g).to(torch.bfloat16),
    )
    base = _unet_out(unet, inputs)
    for hypernetwork in (_visible("lin16"), _visible("relu16", activation="relu")):
        with attach_hypernetworks(unet, [(hypernetwork, 1.0)], fast=False):
            plain = _unet_out(unet, inputs)
        with attach_hypernetworks(unet, [(hypernetwork, 1.0)]):
            fast = _unet_out(unet, inputs)
        assert fast.dtype == torch.bfloat16 and not torch.equal(plain, base)
        torch.testing.assert_close(fast.float(), plain.float(), rtol=0.05, atol=0.05)
    assert torch.equal(_unet_out(unet, inputs), base)


def test_many_bad_tags_give_a_bounded_list_of_warnings() -> None:
    from sdconcepts.hypernetworks.tags import MAX_TAG_WARNINGS, resolve_in_memory

    prompt = " ".join(f"<hypernet:missing{i}>" for i in range(10_000)) + " <hypernet:missing0>" * 3
    warnings = resolve_in_memory(prompt, {}).warnings  # 10,000 warning lines were printed
    assert len(warnings) == MAX_TAG_WARNINGS + 1 == 11
    assert warnings[0].startswith("unknown hypernet 'missing0'") and warnings[1].startswith("unknown hypernet 'missing1'")
    assert warnings[-1] == "... and 9990 more warnings about tags"
    assert resolve_in_memory("<hypernet:a> <hypernet:a>", {}).warnings == [
        "unknown hypernet 'a': the tag was removed from the prompt and has no effect"]  # each said once (it came twice)
