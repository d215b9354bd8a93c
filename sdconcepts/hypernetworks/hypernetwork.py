"""A1111's hypernetworks in memory: the residual MLP built from its structure settings, and how a chain applies.

Each module is ``x + mlp(x) * strength`` where ``mlp`` is a Sequential rebuilt in exactly A1111's order (Linear,
activation, LayerNorm, Dropout per step), so module indices and state-dict keys match its files. A hypernetwork
holds one (key, value) module pair per context width. File keys and defaults live in ``hypernetworks.files``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_LAYER_STRUCTURE",
    "DEFAULT_WIDTHS",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkError",
    "HypernetworkModule",
    "apply_hypernetworks",
    "create_hypernetwork",
    "parse_dropout_structure",
    "width_mismatch",
]

# A1111's create form: modules for 768 (SD1 text), 320/640/1280 (self-attention channel widths); 1024 is offered too.
DEFAULT_WIDTHS: tuple[int, ...] = (768, 320, 640, 1280)
DEFAULT_LAYER_STRUCTURE: tuple[float, ...] = (1.0, 2.0, 1.0)
WEIGHT_INITS: tuple[str, ...] = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")


def _activation_table() -> dict[str, type[nn.Module] | None]:
    """A1111's table: a few fixed names, then every class of torch.nn.modules.activation by lower-cased name.

    ``swish`` is Hardswish (not SiLU), and ``linear`` means no activation module at all.
    """
    table: dict[str, type[nn.Module] | None] = {
        "linear": None,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    for class_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation" and issubclass(cls, nn.Module):
            table[class_name.lower()] = cls
    return table


ACTIVATIONS: Mapping[str, type[nn.Module] | None] = _activation_table()


class HypernetworkError(ValueError):
    """A hypernetwork structure that cannot be built (unknown activation, bad layer or dropout structure)."""


def parse_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """A1111's dropout structure for files that predate the ``dropout_structure`` key.

    Without dropout every entry is 0; with it, 0.3 after every hidden layer but the last one, which gets 0.3 only
    when ``last_layer_dropout``: ``[1, 2, 2, 1]`` -> ``[0, 0.3, 0, 0]`` (or ``[0, 0.3, 0.3, 0]``).
    """
    if not use_dropout:
        return [0.0] * len(layer_structure)
    return [0.0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0.0] + [0.0]


class HypernetworkModule(nn.Module):
    """One residual MLP ``x + mlp(x) * strength``; ``mlp`` is the Sequential ``linear`` with A1111's module order.

    For each step ``i`` of ``layer_structure``: Linear(width*ls[i] -> width*ls[i+1]); the activation unless it is
    ``linear``/None, or this is the last Linear and ``activate_output`` is False; LayerNorm when ``layer_norm``
    (after the last Linear too); Dropout when ``dropout_structure[i + 1] > 0``. In training mode the strength is 1.
    """

    def __init__(
        self,
        width: int,
        layer_structure: Sequence[float],
        *,
        activation: str | None = None,
        layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_structure(layer_structure, dropout_structure)
        activation_class = activation_class_for(activation)
        last = len(layer_structure) - 2
        layers: list[nn.Module] = []
        for i in range(len(layer_structure) - 1):
            out_features = int(width * layer_structure[i + 1])
            layers.append(nn.Linear(int(width * layer_structure[i]), out_features))
            if activation_class is not None and (i < last or activate_output):
                try:
                    layers.append(activation_class())
                except TypeError as exc:  # A1111 builds activations without arguments; a few need some
                    raise HypernetworkError(
                        f"activation {activation!r} cannot be built without arguments ({exc})"
                    ) from None
            if layer_norm:
                layers.append(nn.LayerNorm(out_features))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=float(dropout_structure[i + 1])))
        self.width = width
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        out: torch.Tensor = x + self.linear(x) * (strength if not self.training else 1)
        return out

    def run(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """``forward`` in the module's own dtype, the result in ``x``'s (A1111's cond_cast_float/cond_cast_unet)."""
        dtype = self.first_linear().weight.dtype
        if x.dtype == dtype:
            out: torch.Tensor = self(x, strength)
            return out
        out = self(x.to(dtype), strength)
        return out.to(x.dtype)

    def first_linear(self) -> nn.Linear:
        layer = self.linear[0]
        assert isinstance(layer, nn.Linear)
        return layer

    def is_affine(self) -> bool:
        """True when, in eval mode, the MLP is a plain affine map (only Linear and Dropout modules)."""
        return all(isinstance(layer, (nn.Linear, nn.Dropout)) for layer in self.linear)


def activation_class_for(activation: str | None) -> type[nn.Module] | None:
    if activation is None:
        return None
    if activation not in ACTIVATIONS:
        raise HypernetworkError(
            f"unsupported activation function {activation!r}; expected one of: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[activation]


def check_structure(layer_structure: Sequence[float], dropout_structure: Sequence[float] | None) -> None:
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise HypernetworkError(f"layer structure {list(layer_structure)} must start and end with 1")
    if any(not value > 0 for value in layer_structure):
        raise HypernetworkError(f"layer structure {list(layer_structure)} must be positive numbers")
    if dropout_structure is None:
        return
    if len(dropout_structure) < len(layer_structure):
        raise HypernetworkError(
            f"dropout structure {list(dropout_structure)} must have one entry per layer structure entry "
            f"({len(layer_structure)})"
        )
    # A1111 only asserts on values it uses (> 0); zero or negative entries simply add no Dropout.
    if any(p >= 1 for p in dropout_structure[1 : len(layer_structure)]):
        raise HypernetworkError(f"dropout structure {list(dropout_structure)} must hold probabilities below 1")


def init_weights(module: HypernetworkModule, weight_init: str, activation: str | None) -> None:
    """A1111's initialisation of a new module: LayerNorms always N(0, 0.01) with zero bias, Linears per ``weight_init``."""
    if weight_init not in WEIGHT_INITS:
        raise HypernetworkError(f"unknown weight initialization {weight_init!r}; expected one of: {', '.join(WEIGHT_INITS)}")
    nonlinearity: Literal["leaky_relu", "relu"] = "leaky_relu" if activation == "leakyrelu" else "relu"
    with torch.no_grad():
        for layer in module.linear:
            if type(layer) not in (nn.Linear, nn.LayerNorm):  # exact types, as A1111 checks
                continue
            weight, bias = layer.weight, layer.bias
            assert isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)
            if weight_init == "Normal" or type(layer) is nn.LayerNorm:
                nn.init.normal_(weight, mean=0.0, std=0.01)
                nn.init.normal_(bias, mean=0.0, std=0.0)
            elif weight_init == "XavierUniform":
                nn.init.xavier_uniform_(weight)
                nn.init.zeros_(bias)
            elif weight_init == "XavierNormal":
                nn.init.xavier_normal_(weight)
                nn.init.zeros_(bias)
            elif weight_init == "KaimingUniform":
                nn.init.kaiming_uniform_(weight, nonlinearity=nonlinearity)
                nn.init.zeros_(bias)
            else:
                nn.init.kaiming_normal_(weight, nonlinearity=nonlinearity)
                nn.init.zeros_(bias)


class Hypernetwork(nn.Module):
    """A named hypernetwork: a (key, value) module pair per context width, plus A1111's metadata.

    It is an ``nn.Module`` so ``parameters()``, ``train()``, ``eval()`` and ``to()`` cover every module; nothing here
    holds a strength (it is passed to ``apply_hypernetworks`` or ``attach_hypernetworks``).
    """

    def __init__(
        self,
        name: str,
        layers: Mapping[int, tuple[HypernetworkModule, HypernetworkModule]],
        *,
        layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
        activation: str | None = None,
        weight_init: str = "Normal",
        layer_norm: bool = False,
        use_dropout: bool = False,
        dropout_structure: Sequence[float] | None = None,
        activate_output: bool = False,
        step: int = 0,
        sd_checkpoint: str | None = None,
        sd_checkpoint_name: str | None = None,
        optional_info: str | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.layer_structure = list(layer_structure)
        self.activation = activation
        self.weight_init = weight_init
        self.layer_norm = layer_norm
        self.use_dropout = use_dropout
        self.dropout_structure = (
            list(dropout_structure)
            if dropout_structure is not None
            else parse_dropout_structure(layer_structure, use_dropout, False)
        )
        self.activate_output = activate_output
        self.step = step
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.optional_info = optional_info
        self.modules_by_width = nn.ModuleDict({str(width): nn.ModuleList(pair) for width, pair in layers.items()})
        self._layers = {int(width): (pair[0], pair[1]) for width, pair in layers.items()}

    @property
    def layers(self) -> dict[int, tuple[HypernetworkModule, HypernetworkModule]]:
        """Context width -> (key module, value module), in the order the file lists them."""
        return dict(self._layers)

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(self._layers)

    def pair(self, width: int) -> tuple[HypernetworkModule, HypernetworkModule] | None:
        return self._layers.get(width)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, widths={list(self.widths)}, layer_structure={self.layer_structure}, activation={self.activation!r}"


def create_hypernetwork(
    name: str,
    widths: Iterable[int] = DEFAULT_WIDTHS,
    *,
    layer_structure: Sequence[float] = DEFAULT_LAYER_STRUCTURE,
    activation: str | None = "linear",
    weight_init: str = "Normal",
    layer_norm: bool = False,
    use_dropout: bool = False,
    dropout_structure: Sequence[float] | None = None,
    activate_output: bool = False,
    generator_seed: int | None = None,
) -> Hypernetwork:
    """A new hypernetwork with A1111's create-form defaults (768/320/640/1280, ``[1, 2, 1]``, linear, Normal).

    As in A1111, the dropout structure is used only with ``use_dropout`` (otherwise all zeros), and modules are built
    and initialised width by width, key before value, on the CPU, so the same torch seed gives A1111's weights.
    ``generator_seed`` seeds torch's global generator first when given.
    """
    structure = list(layer_structure)
    dropout = list(dropout_structure) if use_dropout and dropout_structure is not None else [0.0] * len(structure)
    check_structure(structure, dropout)
    activation_class_for(activation)
    if weight_init not in WEIGHT_INITS:
        raise HypernetworkError(f"unknown weight initialization {weight_init!r}; expected one of: {', '.join(WEIGHT_INITS)}")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    for width in widths:
        width = int(width)
        if width <= 0:
            raise HypernetworkError(f"width {width} must be a positive whole number")
        pair: list[HypernetworkModule] = []
        for _ in range(2):
            module = HypernetworkModule(
                width,
                structure,
                activation=activation,
                layer_norm=layer_norm,
                activate_output=activate_output,
                dropout_structure=dropout,
            )
            init_weights(module, weight_init, activation)
            pair.append(module)
        layers[width] = (pair[0], pair[1])
    hypernetwork = Hypernetwork(
        name,
        layers,
        layer_structure=structure,
        activation=activation,
        weight_init=weight_init,
        layer_norm=layer_norm,
        use_dropout=use_dropout,
        dropout_structure=dropout,
        activate_output=activate_output,
    )
    return hypernetwork.eval()


def apply_hypernetworks(
    context: torch.Tensor, hypernetworks: Sequence[tuple[Hypernetwork, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of ``to_k`` and ``to_v`` for ``context``: the chain of each hypernetwork in order, as A1111.

    A hypernetwork without a module for the context's last dimension passes both through. The modules run in their
    own dtype and the results come back in the context's dtype (A1111's cond_cast_float/cond_cast_unet).
    """
    key, value = context, context
    width = context.shape[-1]
    for hypernetwork, strength in hypernetworks:
        pair = hypernetwork.pair(width)
        if pair is None:
            continue
        key = pair[0].run(key, strength)
        value = pair[1].run(value, strength)
    return key, value



def width_mismatch(name: str, hypernetwork: Hypernetwork, widths: Iterable[int]) -> str | None:
    """The warning for a hypernetwork none of whose module widths is a key input width of the model's attention
    layers (it would have no effect), else None. ``name`` is what the prompt called it."""
    model_widths = sorted(set(widths))
    if any(width in model_widths for width in hypernetwork.widths):
        return None
    return (
        f"hypernet {name!r} has modules for widths {list(hypernetwork.widths)}, none of which fits the loaded "
        f"model's attention layers ({', '.join(map(str, model_widths))}): it has no effect"
    )
