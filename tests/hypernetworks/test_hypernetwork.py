"""Hypernetwork modules against A1111's construction rules, written out here independently from the spec.

Files are built in A1111's exact layout (int width keys, tuple or list pairs, module indices that count activations,
LayerNorms and Dropouts, legacy ``linear1``/``linear2`` keys, missing metadata) and loaded through our reader; the
state-dict keys and outputs must match a reference computed with plain ``torch.nn.functional`` from the same spec.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from sdconcepts.hypernetworks.files import HypernetworkFileError, load_hypernetwork
from sdconcepts.hypernetworks.hypernetwork import (
    HypernetworkError,
    HypernetworkModule,
    apply_hypernetworks,
    create_hypernetwork,
    parse_dropout_structure,
)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-6, atol=1e-6))


# a1111-compat §3.4, written out: the fixed names, then torch activations by lower-cased class name.
SPEC_ACTIVATIONS: dict[str, Any] = {
    "relu": torch.nn.ReLU,
    "leakyrelu": torch.nn.LeakyReLU,
    "elu": torch.nn.ELU,
    "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh,
    "sigmoid": torch.nn.Sigmoid,
    "gelu": torch.nn.GELU,
    "silu": torch.nn.SiLU,
    "mish": torch.nn.Mish,
    "softplus": torch.nn.Softplus,
    "prelu": torch.nn.PReLU,
    "hardswish": torch.nn.Hardswish,
    "relu6": torch.nn.ReLU6,
    "softsign": torch.nn.Softsign,
}


def spec_ops(
    width: int,
    layer_structure: list[float],
    activation: str | None,
    layer_norm: bool,
    dropout: list[float],
    activate_output: bool,
) -> list[tuple[str, Any]]:
    """The Sequential A1111 builds (§3.3), as a list of (kind, detail); the list index is the module index."""
    ops: list[tuple[str, Any]] = []
    n = len(layer_structure)
    for i in range(n - 1):
        ops.append(("linear", (int(width * layer_structure[i]), int(width * layer_structure[i + 1]))))
        if activation not in (None, "linear") and (i < n - 2 or activate_output):
            ops.append(("act", activation))
        if layer_norm:
            ops.append(("norm", int(width * layer_structure[i + 1])))
        if dropout[i + 1] > 0:
            ops.append(("dropout", dropout[i + 1]))
    return ops


def spec_state_dict(ops: list[tuple[str, Any]], generator: torch.Generator) -> OrderedDict[str, torch.Tensor]:
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for index, (kind, detail) in enumerate(ops):
        if kind == "linear":
            fan_in, fan_out = detail
            sd[f"linear.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * 0.3
            sd[f"linear.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
        elif kind == "norm":
            sd[f"linear.{index}.weight"] = 1 + torch.randn(detail, generator=generator) * 0.1
            sd[f"linear.{index}.bias"] = torch.randn(detail, generator=generator) * 0.1
        elif kind == "act" and detail == "prelu":
            sd[f"linear.{index}.weight"] = torch.rand(1, generator=generator)
    return sd


def spec_forward(
    x: torch.Tensor, ops: list[tuple[str, Any]], sd: OrderedDict[str, torch.Tensor], strength: float
) -> torch.Tensor:
    h = x
    for index, (kind, detail) in enumerate(ops):
        if kind == "linear":
            h = F.linear(h, sd[f"linear.{index}.weight"], sd[f"linear.{index}.bias"])
        elif kind == "act":
            module = SPEC_ACTIVATIONS[detail]()
            if detail == "prelu":
                module.weight.data.copy_(sd[f"linear.{index}.weight"])
            h = module(h)
        elif kind == "norm":
            h = F.layer_norm(h, (detail,), sd[f"linear.{index}.weight"], sd[f"linear.{index}.bias"], eps=1e-5)
        # dropout: identity in eval mode
    return x + h * strength


STRUCTURES = [[1, 2, 1], [1.0, 1.5, 1.5, 1.0], [1, 0.5, 1], [1, 2, 2, 1]]
ACTIVATION_GRID = [None, "linear", "relu", "swish", "leakyrelu", "gelu", "prelu", "tanh", "mish", "softsign"]


@pytest.mark.parametrize("activation", ACTIVATION_GRID)
@pytest.mark.parametrize("structure", STRUCTURES, ids=lambda s: "-".join(map(str, s)))
def test_a1111_layout_grid_loads_with_spec_keys_and_outputs(
    tmp_path: Path, activation: str | None, structure: list[float]
) -> None:
    generator = torch.Generator().manual_seed(0)
    widths = (12, 20)
    n = len(structure)
    variants = itertools.product([False, True], ["missing", "legacy", "legacy-last", "explicit"], [False, True, None])
    for layer_norm, dropout_kind, activate_output in variants:
        meta: dict[Any, Any] = {"layer_structure": structure, "activation_func": activation, "is_layer_norm": layer_norm}
        if activate_output is not None:
            meta["activate_output"] = activate_output
        if dropout_kind == "missing":
            dropout = [0.0] * n
        elif dropout_kind.startswith("legacy"):
            # files from before dropout_structure: A1111 derives it from use_dropout and last_layer_dropout
            meta["use_dropout"] = True
            meta["last_layer_dropout"] = dropout_kind == "legacy-last"
            dropout = [0.0] + [0.3] * (n - 3) + [0.3 if dropout_kind == "legacy-last" else 0.0] + [0.0]
        else:
            dropout = [0.0] + [0.1 * (i + 1) for i in range(n - 2)] + [0.0]
            meta["dropout_structure"] = dropout
            meta["use_dropout"] = False  # A1111: a nonzero structure turns dropout on regardless
        # activate_output is True on load when the key is missing
        effective_output = True if activate_output is None else activate_output
        data: dict[Any, Any] = {}
        states = {}
        for width in widths:
            ops = spec_ops(width, structure, activation, layer_norm, dropout, effective_output)
            pair = (spec_state_dict(ops, generator), spec_state_dict(ops, generator))
            states[width] = (ops, pair)
            data[width] = pair if width == 12 else list(pair)  # tuple or list pairs
        data.update(meta)
        path = tmp_path / f"hn-{layer_norm}-{dropout_kind}-{activate_output}.pt"
        torch.save(data, path)

        hypernetwork = load_hypernetwork(path)
        assert hypernetwork.name == path.stem and hypernetwork.step == 0
        assert hypernetwork.widths == widths and hypernetwork.activate_output is effective_output
        assert hypernetwork.dropout_structure == dropout
        # A1111: on when an explicit structure has a nonzero entry, else the file's flag (default False)
        assert hypernetwork.use_dropout is (dropout_kind.startswith("legacy") or any(dropout))
        for width in widths:
            ops, (sd_k, sd_v) = states[width]
            key_module, value_module = hypernetwork.layers[width]
            assert list(key_module.state_dict()) == list(sd_k)
            kinds = [type(m).__name__ for m in key_module.linear]
            expected = [
                {"linear": "Linear", "norm": "LayerNorm", "dropout": "Dropout"}.get(k)
                or SPEC_ACTIVATIONS[d].__name__
                for k, d in ops
            ]
            assert kinds == expected
            context = torch.randn(2, 5, width, generator=generator)
            for strength in (1.0, 0.6, -0.4):
                got_k, got_v = apply_hypernetworks(context, [(hypernetwork, strength)])
                assert _close(got_k, spec_forward(context, ops, sd_k, strength))
                assert _close(got_v, spec_forward(context, ops, sd_v, strength))


def test_legacy_two_layer_file_without_metadata(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    width = 16

    def legacy_sd() -> dict[str, torch.Tensor]:
        return {
            "linear1.weight": torch.randn(2 * width, width, generator=g),
            "linear1.bias": torch.randn(2 * width, generator=g),
            "linear2.weight": torch.randn(width, 2 * width, generator=g),
            "linear2.bias": torch.randn(width, generator=g),
        }

    k_sd, v_sd = legacy_sd(), legacy_sd()
    path = tmp_path / "oct2022.pt"
    torch.save({width: [k_sd, v_sd]}, path)
    hypernetwork = load_hypernetwork(path)
    assert hypernetwork.layer_structure == [1, 2, 1] and hypernetwork.activation is None
    assert hypernetwork.weight_init == "Normal" and not hypernetwork.layer_norm and not hypernetwork.use_dropout
    key_module, _ = hypernetwork.layers[width]
    assert list(key_module.state_dict()) == ["linear.0.weight", "linear.0.bias", "linear.1.weight", "linear.1.bias"]
    x = torch.randn(3, width, generator=g)
    expected_k = x + F.linear(F.linear(x, k_sd["linear1.weight"], k_sd["linear1.bias"]), k_sd["linear2.weight"], k_sd["linear2.bias"])
    expected_v = x + F.linear(F.linear(x, v_sd["linear1.weight"], v_sd["linear1.bias"]), v_sd["linear2.weight"], v_sd["linear2.bias"])
    got_k, got_v = apply_hypernetworks(x, [(hypernetwork, 1.0)])
    torch.testing.assert_close(got_k, expected_k)
    torch.testing.assert_close(got_v, expected_v)


def test_name_key_overrides_stem_and_metadata_defaults(tmp_path: Path) -> None:
    hypernetwork = create_hypernetwork("inner", (8,))
    from sdconcepts.hypernetworks.files import hypernetwork_to_dict

    data = hypernetwork_to_dict(hypernetwork)
    data["step"] = 1234
    path = tmp_path / "outer.pt"
    torch.save(data, path)
    assert load_hypernetwork(path).name == "inner"
    assert load_hypernetwork(path).step == 1234
    del data["name"]
    torch.save(data, path)
    assert load_hypernetwork(path).name == "outer"


def test_chaining_follows_prompt_order() -> None:
    first = create_hypernetwork("a", (8,), activation="relu", weight_init="XavierNormal", generator_seed=1)
    second = create_hypernetwork("b", (8,), activation="tanh", weight_init="XavierUniform", generator_seed=2)
    other_width = create_hypernetwork("c", (6,), generator_seed=3)
    x = torch.randn(2, 3, 8)
    key, value = apply_hypernetworks(x, [(first, 0.7), (other_width, 1.0), (second, -0.3)])
    a_k, a_v = first.layers[8]
    b_k, b_v = second.layers[8]
    torch.testing.assert_close(key, b_k(a_k(x, 0.7), -0.3), rtol=0, atol=0)
    torch.testing.assert_close(value, b_v(a_v(x, 0.7), -0.3), rtol=0, atol=0)
    swapped, _ = apply_hypernetworks(x, [(second, -0.3), (first, 0.7)])
    assert not torch.equal(swapped, key)
    unchanged_k, unchanged_v = apply_hypernetworks(x, [(other_width, 1.0)])
    assert unchanged_k is x and unchanged_v is x


def test_strength_is_one_in_training_mode() -> None:
    module = HypernetworkModule(8, [1, 2, 1], activation="relu")
    torch.nn.init.normal_(module.linear[2].weight)
    x = torch.randn(4, 8)
    module.train()
    torch.testing.assert_close(module(x, 0.25), module(x, 1.0), rtol=0, atol=0)
    module.eval()
    assert not torch.allclose(module(x, 0.25), module(x, 1.0))
    torch.testing.assert_close(module(x, 0.0), x, rtol=0, atol=0)


def test_create_matches_a1111_initialisation_order_for_a_seed() -> None:
    """A1111 builds each module's Linears (default init draws from the RNG), then re-initialises them in order."""
    for weight_init, activation, layer_norm in [("Normal", "linear", True), ("KaimingNormal", "leakyrelu", False)]:
        torch.manual_seed(7)
        expected = []
        for width in (8, 6):
            for _ in range(2):
                layers: list[torch.nn.Module] = []
                for fan_in, fan_out in ((width, 2 * width), (2 * width, width)):
                    layers.append(torch.nn.Linear(fan_in, fan_out))
                    if layer_norm:
                        layers.append(torch.nn.LayerNorm(fan_out))
                for layer in layers:
                    if weight_init == "Normal" or isinstance(layer, torch.nn.LayerNorm):
                        torch.nn.init.normal_(layer.weight, 0.0, 0.01)
                        torch.nn.init.normal_(layer.bias, 0.0, 0.0)
                    else:
                        torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="leaky_relu")
                        torch.nn.init.zeros_(layer.bias)
                expected.append([p.detach() for layer in layers for p in layer.parameters()])
        torch.manual_seed(7)
        made = create_hypernetwork(
            "x", (8, 6), layer_structure=[1.0, 2.0, 1.0], activation=activation, weight_init=weight_init,
            layer_norm=layer_norm,
        )
        got = [[p.detach() for p in module.parameters()] for pair in made.layers.values() for module in pair]
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                assert torch.equal(a, b)


