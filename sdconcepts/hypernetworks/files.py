"""A1111's hypernetwork ``.pt`` layout and its ``.optim`` sidecar: read, write and describe.

This is the only place that knows A1111's key names (``is_layer_norm``, ``activation_func``, integer width keys,
legacy ``linear1``/``linear2``) and its defaults for missing keys (a1111-compat §3.2, §3.5). Files are read with the
shared restricted loader, so no code from a file ever runs, and written in a form A1111's safe unpickler accepts.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdconcepts.atomic_files import commit_with_sidecar, sidecar_candidates
from sdconcepts.hypernetworks.hypernetwork import (
    Hypernetwork,
    HypernetworkError,
    HypernetworkModule,
    activation_class_for,
    check_structure,
    parse_dropout_structure,
)
from sdconcepts.safe_load import (
    TensorInfo,
    UnsafeFileError,
    file_sha256,
    load_torch_file,
    read_metadata,
    write_torch_file,
)

__all__ = [
    "HypernetworkFileError",
    "HypernetworkInfo",
    "OptimizerState",
    "describe_hypernetwork",
    "hypernetwork_from_dict",
    "hypernetwork_to_dict",
    "load_hypernetwork",
    "load_optimizer_state",
    "looks_like_hypernetwork",
    "read_hypernetwork_info",
    "optimizer_path",
    "save_hypernetwork",
    "shorthash",
]

# The October 2022 two-layer files: A1111 renames these before load_state_dict.
_LEGACY_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


class HypernetworkFileError(HypernetworkError):
    """A hypernetwork file that cannot be loaded or written; the message names the file and what was expected."""


@dataclass(frozen=True)
class OptimizerState:
    """The ``.optim`` sidecar's content: a ``torch.optim`` class name and that optimizer's ``state_dict()``; and
    ours beside A1111's keys, which A1111 ignores: the run's validation state (``training.validation``)."""

    optimizer_name: str
    state_dict: Mapping[str, Any]
    validation: Mapping[str, Any] | None = None


def shorthash(path: str | os.PathLike[str]) -> str:
    """A1111's 10-hex-digit shorthash: the start of the file's SHA-256."""
    return file_sha256(path)[:10]


def optimizer_path(path: str | os.PathLike[str]) -> Path:
    """A1111 appends ``.optim`` to the whole file name: ``name.pt.optim``."""
    return Path(os.fspath(path) + ".optim")


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def load_hypernetwork(path: str | os.PathLike[str]) -> Hypernetwork:
    """Load an A1111 hypernetwork ``.pt``; its name is the file's ``name`` key, else the file stem (as A1111).

    Raises HypernetworkFileError naming the file for hostile or corrupt pickles, unknown activations, bad structures
    and state dicts that do not fit the structure.
    """
    p = Path(path)
    try:
        data = load_torch_file(p)
    except UnsafeFileError as exc:
        raise HypernetworkFileError(str(exc)) from None
    return hypernetwork_from_dict(data, source=str(p), default_name=p.stem)


@dataclass(frozen=True)
class _Metadata:
    """A1111's metadata keys with its defaults for missing ones (a1111-compat §3.2)."""

    name: str
    layer_structure: list[float]
    activation: str | None
    weight_init: str
    layer_norm: bool
    use_dropout: bool
    dropout_structure: list[float]
    activate_output: bool
    step: int
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    optional_info: str | None


