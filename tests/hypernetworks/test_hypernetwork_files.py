"""Hypernetwork files: round trips, what A1111's safe unpickler would say about our files, the .optim sidecar, errors."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from sdconcepts.hypernetworks.files import (
    HypernetworkFileError,
    OptimizerState,
    describe_hypernetwork,
    load_hypernetwork,
    load_optimizer_state,
    optimizer_path,
    save_hypernetwork,
)
from sdconcepts.hypernetworks.hypernetwork import create_hypernetwork

# ---- A1111's modules/safe.py check, written out from a1111-compat §1.9 (allowed globals and zip entry names) ----
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("__builtin__", "set"),
    ("_codecs", "encode"),
    *{("torch", n) for n in ("FloatStorage", "HalfStorage", "IntStorage", "LongStorage", "DoubleStorage",
                             "ByteStorage", "BFloat16Storage", "float32")},
}
_ZIP_NAMES_V1_9 = re.compile(r"^([^/]+)/((data/\d+)|version|(data\.pkl))$")


class _A1111Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}/{name}' is forbidden")
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        return lambda *args, **kwargs: None  # inert: we only check which globals the file needs

    def persistent_load(self, pid: Any) -> Any:
        assert pid[0] == "storage"
        return None


def a1111_safe_check(path: Path) -> None:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not _ZIP_NAMES_V1_9.match(name):
                    raise ValueError(f"bad file inside {path}: {name}")
        return
    with open(path, "rb") as handle:
        unpickler = _A1111Unpickler(handle)
        for _ in range(5):  # torch's legacy format: five pickles in a row
            unpickler.load()


def test_our_checker_has_teeth(tmp_path: Path) -> None:
    zipped = tmp_path / "modern.pt"
    torch.save({"w": torch.zeros(2)}, zipped)
    with pytest.raises(ValueError, match="bad file inside"):
        a1111_safe_check(zipped)  # modern torch writes .format_version etc.
    hostile = tmp_path / "hostile.pt"
    torch.save({"x": os.system}, hostile, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="forbidden"):
        a1111_safe_check(hostile)


def _assert_same(a: Any, b: Any) -> None:
    assert a.name == b.name and a.step == b.step and a.widths == b.widths
    for field in ("layer_structure", "activation", "weight_init", "layer_norm", "use_dropout", "dropout_structure",
                  "activate_output", "sd_checkpoint", "sd_checkpoint_name", "optional_info"):
        assert getattr(a, field) == getattr(b, field), field
    for (ka, va), (kb, vb) in zip(a.layers.values(), b.layers.values(), strict=True):
        for ma, mb in ((ka, kb), (va, vb)):
            sa, sb = ma.state_dict(), mb.state_dict()
            assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"layer_structure": [1, 1.5, 1.5, 1], "activation": "swish", "layer_norm": True, "use_dropout": True,
         "dropout_structure": [0, 0.05, 0.15, 0], "activate_output": True, "weight_init": "XavierUniform"},
        {"layer_structure": [1, 3, 1], "activation": "prelu", "weight_init": "KaimingUniform"},
    ],
)
def test_round_trip_in_a1111_layout_passes_its_safe_unpickler(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    made = create_hypernetwork("round", (12, 7, 1024 // 64), generator_seed=3, **kwargs)
    made.step, made.sd_checkpoint, made.sd_checkpoint_name, made.optional_info = 42, "0123456789", "model", "note"
    path = save_hypernetwork(made, tmp_path / "sub" / "round.pt")
    a1111_safe_check(path)
    assert [p.name for p in path.parent.iterdir()] == ["round.pt"]  # atomic: no temporary left behind
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {12, 7, 16, "step", "name", "layer_structure", "activation_func", "is_layer_norm",
                        "weight_initialization", "sd_checkpoint", "sd_checkpoint_name", "activate_output",
                        "use_dropout", "dropout_structure", "last_layer_dropout", "optional_info"}
    assert isinstance(raw[12], tuple) and len(raw[12]) == 2
    assert all(k.startswith("linear.") for k in raw[12][0])
    assert raw["last_layer_dropout"] is (made.dropout_structure[-2] != 0)
    back = load_hypernetwork(path)
    _assert_same(made, back)
    x = torch.randn(2, 3, 7)
    from sdconcepts.hypernetworks.hypernetwork import apply_hypernetworks

    for a, b in zip(apply_hypernetworks(x, [(made, 0.8)]), apply_hypernetworks(x, [(back, 0.8)]), strict=True):
        assert torch.equal(a, b)


def test_optimizer_sidecar_shape_and_hash_rule(tmp_path: Path) -> None:
    made = create_hypernetwork("opt", (8,), generator_seed=0)
    optimizer = torch.optim.AdamW(made.parameters(), lr=1e-3)
    made.train()
    loss = sum((m(torch.ones(2, 8)) ** 2).sum() for pair in made.layers.values() for m in pair)
    loss.backward()  # type: ignore[union-attr]
    optimizer.step()
    made.eval()
    path = save_hypernetwork(made, tmp_path / "opt.pt", optimizer=OptimizerState("AdamW", optimizer.state_dict()))
    sidecar = optimizer_path(path)
    assert sidecar.name == "opt.pt.optim"
    a1111_safe_check(sidecar)
    raw = torch.load(sidecar, weights_only=True)
    # A1111's three keys, plus the SHA-256 of the .pt it belongs to (A1111 reads keys by name and ignores it).
    assert set(raw) == {"optimizer_name", "hash", "optimizer_state_dict", "sha256"}
    assert raw["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert raw["hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    state = load_optimizer_state(path)
    assert state is not None and state.optimizer_name == "AdamW"
    fresh = torch.optim.AdamW(load_hypernetwork(path).parameters(), lr=1e-3)
    fresh.load_state_dict(dict(state.state_dict))
    assert fresh.state_dict()["state"][0]["step"] == 1
    # the .pt changes (another save without optimizer state): the sidecar's hash no longer matches, so it is unused
    made.step = 1
    save_hypernetwork(made, path)
    assert sidecar.exists() and load_optimizer_state(path) is None
    assert describe_hypernetwork(path)["optimizer"] == {"path": str(sidecar), "usable": False}
    assert load_optimizer_state(tmp_path / "none.pt") is None


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _valid_dict() -> dict[Any, Any]:
    from sdconcepts.hypernetworks.files import hypernetwork_to_dict

    return hypernetwork_to_dict(create_hypernetwork("v", (8,), generator_seed=0))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(activation_func="nope"), "unsupported activation function 'nope'"),
        (lambda d: d.update(activation_func="threshold"), "cannot be built"),
        (lambda d: d.update(layer_structure=[1, 3, 1]), "does not fit its structure"),
        (lambda d: d.update(is_layer_norm=True), "does not fit its structure"),
        (lambda d: d[8][0].pop("linear.1.bias"), "does not fit its structure"),
        (lambda d: d.update({8: (d[8][0],)}), "pair of state dicts"),
        (lambda d: d.update(layer_structure=[2, 1]), "start and end with 1"),
        (lambda d: d.update(layer_structure="1,2,1"), "not a list of numbers"),
        (lambda d: d.update(dropout_structure=[0, 0.2]), "one entry per"),
        (lambda d: d.pop(8), "no integer width keys"),
        (lambda d: d[8][1]["linear.0.weight"].fill_(float("nan")),
         "the value module for width 8 has NaN or infinite weights"),
    ],
)
def test_bad_files_name_the_file_and_the_reason(tmp_path: Path, mutate: Any, message: str) -> None:
    data = _valid_dict()
    mutate(data)
    path = tmp_path / "bad.pt"
    torch.save(data, path)
    with pytest.raises(HypernetworkFileError, match=re.escape(message)) as info:
        load_hypernetwork(path)
    assert str(path) in str(info.value)


def test_hostile_corrupt_and_non_dict_files(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    data = _valid_dict()
    data["optional_info"] = _Hostile(marker)
    torch.save(data, hostile)
    good = tmp_path / "good.pt"
    torch.save(_valid_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    for path, reason in ((hostile, "system"), (truncated, "not a loadable"), (listing, "expected a dict")):
        with pytest.raises(HypernetworkFileError, match=reason) as info:
            load_hypernetwork(path)
        assert path.name in str(info.value)
    assert not marker.exists()
    assert load_hypernetwork(good).widths == (8,)


def test_any_integer_width_and_fp16_tensors_load(tmp_path: Path) -> None:
    data = _valid_dict()
    module_sd = {k: v.half() for k, v in data.pop(8)[0].items()}
    width = 8
    data[width] = [module_sd, dict(module_sd)]
    made = create_hypernetwork("odd", (13,), generator_seed=1)
    from sdconcepts.hypernetworks.files import hypernetwork_to_dict

    data[13] = hypernetwork_to_dict(made)[13]
    path = tmp_path / "mixed.pt"
    torch.save(data, path)
    loaded = load_hypernetwork(path)
    assert loaded.widths == (8, 13)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_describe_reports_metadata(tmp_path: Path) -> None:
    made = create_hypernetwork("desc", (8, 4), activation="relu", generator_seed=0)
    path = save_hypernetwork(made, tmp_path / "desc-file.pt")
    info = describe_hypernetwork(path)
    assert info["kind"] == "hypernetwork" and info["name"] == "desc" and info["widths"] == [8, 4]
    assert info["activation"] == "relu" and info["layer_structure"] == [1.0, 2.0, 1.0]
    assert info["parameters"] == sum(p.numel() for p in made.parameters())
    assert info["shorthash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert info["optimizer"] is None
    import json

    json.dumps(info)


def test_find_hypernetworks_follows_a1111_listing(tmp_path: Path) -> None:
    from sdconcepts.hypernetworks.library import find_hypernetworks

    for relative in ("b/Style.pt", "a/Style.pt", "A/deep/other.pt", "None.pt", "notes.txt", "x.safetensors"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = find_hypernetworks([tmp_path, tmp_path / "missing"])
    # keyed by stem; sorted by lower-cased path, so b/Style.pt (later) wins over a/Style.pt; None.pt never listed
    assert found == {"other": tmp_path / "A/deep/other.pt", "Style": tmp_path / "b/Style.pt"}


def test_context_dtype_is_kept() -> None:
    from sdconcepts.hypernetworks.hypernetwork import apply_hypernetworks

    made = create_hypernetwork("half", (8,), weight_init="XavierNormal", generator_seed=0)
    context = torch.randn(1, 3, 8).half()
    key, value = apply_hypernetworks(context, [(made, 1.0)])
    assert key.dtype == value.dtype == torch.float16
    assert torch.equal(key, made.layers[8][0](context.float()).half())


def test_folder_load_skips_bad_files_and_loads_the_rest(tmp_path: Path) -> None:
    from sdconcepts.hypernetworks.files import hypernetwork_to_dict
    from sdconcepts.hypernetworks.library import load_hypernetwork_folders

    save_hypernetwork(create_hypernetwork("inner", (8,), generator_seed=0), tmp_path / "deep" / "good.pt")
    data = hypernetwork_to_dict(create_hypernetwork("x", (8,), generator_seed=0))
    data["activation_func"] = "sparkle"
    torch.save(data, tmp_path / "unknown.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02garbage")
    marker = tmp_path / "pwned"
    torch.save({8: _Hostile(marker)}, tmp_path / "hostile.pt")
    loaded, skipped = load_hypernetwork_folders([tmp_path])
    assert list(loaded) == ["good"] and loaded["good"].name == "inner"
    assert set(skipped) == {"unknown", "corrupt", "hostile"}
    for name, reason in skipped.items():
        assert f"{name}.pt" in reason and "\n" not in reason
    assert "sparkle" in skipped["unknown"] and not marker.exists()
