"""Attaching hypernetworks to a UNet's attention layers with forward pre-hooks on ``to_k``/``to_v``, and detaching.

Every module with ``to_k``/``to_v`` Linear projections (diffusers ``Attention``, LDM ``CrossAttention``) whose key
input width has a module gets its key and value inputs replaced by the hypernetwork chain (``apply_hypernetworks``);
the query and the attention processor are untouched. The returned handle removes every hook, exactly.

Speed (generation only: no autograd and every module in eval mode; otherwise each call runs A1111's computation):

- cross-attention reads the same text context at every layer and step, so its chain runs once per distinct context
  tensor (identity and version, for the handle's lifetime) and the result is reused: bit-identical to recomputing;
- self-attention: when every module of the chain is affine in eval mode (no activation, no LayerNorm: A1111's default
  "linear"), the chain is folded once into one ``width x width`` map per key/value, a quarter of the matrix work of
  the default ``[1, 2, 1]`` modules; otherwise the key and value modules share one matrix product for their first
  layers. Both equal A1111's result up to float rounding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from sdconcepts.hypernetworks.hypernetwork import Hypernetwork, HypernetworkError, HypernetworkModule

__all__ = ["AttentionPatch", "HypernetworkHandle", "attach_hypernetworks", "attention_layers", "attention_widths"]

_CROSS_CACHE_SIZE = 8


@dataclass(frozen=True)
class _Entry:
    key: HypernetworkModule
    value: HypernetworkModule
    strength: float


class _Chain:
    """The (key, value) modules of one width across the attached hypernetworks, in prompt order."""

    def __init__(self, width: int, entries: list[_Entry]) -> None:
        self.width = width
        self.entries = entries
        self.active = [e for e in entries if e.strength != 0]  # x + f(x) * 0 == x in eval mode
        self.modules: list[HypernetworkModule] = [m for e in entries for m in (e.key, e.value)]
        self.parameters = [p for m in self.modules for p in m.parameters()]
        self.affine = all(m.is_affine() for e in self.active for m in (e.key, e.value))
        self._cross: OrderedDict[int, tuple[torch.Tensor, int, list[int], torch.Tensor, torch.Tensor]] = OrderedDict()
        self._folded: tuple[list[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._fused: tuple[list[int], tuple[torch.Tensor, torch.Tensor, nn.Module, nn.Module, int]] | None = None
        self._pending: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self._last_cross: tuple[torch.Tensor, int, torch.Tensor] | None = None

    # -- A1111's computation: every module, every call ------------------------------------------------------------
    def plain_key(self, x: torch.Tensor) -> torch.Tensor:
        for entry in self.entries:
            x = entry.key.run(x, entry.strength)
        return x

    def plain_value(self, x: torch.Tensor) -> torch.Tensor:
        for entry in self.entries:
            x = entry.value.run(x, entry.strength)
        return x

    def fast_allowed(self) -> bool:
        if torch.is_grad_enabled():
            return False
        for module in self.modules:
            if module.training:
                return False
        return True

    def version(self) -> list[int]:
        """Changes whenever a parameter is modified in place (an optimizer step, load_state_dict) or moved."""
        parameters = self.parameters
        versions = [_version_of(p) for p in parameters]
        if parameters:
            versions.append(parameters[0].data_ptr())
        return versions

    # -- cross-attention: once per distinct context ------------------------------------------------------------
    def cross_key(self, context: torch.Tensor) -> torch.Tensor:
        key, value = self.cross(context)
        # to_v of the same attention call reads the same context next: hand it the value without re-validating.
        self._last_cross = (context, _version_of(context), value)
        return key

    def cross_value(self, context: torch.Tensor) -> torch.Tensor:
        last = self._last_cross
        if last is not None and last[0] is context and last[1] == _version_of(context):
            return last[2]
        return self.cross(context)[1]

    def cross(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        version = self.version()
        # The cache holds the context itself, so its id cannot be reused by another tensor while cached.
        hit = self._cross.get(id(context))
        if hit is not None and hit[0] is context and hit[1] == _version_of(context) and hit[2] == version:
            return hit[3], hit[4]
        key = value = context
        for entry in self.active:
            key = entry.key.run(key, entry.strength)
            value = entry.value.run(value, entry.strength)
        self._cross[id(context)] = (context, _version_of(context), version, key, value)
        self._cross.move_to_end(id(context))
        while len(self._cross) > _CROSS_CACHE_SIZE:
            self._cross.popitem(last=False)
        return key, value

    # -- self-attention: shared or folded work ----------------------------------------------------------------
    def self_key(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.affine:
            weight_k, bias_k, _, _ = self._folded_maps()
            return _affine(x, weight_k, bias_k)
        key, value = self._fused_pair(x)
        self._pending = (x, _version_of(x), value)
        return key

    def self_value(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.affine:
            _, _, weight_v, bias_v = self._folded_maps()
            return _affine(x, weight_v, bias_v)
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is x and pending[1] == _version_of(x):
            return pending[2]
        return self._fused_pair(x)[1]

    def _folded_maps(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        version = self.version()
        if self._folded is None or self._folded[0] != version:
            weight_k, bias_k = _fold([(e.key, e.strength) for e in self.active], self.width)
            weight_v, bias_v = _fold([(e.value, e.strength) for e in self.active], self.width)
            self._folded = (version, (weight_k, bias_k, weight_v, bias_v))
        return self._folded[1]

    def _fused_pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        version = self.version()
        first = self.active[0]
        if self._fused is None or self._fused[0] != version:
            key_linear, value_linear = first.key.first_linear(), first.value.first_linear()
            weight = torch.cat([key_linear.weight, value_linear.weight]).detach()
            bias = torch.cat([key_linear.bias, value_linear.bias]).detach()
            self._fused = (version, (weight, bias, first.key.linear[1:], first.value.linear[1:], key_linear.out_features))
        weight, bias, key_rest, value_rest, split = self._fused[1]
        source = x if x.dtype == weight.dtype else x.to(weight.dtype)
        hidden = F.linear(source, weight, bias)
        key = source + key_rest(hidden[..., :split]) * first.strength
        value = source + value_rest(hidden[..., split:]) * first.strength
        for entry in self.active[1:]:
            key = entry.key(key, entry.strength)
            value = entry.value(value, entry.strength)
        return key.to(x.dtype), value.to(x.dtype)

    def clear(self) -> None:
        self._cross.clear()
        self._folded = self._fused = self._pending = self._last_cross = None


def _version_of(tensor: torch.Tensor) -> int:
    """A tensor's in-place version; inference tensors (Forge samples under ``torch.inference_mode``) track none and
    cannot be modified outside inference mode, so identity alone keys them."""
    return -1 if tensor.is_inference() else tensor._version


def _fold(modules: Sequence[tuple[HypernetworkModule, float]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain of affine residual modules as one Linear's (weight, bias), composed in float64."""
    first = modules[0][0].first_linear().weight
    matrix = torch.eye(width, dtype=torch.float64, device=first.device)
    offset = torch.zeros(width, dtype=torch.float64, device=first.device)
    for module, strength in modules:
        mlp: torch.Tensor | None = None
        mlp_bias: torch.Tensor | None = None
        for layer in module.linear:
            if not isinstance(layer, nn.Linear):
                continue  # Dropout is the identity in eval mode
            weight_t = layer.weight.detach().double().t()
            bias = layer.bias.detach().double()
            mlp = weight_t if mlp is None else mlp @ weight_t
            mlp_bias = bias if mlp_bias is None else mlp_bias @ weight_t + bias
        assert mlp is not None and mlp_bias is not None
        step = torch.eye(width, dtype=torch.float64, device=first.device) + mlp * strength
        matrix = matrix @ step
        offset = offset @ step + mlp_bias * strength
    return matrix.t().to(first.dtype).contiguous(), offset.to(first.dtype)