def _metadata(data: object, source: str, default_name: str) -> _Metadata:
    if not isinstance(data, Mapping):
        raise HypernetworkFileError(f"{source}: not a hypernetwork (expected a dict, found {type(data).__name__})")
    layer_structure = data.get("layer_structure")
    if layer_structure is None:
        layer_structure = [1, 2, 1]  # A1111's default (ints, as its loader writes them)
    if not isinstance(layer_structure, (list, tuple)) or not all(_is_number(v) for v in layer_structure):
        raise HypernetworkFileError(f"{source}: layer_structure {layer_structure!r} is not a list of numbers")
    activation = data.get("activation_func")
    if activation is not None and not isinstance(activation, str):
        raise HypernetworkFileError(f"{source}: activation_func {activation!r} is not a name")
    dropout_structure = data.get("dropout_structure")
    if dropout_structure is not None and (
        not isinstance(dropout_structure, (list, tuple)) or not all(_is_number(v) for v in dropout_structure)
    ):
        raise HypernetworkFileError(f"{source}: dropout_structure {dropout_structure!r} is not a list of numbers")
    # A1111: dropout is on when the structure has a nonzero entry, else the file's flag; activate_output defaults
    # to True on load (the create form's default is False), which matters only with an activation.
    if dropout_structure is not None and any(dropout_structure):
        use_dropout = True
    else:
        use_dropout = bool(data.get("use_dropout", False))
    last_layer_dropout = bool(data.get("last_layer_dropout", False))
    if dropout_structure is None:
        dropout_structure = parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout)
    name = data.get("name")
    step = data.get("step")
    return _Metadata(
        name=name if isinstance(name, str) and name else default_name,
        layer_structure=list(layer_structure),
        activation=activation,
        weight_init=str(data.get("weight_initialization") or "Normal"),
        layer_norm=bool(data.get("is_layer_norm", False)),
        use_dropout=use_dropout,
        dropout_structure=list(dropout_structure),
        activate_output=bool(data.get("activate_output", True)),
        step=int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0,
        sd_checkpoint=_optional_str(data.get("sd_checkpoint")),
        sd_checkpoint_name=_optional_str(data.get("sd_checkpoint_name")),
        optional_info=_optional_str(data.get("optional_info")),
    )


def _width_pairs(data: Mapping[Any, Any], source: str) -> list[tuple[int, tuple[Mapping[str, Any], Mapping[str, Any]]]]:
    pairs = []
    for key, pair in data.items():
        if type(key) is not int:  # A1111: every int key is a width, everything else metadata
            continue
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(sd, Mapping) for sd in pair):
            raise HypernetworkFileError(f"{source}: width {key} must hold a (key, value) pair of state dicts")
        if key <= 0:
            raise HypernetworkFileError(f"{source}: width {key} is not a positive width")
        pairs.append((key, (pair[0], pair[1])))
    if not pairs:
        raise HypernetworkFileError(f"{source}: not a hypernetwork (no integer width keys with module state dicts)")
    return pairs


def hypernetwork_from_dict(data: object, *, source: str, default_name: str) -> Hypernetwork:
    """Rebuild a hypernetwork from a loaded A1111 dict, applying A1111's defaults for missing keys."""
    meta = _metadata(data, source, default_name)
    assert isinstance(data, Mapping)
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    for key, pair in _width_pairs(data, source):
        built = []
        for role, state_dict in zip(("key", "value"), pair, strict=True):
            try:
                module = HypernetworkModule(
                    key,
                    meta.layer_structure,
                    activation=meta.activation,
                    layer_norm=meta.layer_norm,
                    activate_output=meta.activate_output,
                    dropout_structure=meta.dropout_structure,
                )
                module.load_state_dict(_fix_legacy_keys(state_dict))
                module.eval()
                with torch.no_grad():
                    module(torch.zeros(1, key))  # a structure that cannot run (e.g. glu halves the width) fails here
            except HypernetworkError as exc:
                raise HypernetworkFileError(f"{source}: {exc}") from None
            except (RuntimeError, TypeError, ValueError) as exc:
                raise HypernetworkFileError(
                    f"{source}: the {role} module for width {key} does not fit its structure "
                    f"({_first_line(exc)})"
                ) from None
            if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
                # Applied, every picture would fail at its end with "NaN values" far from the cause.
                raise HypernetworkFileError(
                    f"{source}: the {role} module for width {key} has NaN or infinite weights (a training run that "
                    "diverged?); it cannot be applied"
                )
            built.append(module)
        layers[key] = (built[0], built[1])

    hypernetwork = Hypernetwork(
        meta.name,
        layers,
        layer_structure=meta.layer_structure,
        activation=meta.activation,
        weight_init=meta.weight_init,
        layer_norm=meta.layer_norm,
        use_dropout=meta.use_dropout,
        dropout_structure=meta.dropout_structure,
        activate_output=meta.activate_output,
        step=meta.step,
        sd_checkpoint=meta.sd_checkpoint,
        sd_checkpoint_name=meta.sd_checkpoint_name,
        optional_info=meta.optional_info,
    )
    return hypernetwork.eval()


