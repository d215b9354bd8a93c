"""The UNet's attention processor: diffusers' scaled-dot-product attention with less Python around each call.

``LeanAttention`` computes what diffusers' ``AttnProcessor2_0`` computes, operation for operation, for the plain
attention a Stable Diffusion UNet has (3-D hidden states, no mask, no spatial or group norm, no residual inside the
processor); it leaves out only work that does nothing there: the division by an output factor of 1, a dropout of
probability 0 (or not training), a dtype cast to the dtype the tensor already has, and ``inspect.signature`` of the
processor, which diffusers' ``Attention.forward`` asks for on every call to filter keyword arguments (here answered
from a signature computed once). Anything else (masks, extra arguments, other attention layouts) goes to
``AttnProcessor2_0`` itself. The projections are still the modules' own calls, so hooks on ``to_k``/``to_v``
(hypernetworks) and replaced modules (LoRA layers) work as before.

On a small UNet each step is hundreds of such calls and little arithmetic: toyworld-xl's training step at batch 4
on one CPU thread makes 34 attention calls forward and spends most of its time around operations rather than in
them (docs/training.md, "Under load, and on a GPU"). The outputs are the same tensors bit for bit, on any device.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

__all__ = ["LeanAttention", "use_lean_attention"]


class LeanAttention:
    """An attention processor for diffusers' ``Attention`` modules (``unet.set_attn_processor``)."""

    def __init__(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0  # lazy: diffusers

        self.general = AttnProcessor2_0()

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if args or kwargs or attention_mask is not None or hidden_states.ndim != 3 or not plain_attention(attn):
            out: torch.Tensor = self.general(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                             *args, **kwargs)
            return out
        batch = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        heads = attn.heads
        query = attn.to_q(hidden_states)
        key = attn.to_k(context)
        value = attn.to_v(context)
        width = key.shape[-1] // heads
        query = query.view(batch, -1, heads, width).transpose(1, 2)
        key = key.view(batch, -1, heads, width).transpose(1, 2)
        value = value.view(batch, -1, heads, width).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, heads * width)
        if out.dtype != query.dtype:
            out = out.to(query.dtype)
        out = attn.to_out[0](out)
        dropout = attn.to_out[1]
        if not (isinstance(dropout, torch.nn.Dropout) and (dropout.p == 0 or not dropout.training)):
            out = dropout(out)
        if attn.rescale_output_factor != 1:
            out = out / attn.rescale_output_factor
        return out


# diffusers' Attention.forward calls inspect.signature(processor.__call__) on every call; a function's __signature__
# makes that a lookup instead of a walk over the code object (about 37 us a call on the 2-core test machine).
setattr(LeanAttention.__call__, "__signature__", inspect.signature(LeanAttention.__call__))  # noqa: B010


def plain_attention(attn: Any) -> bool:
    """Whether ``LeanAttention`` computes this ``Attention`` module itself: the layout of a Stable Diffusion UNet's
    self- and cross-attention (older diffusers lack some of these attributes: absent means not used)."""
    return (getattr(attn, "spatial_norm", None) is None and getattr(attn, "group_norm", None) is None
            and not getattr(attn, "norm_cross", None) and getattr(attn, "norm_q", None) is None
            and getattr(attn, "norm_k", None) is None and not getattr(attn, "residual_connection", False)
            and len(attn.to_out) == 2)


def use_lean_attention(unet: Any) -> None:
    """Give every attention module of ``unet`` that runs diffusers' default scaled-dot-product processor a
    ``LeanAttention`` (one shared instance); other processors (set on purpose by someone) stay."""
    from diffusers.models.attention_processor import AttnProcessor2_0  # lazy: diffusers

    processors: dict[str, Any] = dict(getattr(unet, "attn_processors", None) or {})
    defaults = [type(p) is AttnProcessor2_0 for p in processors.values()]
    if not any(defaults):
        return
    lean = LeanAttention()
    if all(defaults):
        unet.set_attn_processor(lean)
        return
    unet.set_attn_processor({name: lean if type(p) is AttnProcessor2_0 else p for name, p in processors.items()})