def _affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    if x.dtype == weight.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


@dataclass(frozen=True)
class AttentionLayer:
    """An attention module found in a model: its qualified name, whether it reads an external context, its width."""

    name: str
    module: nn.Module
    to_k: nn.Linear
    to_v: nn.Linear
    cross: bool
    width: int


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """Every module with Linear ``to_k`` and ``to_v`` (diffusers and LDM name them so), with its key input width.

    A layer is cross-attention when it is named ``attn2`` (both diffusers and LDM) or its key reads a different width
    than its query; self-attention layers read their own hidden states.
    """
    found = []
    for name, module in model.named_modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if not isinstance(to_k, nn.Linear) or not isinstance(to_v, nn.Linear):
            continue
        to_q = getattr(module, "to_q", None)
        cross = name.rsplit(".", 1)[-1] == "attn2" or (
            isinstance(to_q, nn.Linear) and to_q.in_features != to_k.in_features
        )
        found.append(AttentionLayer(name, module, to_k, to_v, cross, int(to_k.in_features)))
    return found


def attention_widths(model: nn.Module) -> set[int]:
    """The key input widths of every attention layer: the widths a hypernetwork needs modules for to act.

    Only ``in_features`` is read, so projections that are not ``nn.Linear`` subclasses (Forge's own Linear) count.
    """
    widths = set()
    for module in model.modules():
        to_k, to_v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        width = getattr(to_k, "in_features", None)
        if isinstance(to_k, nn.Module) and isinstance(to_v, nn.Module) and isinstance(width, int):
            widths.add(width)
    return widths