@dataclass(frozen=True)
class HypernetworkInfo:
    """What a card or a folder listing shows about a hypernetwork file, read without loading its weights.

    The attribute names match ``Hypernetwork``'s, so a card renders either. ``parameters`` counts the elements of
    the stored tensors from their shapes.
    """

    name: str
    widths: tuple[int, ...]
    layer_structure: tuple[float, ...]
    activation: str | None
    weight_init: str
    layer_norm: bool
    use_dropout: bool
    dropout_structure: tuple[float, ...]
    activate_output: bool
    step: int
    sd_checkpoint: str | None
    sd_checkpoint_name: str | None
    optional_info: str | None
    parameters: int


def read_hypernetwork_info(path: str | os.PathLike[str]) -> HypernetworkInfo:
    """A hypernetwork file's metadata, widths and parameter count from its pickle alone: no tensor data is read and
    no module is built (a file is loaded for real only when a prompt uses it). Raises HypernetworkFileError for
    files that are not hypernetworks, and for metadata A1111 could not build (unknown activation, bad structure).
    """
    p = Path(path)
    try:
        data = read_metadata(p)
    except UnsafeFileError as exc:
        raise HypernetworkFileError(str(exc)) from None
    source = str(p)
    meta = _metadata(data, source, p.stem)
    assert isinstance(data, Mapping)
    pairs = _width_pairs(data, source)
    try:
        check_structure(meta.layer_structure, meta.dropout_structure)
        activation_class_for(meta.activation)
    except HypernetworkError as exc:
        raise HypernetworkFileError(f"{source}: {exc}") from None
    parameters = 0
    for key, pair in pairs:
        for state_dict in pair:
            for name, value in state_dict.items():
                if not isinstance(value, TensorInfo):
                    raise HypernetworkFileError(f"{source}: width {key} holds {name!r} that is not a tensor")
                parameters += value.numel()
    return HypernetworkInfo(
        name=meta.name,
        widths=tuple(key for key, _ in pairs),
        layer_structure=tuple(meta.layer_structure),
        activation=meta.activation,
        weight_init=meta.weight_init,
        layer_norm=meta.layer_norm,
        use_dropout=meta.use_dropout,
        dropout_structure=tuple(meta.dropout_structure),
        activate_output=meta.activate_output,
        step=meta.step,
        sd_checkpoint=meta.sd_checkpoint,
        sd_checkpoint_name=meta.sd_checkpoint_name,
        optional_info=meta.optional_info,
        parameters=parameters,
    )


def looks_like_hypernetwork(data: object) -> bool:
    """A dict with an integer width key, or with A1111's hypernetwork-only metadata keys (``inspect`` tells the
    two kinds of ``.pt`` apart by this before describing a file)."""
    if not isinstance(data, Mapping):
        return False
    if any(type(key) is int for key in data):
        return True
    return any(key in data for key in ("layer_structure", "activation_func", "is_layer_norm", "weight_initialization"))


def _fix_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    return {_LEGACY_KEYS.get(key, key): value for key, value in state_dict.items()}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return " ".join(text.split())[:300] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def hypernetwork_to_dict(hypernetwork: Hypernetwork) -> dict[Any, Any]:
    """The dict A1111's ``Hypernetwork.save`` writes: width -> (key, value) state dicts, then every metadata key."""
    data: dict[Any, Any] = {}
    for width, (key_module, value_module) in hypernetwork.layers.items():
        data[int(width)] = (_plain_state_dict(key_module), _plain_state_dict(value_module))
    dropout = list(hypernetwork.dropout_structure)
    data["step"] = int(hypernetwork.step)
    data["name"] = hypernetwork.name
    data["layer_structure"] = list(hypernetwork.layer_structure)
    data["activation_func"] = hypernetwork.activation
    data["is_layer_norm"] = bool(hypernetwork.layer_norm)
    data["weight_initialization"] = hypernetwork.weight_init
    data["sd_checkpoint"] = hypernetwork.sd_checkpoint
    data["sd_checkpoint_name"] = hypernetwork.sd_checkpoint_name
    data["activate_output"] = bool(hypernetwork.activate_output)
    data["use_dropout"] = bool(hypernetwork.use_dropout)
    data["dropout_structure"] = dropout
    data["last_layer_dropout"] = len(dropout) >= 2 and dropout[-2] != 0
    data["optional_info"] = hypernetwork.optional_info or None
    return data