def test_create_defaults_are_a1111s_form() -> None:
    made = create_hypernetwork("default")
    assert made.widths == (768, 320, 640, 1280)
    assert made.layer_structure == [1.0, 2.0, 1.0] and made.activation == "linear" and made.weight_init == "Normal"
    assert not made.layer_norm and not made.use_dropout and not made.activate_output
    assert made.dropout_structure == [0.0, 0.0, 0.0]
    # a1111-compat §3.2: about 21.9 M float32 parameters
    assert abs(sum(p.numel() for p in made.parameters()) - 21.9e6) < 0.1e6
    assert not made.training
    # the dropout structure is only used with use_dropout, as in A1111's create function
    assert create_hypernetwork("d", (8,), dropout_structure=[0, 0.2, 0]).dropout_structure == [0.0, 0.0, 0.0]
    with_dropout = create_hypernetwork("d", (8,), use_dropout=True, dropout_structure=[0, 0.2, 0])
    assert [type(m).__name__ for m in with_dropout.layers[8][0].linear] == ["Linear", "Dropout", "Linear"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "nope"}, "unsupported activation"),
        ({"activation": "threshold"}, "cannot be built"),
        ({"layer_structure": [2, 1]}, "start and end with 1"),
        ({"layer_structure": [1, 2, 1], "use_dropout": True, "dropout_structure": [0, 1.5, 0]}, "below 1"),
        ({"layer_structure": [1, 2, 1], "use_dropout": True, "dropout_structure": [0, 0.1]}, "one entry per"),
        ({"weight_init": "Uniform"}, "weight initialization"),
    ],
)
def test_create_rejects_bad_structures(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(HypernetworkError, match=message):
        create_hypernetwork("bad", (8,), **kwargs)


def test_parse_dropout_structure_matches_spec_examples() -> None:
    assert parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]
    assert parse_dropout_structure([1, 2, 1], False, True) == [0, 0, 0]


def test_activation_table_follows_a1111() -> None:
    from sdconcepts.hypernetworks.hypernetwork import ACTIVATIONS

    assert ACTIVATIONS["swish"] is torch.nn.Hardswish and ACTIVATIONS["linear"] is None
    for name, cls in SPEC_ACTIVATIONS.items():
        assert ACTIVATIONS[name] is cls
    assert "identity" not in ACTIVATIONS and "ReLU" not in ACTIVATIONS


def test_unrunnable_activation_in_a_file_is_a_file_error(tmp_path: Path) -> None:
    hypernetwork = create_hypernetwork("g", (8,))
    from sdconcepts.hypernetworks.files import hypernetwork_to_dict

    data = hypernetwork_to_dict(hypernetwork)
    data["activation_func"] = "glu"  # halves the width: the next Linear cannot take it
    path = tmp_path / "glu.pt"
    torch.save(data, path)
    with pytest.raises(HypernetworkFileError, match="glu.pt"):
        load_hypernetwork(path)