class AttentionPatch:
    """The same chains for hosts that hand a patch the attention's key and value inputs before ``to_k``/``to_v``.

    Forge's UNet patcher calls its ``attn1``/``attn2`` patches with the context (the hidden states for self-attention,
    the text for cross-attention) and the value input separately; ``key_value`` returns what ``to_k`` and ``to_v``
    should read: A1111's chain of each hypernetwork in order. The reuse rules are the hooks' (module docstring):
    cross-attention runs once per distinct context, self-attention shares or folds the matrix work.
    """

    def __init__(self, hypernetworks: Sequence[tuple[Hypernetwork, float]], *, fast: bool = True) -> None:
        self._pairs = [(hypernetwork, float(strength)) for hypernetwork, strength in hypernetworks]
        self._fast = fast
        self._chains: dict[int, _Chain | None] = {}

    def chain(self, width: int) -> _Chain | None:
        if width not in self._chains:
            entries = []
            for hypernetwork, strength in self._pairs:
                pair = hypernetwork.pair(width)
                if pair is not None:
                    entries.append(_Entry(pair[0], pair[1], strength))
            self._chains[width] = _Chain(width, entries) if entries else None
        return self._chains[width]

    def key_value(
        self, context: torch.Tensor, value: torch.Tensor, *, cross: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        chain = self.chain(int(context.shape[-1]))
        if chain is None:
            return context, value
        if not self._fast or not chain.fast_allowed():
            return chain.plain_key(context), chain.plain_value(value)
        if cross:
            return chain.cross_key(context), chain.cross_value(value)
        return chain.self_key(context), chain.self_value(value)

    def clear(self) -> None:
        """Drop the cached contexts and folded maps (the next call recomputes them)."""
        for chain in self._chains.values():
            if chain is not None:
                chain.clear()


class HypernetworkHandle:
    """The hooks of one attach call. ``remove()`` (idempotent) or leaving the ``with`` block detaches them all."""

    def __init__(self, hooks: list[RemovableHandle], chains: list[_Chain], layers: list[AttentionLayer]) -> None:
        self._hooks = hooks
        self._chains = chains
        self.layers = tuple(layer.name for layer in layers)

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook.remove()
        for chain in self._chains:
            chain.clear()
        self._chains = []

    def __enter__(self) -> HypernetworkHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"HypernetworkHandle(layers={len(self.layers)}, attached={self.attached})"


def attach_hypernetworks(
    model: nn.Module, hypernetworks: Sequence[tuple[Hypernetwork, float]], *, fast: bool = True
) -> HypernetworkHandle:
    """Hook ``hypernetworks`` (applied in order, each with its strength) into every matching attention layer.

    ``fast=False`` runs A1111's computation literally (every module, every layer, every call); see the module
    docstring for what ``fast`` reuses. Raises HypernetworkError when a matching layer has fused projections, which
    bypass ``to_k``/``to_v``.
    """
    pairs = [(hypernetwork, float(strength)) for hypernetwork, strength in hypernetworks]
    chains: dict[int, _Chain] = {}
    hooks: list[RemovableHandle] = []
    selected: list[AttentionLayer] = []
    for layer in attention_layers(model):
        if layer.width not in chains:
            entries = []
            for hypernetwork, strength in pairs:
                pair = hypernetwork.pair(layer.width)
                if pair is not None:
                    entries.append(_Entry(pair[0], pair[1], strength))
            if not entries:
                continue
            chains[layer.width] = _Chain(layer.width, entries)
        chain = chains[layer.width]
        if getattr(layer.module, "fused_projections", False):
            for hook in hooks:
                hook.remove()
            raise HypernetworkError(
                f"attention layer {layer.name} uses fused qkv projections, which bypass to_k/to_v; "
                "unfuse them before attaching hypernetworks"
            )
        key_hook, value_hook = _hooks_for(chain, layer.cross, fast)
        hooks.append(layer.to_k.register_forward_pre_hook(key_hook))
        hooks.append(layer.to_v.register_forward_pre_hook(value_hook))
        selected.append(layer)
    return HypernetworkHandle(hooks, list(chains.values()), selected)


def _hooks_for(chain: _Chain, cross: bool, fast: bool) -> tuple[Any, Any]:
    if not fast:

        def plain_key(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (chain.plain_key(args[0]), *args[1:])

        def plain_value(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (chain.plain_value(args[0]), *args[1:])

        return plain_key, plain_value

    if cross:

        def cross_key(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            return (chain.cross_key(x) if chain.fast_allowed() else chain.plain_key(x), *args[1:])

        def cross_value(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            return (chain.cross_value(x) if chain.fast_allowed() else chain.plain_value(x), *args[1:])

        return cross_key, cross_value

    def self_key(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (chain.self_key(x) if chain.fast_allowed() else chain.plain_key(x), *args[1:])

    def self_value(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (chain.self_value(x) if chain.fast_allowed() else chain.plain_value(x), *args[1:])

    return self_key, self_value
