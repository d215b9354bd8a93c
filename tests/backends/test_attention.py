"""The lean attention processor (``backends/attention.py``): every loaded UNet gets it, and it computes what
diffusers' own ``AttnProcessor2_0`` computes, for training (outputs and the gradient that reaches the conditioning)
and for sampling, with hooks on the projections (hypernetworks) still applied.

The lean path runs the same operations as diffusers' processor and only leaves out identities (a division by 1, a
dropout of probability 0 outside training, a cast to the same dtype), so the outputs are compared for equality."""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sdconcepts.backends.attention import LeanAttention, plain_attention


def _unet_inputs(model: Any, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    unet = model.unet
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, model.context_width, generator=g)
    added: dict[str, Any] = {}
    if model.is_sdxl:
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}}
    return latents, torch.tensor([10, 700]), context, added


def _with_processor(unet: Any, processor: Any, run: Any) -> Any:
    saved = dict(unet.attn_processors)
    unet.set_attn_processor(processor)
    try:
        return run()
    finally:
        unet.set_attn_processor(saved)


def _forward_backward(model: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    latents, timesteps, context, added = _unet_inputs(model)
    context.requires_grad_(True)
    pooled = added.get("added_cond_kwargs", {}).get("text_embeds")
    if pooled is not None:
        pooled.requires_grad_(True)
    out = model.unet(latents, timesteps, encoder_hidden_states=context, **added).sample
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), context.grad, None if pooled is None else pooled.grad


def test_loaded_unets_get_the_lean_processor_and_train_exactly_as_with_diffusers_default(
        tiny_model: Any, tiny_sdxl: Any) -> None:
    for model in (tiny_model, tiny_sdxl):
        processors = set(map(type, model.unet.attn_processors.values()))
        assert processors == {LeanAttention}
        assert all(plain_attention(m) for m in model.unet.modules() if isinstance(m, Attention))
        lean = _forward_backward(model)
        default = _with_processor(model.unet, AttnProcessor2_0(), lambda m=model: _forward_backward(m))
        for ours, theirs in zip(lean, default, strict=True):
            if theirs is None:
                assert ours is None
                continue
            assert ours is not None and torch.equal(ours, theirs)
        assert float(lean[1].abs().sum()) > 0  # the conditioning's gradient is real, not all zeros
        if model.is_sdxl:
            assert lean[2] is not None and float(lean[2].abs().sum()) > 0


def test_sampling_outputs_equal_diffusers_default(tiny_model: Any) -> None:
    from sdconcepts.backends.sampling import txt2img
    from sdconcepts.generation import GenerationParams

    params = GenerationParams(prompt="a red square", negative_prompt="", steps=3, sampler="Euler a", cfg_scale=7.0,
                              seed=3, width=32, height=32)
    lean = txt2img(tiny_model, params).images[0]
    default = _with_processor(tiny_model.unet, AttnProcessor2_0(), lambda: txt2img(tiny_model, params).images[0])
    assert np.array_equal(np.asarray(lean), np.asarray(default))


def test_hooks_on_the_projections_still_apply_and_other_layouts_go_to_diffusers_processor(tiny_model: Any) -> None:
    attn = next(m for m in tiny_model.unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=g)
    lean, default = LeanAttention(), AttnProcessor2_0()
    plain = lean(attn, hidden, context)
    # A forward pre-hook on to_k and to_v, as a hypernetwork attaches: the lean processor calls the modules.
    handles = [layer.register_forward_pre_hook(lambda _m, args: (args[0] * 2,)) for layer in (attn.to_k, attn.to_v)]
    try:
        hooked = lean(attn, hidden, context)
        assert torch.equal(hooked, default(attn, hidden, context))
    finally:
        for handle in handles:
            handle.remove()
    assert not torch.allclose(hooked, plain)
    # A mask is diffusers' processor's business: the same result through both.
    mask = torch.zeros(2, 1, 77)
    mask[:, :, 40:] = -10000.0
    masked = lean(attn, hidden, context, attention_mask=mask)
    assert torch.equal(masked, default(attn, hidden, context, attention_mask=mask))
    assert not torch.allclose(masked, plain)
    # diffusers' Attention.forward filters keyword arguments by the processor's signature on every call.
    assert list(inspect.signature(lean.__call__).parameters)[:4] == ["attn", "hidden_states", "encoder_hidden_states",
                                                                     "attention_mask"]