def _plain_state_dict(module: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    # Own contiguous float32 CPU storage per tensor: A1111 loads these with map_location='cpu'.
    return OrderedDict(
        (key, value.detach().to(device="cpu", dtype=torch.float32).contiguous().clone())
        for key, value in module.state_dict().items()
    )


def save_hypernetwork(
    hypernetwork: Hypernetwork,
    path: str | os.PathLike[str],
    *,
    optimizer: OptimizerState | None = None,
) -> Path:
    """Write ``hypernetwork`` atomically as an A1111 ``.pt``; with ``optimizer``, also the ``.optim`` sidecar.

    The sidecar holds ``optimizer_name``, ``optimizer_state_dict`` and ``hash``: the shorthash of the ``.pt`` just
    written, which is what A1111 compares on load before reusing the state.
    """
    p = Path(path)
    data = hypernetwork_to_dict(hypernetwork)

    def write(tmp: Path) -> None:
        write_torch_file(data, tmp)

    sidecar = None
    if optimizer is not None and optimizer.state_dict:
        state = optimizer

        def sidecar(tmp: Path) -> dict[str, Any]:
            return {
                "optimizer_name": state.optimizer_name,
                "hash": shorthash(tmp),
                "optimizer_state_dict": dict(state.state_dict),
                **({"validation": dict(state.validation)} if state.validation is not None else {}),
            }

    # The .pt and its .optim are committed so that a kill between the two renames loses neither (safe_load).
    return commit_with_sidecar(p, write, sidecar)


def load_optimizer_state(path: str | os.PathLike[str]) -> OptimizerState | None:
    """The sidecar's optimizer state for ``path`` when its ``hash`` matches the file's shorthash (A1111's rule).

    A sidecar that a kill left under its pending name (see ``atomic_files.commit_with_sidecar``) is found too.
    """
    try:
        candidates = sidecar_candidates(path)
    except UnsafeFileError as exc:
        raise HypernetworkFileError(str(exc)) from None
    for sidecar, data in candidates:
        state = data.get("optimizer_state_dict")
        if data.get("hash") != shorthash(path) or not state:
            continue
        if not isinstance(state, Mapping):
            raise HypernetworkFileError(f"{sidecar}: optimizer_state_dict is not a dict")
        validation = data.get("validation")
        return OptimizerState(str(data.get("optimizer_name") or "AdamW"), dict(state),
                              dict(validation) if isinstance(validation, Mapping) else None)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Describing (python -m sdconcepts inspect)
# ---------------------------------------------------------------------------------------------------------------------


def describe_hypernetwork(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A JSON-ready summary of a hypernetwork file: metadata, widths, parameter count, hash and sidecar status."""
    p = Path(path)
    hypernetwork = load_hypernetwork(p)
    sidecar = optimizer_path(p)
    optimizer: dict[str, Any] | None = None
    if sidecar.is_file():
        try:
            state = load_optimizer_state(p)
            optimizer = {"path": str(sidecar), "usable": state is not None}
            if state is not None:
                optimizer["optimizer_name"] = state.optimizer_name
        except HypernetworkFileError as exc:
            optimizer = {"path": str(sidecar), "usable": False, "error": str(exc)}
    return {
        "kind": "hypernetwork",
        "path": str(p),
        "name": hypernetwork.name,
        "step": hypernetwork.step,
        "widths": list(hypernetwork.widths),
        "layer_structure": list(hypernetwork.layer_structure),
        "activation": hypernetwork.activation,
        "weight_init": hypernetwork.weight_init,
        "layer_norm": hypernetwork.layer_norm,
        "use_dropout": hypernetwork.use_dropout,
        "dropout_structure": list(hypernetwork.dropout_structure),
        "activate_output": hypernetwork.activate_output,
        "sd_checkpoint": hypernetwork.sd_checkpoint,
        "sd_checkpoint_name": hypernetwork.sd_checkpoint_name,
        "optional_info": hypernetwork.optional_info,
        "parameters": sum(parameter.numel() for parameter in hypernetwork.parameters()),
        "shorthash": shorthash(p),
        "optimizer": optimizer,
    }
