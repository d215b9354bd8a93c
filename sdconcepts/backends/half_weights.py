"""Half-precision weights on the CPU, computed in float32 without a float32 copy of the model.

Forge and its forks (reForge, Forge-Classic) hold CLIP in float16 even on the CPU and compute it in float32: their
layers cast each weight to the input's dtype at every call. Our modules built over those tensors
(``single_file.components_sharing_weights``) would otherwise compute in float16, and x86 CPUs have no fast float16
matrix product: measured here, a 768x3072 linear layer's forward and input-gradient took 1.03 s in float16 against
0.026 s in float32 (40x). Training an embedding on Forge's model then took ~40 s per step against ~5 s in A1111.

``compute_in_float32(module)`` gives every ``nn.Linear``, ``nn.LayerNorm`` and ``nn.Embedding`` in ``module`` a
forward that computes in float32 from its weights as they are: nothing is copied beyond one layer's weight at a time,
and a linear layer's backward casts its weight again instead of keeping the float32 copy for every layer until the
backward pass (only the gradient to the input flows; the weights are frozen). The parameters keep their dtype and
memory (the host's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = ["compute_in_float32", "computes_in_float32", "half_on_cpu"]

_HALF = (torch.float16, torch.bfloat16)


def half_on_cpu(tensors: Any) -> bool:
    """True when any of these floating tensors is float16/bfloat16 on the CPU."""
    return any(t.is_floating_point() and t.dtype in _HALF and t.device.type == "cpu" for t in tensors)


class _LinearInFloat32(torch.autograd.Function):
    """``x @ W.T + b`` in float32 for half ``W``; backward gives the input's gradient only, casting ``W`` again."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)  # the half tensor itself (the host's memory), not a float32 copy
        ctx.input_dtype = x.dtype
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        return (grad.float() @ weight.float()).to(ctx.input_dtype), None, None


class Float32Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return _LinearInFloat32.apply(x, self.weight, self.bias)  # type: ignore[no-any-return]


class Float32LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class Float32Embedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: Float32Linear,
    nn.LayerNorm: Float32LayerNorm,
    nn.Embedding: Float32Embedding,
}


def compute_in_float32(module: nn.Module) -> int:
    """Make ``module``'s linear, layer-norm and embedding layers compute in float32 (their weights unchanged);
    returns how many layers were switched."""
    switched = 0
    for child in module.modules():
        target = _SWAPS.get(type(child))
        if target is not None:
            child.__class__ = target
            switched += 1
    return switched


def computes_in_float32(module: nn.Module) -> bool:
    return any(isinstance(child, (Float32Linear, Float32LayerNorm, Float32Embedding)) for child in module.modules())
