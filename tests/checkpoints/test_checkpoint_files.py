"""A1111-style single-file checkpoints: round trips of the tiny SD1/SD2 models, the LDM key layout, detection,
config inference at real SD sizes (meta tensors), and refusal of files that are not checkpoints."""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from closeness import assert_outputs_close, assert_owned_weights  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from sdconcepts.backends.single_file import load_single_file, probe_v_prediction, save_single_file  # noqa: E402
from sdconcepts.backends.tiny import build_tiny_sd1, build_tiny_sd2  # noqa: E402
from sdconcepts.checkpoints import files as cf  # noqa: E402
from sdconcepts.checkpoints.configs import reference_configs  # noqa: E402

CASES = {
    "sd1": ("sd1", "epsilon"),
    "sd2-eps": ("sd2", "epsilon"),
    "sd2-v": ("sd2", "v_prediction"),
}


@pytest.fixture(scope="module")
def models() -> dict[str, dict[str, object]]:
    return {
        "sd1": build_tiny_sd1(seed=0),
        "sd2-eps": build_tiny_sd2(seed=1),
        "sd2-v": build_tiny_sd2(seed=2, prediction_type="v_prediction"),
    }


def _outputs(components: dict[str, object]) -> dict[str, torch.Tensor]:
    """UNet, VAE and text-encoder outputs on fixed inputs."""
    unet, vae, text_encoder = components["unet"], components["vae"], components["text_encoder"]
    g = torch.Generator().manual_seed(123)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 3])
    with torch.no_grad():
        hidden = text_encoder(ids).last_hidden_state  # type: ignore[operator]
        latents = torch.randn(2, 4, 8, 8, generator=g)
        timesteps = torch.tensor([10, 999])
        noise_pred = unet(latents, timesteps, encoder_hidden_states=hidden.expand(2, -1, -1)).sample  # type: ignore[operator]
        image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
        posterior = vae.encode(image).latent_dist  # type: ignore[attr-defined]
        decoded = vae.decode(posterior.mean).sample  # type: ignore[attr-defined]
    return {
        "text": hidden,
        "unet": noise_pred,
        "latent_mean": posterior.mean,
        "latent_logvar": posterior.logvar,
        "decoded": decoded,
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(models, tmp_path: Path, case: str, suffix: str) -> None:
    family, prediction = CASES[case]
    original = models[case]
    path = tmp_path / f"model{suffix}"
    save_single_file(original, path)

    state_dict = cf.read_checkpoint(path)
    assert "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in state_dict
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in state_dict  # upsampler after an UpBlock2D
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state_dict  # upsampler after attention
    assert "first_stage_model.encoder.down.0.block.0.norm1.weight" in state_dict
    assert state_dict["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv in LDM
    if family == "sd1":
        assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state_dict
        assert state_dict["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
        assert state_dict["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 4
    else:
        fused = state_dict["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]
        assert fused.shape == (3 * 40, 40)
        assert "cond_stage_model.model.positional_embedding" in state_dict
        assert "cond_stage_model.model.ln_final.weight" in state_dict
        assert state_dict["model.diffusion_model.input_blocks.1.1.proj_in.weight"].ndim == 2
        # The file holds one more OpenCLIP layer than SD2 runs; ours is all zeros (an identity block).
        assert all(
            not state_dict[k].any()
            for k in state_dict
            if k.startswith("cond_stage_model.model.transformer.resblocks.2.")
        )
        assert not any(k.startswith("cond_stage_model.model.transformer.resblocks.3.") for k in state_dict)
    assert not any(k.startswith(("unet.", "vae.", "text_encoder.", "down_blocks.")) for k in state_dict)
    assert cf.detect_family(state_dict) == family
    assert cf.sidecar_yaml_path(path).is_file() == (prediction == "v_prediction")

    loaded = load_single_file(path)
    assert loaded["family"] == family
    assert loaded["prediction_type"] == prediction
    assert loaded["scheduler"].config.prediction_type == prediction
    assert loaded["tokenizer"].pad_token == ("!" if family == "sd2" else "<|endoftext|>")
    for name in ("unet", "vae", "text_encoder"):
        want, got = original[name].state_dict(), loaded[name].state_dict()  # type: ignore[attr-defined]
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert_owned_weights(loaded[name])
    # Equal weights on other memory: outputs agree to rounding (tests/closeness.py), not bit for bit.
    want_out, got_out = _outputs(original), _outputs(loaded)
    for key in want_out:
        assert_outputs_close(got_out[key], want_out[key])

    # Writing the loaded model again gives the same file content, tensor for tensor.
    again = tmp_path / f"again{suffix}"
    save_single_file(loaded, again)
    second = cf.read_checkpoint(again)
    assert set(second) == set(state_dict)
    assert all(torch.equal(state_dict[k], second[k]) for k in state_dict)


def test_v_prediction_sidecar_is_an_ldm_config(models, tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    save_single_file(models["sd2-v"], path)
    text = cf.sidecar_yaml_path(path).read_text()
    assert 'parameterization: "v"' in text
    assert "FrozenOpenCLIPEmbedder" in text and 'layer: "penultimate"' in text
    assert "num_head_channels: 16" in text and "use_linear_in_transformer: True" in text
    assert "channel_mult: [1, 1, 2, 2]" in text and "context_dim: 40" in text
    # Saving an epsilon model over it removes our sidecar; someone else's contradicting sidecar is an error.
    save_single_file(models["sd2-eps"], path)
    assert not cf.sidecar_yaml_path(path).exists()
    cf.sidecar_yaml_path(path).write_text('model:\n  params:\n    parameterization: "v"\n')
    with pytest.raises(cf.CheckpointError, match="v.yaml"):
        save_single_file(models["sd2-eps"], path)


def test_prediction_type_sources_in_order(models, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_single_file(models["sd2-eps"], path)
    state_dict, metadata = cf.read_checkpoint_with_metadata(path)
    assert cf.detect_prediction_type(path, state_dict, metadata) == "epsilon"
    assert cf.detect_prediction_type(path, {**state_dict, "v_pred": torch.zeros(0)}) == "v_prediction"
    assert cf.explicit_prediction_type(path, state_dict) is None
    assert cf.detect_prediction_type(path, state_dict) == "epsilon"  # nothing stated: epsilon, SD1 and SD2 alike
    yaml = cf.sidecar_yaml_path(path)
    yaml.write_text("model:\n  params:\n    parameterization: 'v'  # v-prediction\n")
    assert cf.detect_prediction_type(path, state_dict, metadata) == "v_prediction"
    loaded = load_single_file(path)
    assert loaded["prediction_type"] == "v_prediction"
    assert loaded["scheduler"].config.prediction_type == "v_prediction"
    yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")  # an A1111 config without it means eps
    assert cf.detect_prediction_type(path, {**state_dict, "v_pred": torch.zeros(0)}) == "epsilon"


def test_shapes_alone_give_sizes_and_metadata_gives_the_rest(models, tmp_path: Path) -> None:
    original = models["sd1"]
    path = tmp_path / "bare.safetensors"
    save_single_file(original, path)
    state_dict, metadata = cf.read_checkpoint_with_metadata(path)
    bare = cf.infer_configs(state_dict)
    unet = original["unet"].config  # type: ignore[attr-defined]
    assert bare.unet["block_out_channels"] == list(unet.block_out_channels)
    assert bare.unet["layers_per_block"] == 2 and bare.unet["cross_attention_dim"] == 48
    assert bare.unet["down_block_types"] == list(unet.down_block_types)
    assert bare.unet["use_linear_projection"] is False
    assert bare.vae["block_out_channels"] == [16, 32, 64] and bare.vae["layers_per_block"] == 1
    assert bare.text_encoder["hidden_size"] == 48 and bare.text_encoder["num_hidden_layers"] == 2
    assert bare.text_encoder["intermediate_size"] == 192 and bare.text_encoder["hidden_act"] == "quick_gelu"
    # Heads and GroupNorm groups are invisible in shapes: family rules guess, our metadata corrects.
    assert bare.text_encoder["num_attention_heads"] == 1 and bare.unet["norm_num_groups"] == 32
    full = cf.infer_configs(state_dict, metadata=metadata)
    assert full.text_encoder["num_attention_heads"] == 4 and full.unet["norm_num_groups"] == 16
    assert full.vae["norm_num_groups"] == 16 and full.unet["attention_head_dim"] == 8

    sd2 = cf.infer_configs(cf.diffusers_to_ldm(*_state_dicts(models["sd2-v"]), "sd2"), prediction_type="v_prediction")
    assert sd2.family == "sd2" and sd2.text_encoder["num_hidden_layers"] == 2  # the file holds 3 resblocks
    assert sd2.unet["use_linear_projection"] is True and sd2.text_encoder["hidden_act"] == "gelu"
    assert sd2.vae["layers_per_block"] == 2 and sd2.scheduler["prediction_type"] == "v_prediction"


def test_sd2_without_stated_prediction_is_probed(models, tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file(cf.diffusers_to_ldm(*_state_dicts(models["sd2-eps"]), "sd2"), str(path))  # no metadata, no sidecar
    assert load_single_file(path, probe_prediction=False)["prediction_type"] == "epsilon"
    loaded = load_single_file(path)  # random weights: the probe runs, its answer means nothing here
    assert loaded["prediction_type"] in cf.PREDICTION_TYPES
    assert isinstance(probe_v_prediction(loaded["unet"]), bool)


def _state_dicts(components: dict[str, object]) -> tuple[dict[str, torch.Tensor], ...]:
    return tuple(components[n].state_dict() for n in ("unet", "vae", "text_encoder"))  # type: ignore[attr-defined]


def test_layout_matches_diffusers_own_converter(models) -> None:
    """diffusers' LDM->diffusers converter reads our LDM files to the same tensors (an independent oracle)."""
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    for case, family in (("sd1", "sd1"), ("sd2-v", "sd2")):
        comp = models[case]
        ldm = cf.diffusers_to_ldm(*_state_dicts(comp), family)
        theirs = {
            "unet": su.convert_ldm_unet_checkpoint(ldm, dict(comp["unet"].config)),  # type: ignore[attr-defined]
            "vae": su.convert_ldm_vae_checkpoint(ldm, dict(comp["vae"].config)),  # type: ignore[attr-defined]
            "text_encoder": su.convert_ldm_clip_checkpoint(ldm)
            if family == "sd1"
            else su.convert_open_clip_checkpoint(comp["text_encoder"], ldm),
        }
        for name, converted in theirs.items():
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
            ours = comp[name].state_dict()  # type: ignore[attr-defined]
            for key, value in ours.items():
                assert torch.equal(value, converted[key].reshape(value.shape)), (case, name, key)


def test_generic_layouts_convert_both_ways() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 48),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
        transformer_layers_per_block=2,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=3,
        norm_num_groups=8,
        latent_channels=3,
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=300, hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2)
    )
    sds = _state_dicts({"unet": unet, "vae": vae, "text_encoder": text})
    for family in ("sd1", "sd2"):
        ldm = cf.diffusers_to_ldm(*sds, family)
        configs = cf.infer_configs(ldm)
        assert configs.unet["block_out_channels"] == [16, 32, 48]
        assert configs.unet["down_block_types"] == list(unet.config.down_block_types)
        assert configs.unet["up_block_types"] == list(unet.config.up_block_types)
        assert configs.unet["transformer_layers_per_block"] == 2 and configs.unet["cross_attention_dim"] == 24
        assert configs.vae["block_out_channels"] == [8, 16] and configs.vae["layers_per_block"] == 3
        assert configs.vae["latent_channels"] == 3 and configs.text_encoder["num_hidden_layers"] == 3
        back = cf.ldm_to_diffusers(ldm, configs)
        for name, original in zip(("unet", "vae", "text_encoder"), sds, strict=True):
            got = cf.match_text_encoder_keys(back[name], original) if name == "text_encoder" else back[name]
            assert set(got) == set(original), name
            assert all(torch.equal(original[k], got[k].reshape(original[k].shape)) for k in original), name


def test_match_text_encoder_keys_both_forms() -> None:
    sd = {
        "text_model.embeddings.position_embedding.weight": torch.zeros(5, 2),
        "text_model.final_layer_norm.weight": torch.ones(2),
    }
    flat = ["embeddings.position_embedding.weight", "final_layer_norm.weight"]
    assert set(cf.match_text_encoder_keys(sd, flat)) == set(flat)
    nested = ["text_model." + k for k in flat] + ["text_model.embeddings.position_ids"]
    out = cf.match_text_encoder_keys(cf.match_text_encoder_keys(sd, flat), nested)
    assert set(out) == set(nested)
    assert out["text_model.embeddings.position_ids"].tolist() == [[0, 1, 2, 3, 4]]
    with_ids = {**sd, "text_model.embeddings.position_ids": torch.arange(5)[None]}
    assert set(cf.match_text_encoder_keys(with_ids, flat)) == set(flat)


# ------------------------------------------------------------------------------------------- real sizes, no memory


def _meta_components(family: str) -> dict[str, object]:
    ref = reference_configs(family)
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(ref["unet"]),
            "vae": AutoencoderKL.from_config(ref["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**ref["text_encoder"])),
        }


@pytest.mark.parametrize("family,prediction", [("sd1", "epsilon"), ("sd2", "v_prediction")])
def test_real_size_configs_are_recovered(family: str, prediction: str) -> None:
    components = _meta_components(family)
    ldm = cf.diffusers_to_ldm(*_state_dicts(components), family)
    assert all(v.is_meta for v in ldm.values())
    expected_shapes = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1) if family == "sd1" else (320, 320),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (
            1280,
            768 if family == "sd1" else 1024,
        ),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    }
    if family == "sd1":
        expected_shapes["cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight"] = (3072, 768)
    else:
        expected_shapes["cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"] = (3072, 1024)
        expected_shapes["cond_stage_model.model.positional_embedding"] = (77, 1024)
    for key, shape in expected_shapes.items():
        assert tuple(ldm[key].shape) == shape, key

    configs = cf.infer_configs(ldm, prediction_type=prediction)
    ref = reference_configs(family)
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        got = getattr(configs, name)
        for key, value in ref[name].items():
            assert got[key] == value, (name, key)
    assert configs.family == family and configs.prediction_type == prediction
    back = cf.ldm_to_diffusers(ldm, configs)
    for name in ("unet", "vae"):
        assert set(back[name]) == set(components[name].state_dict())  # type: ignore[attr-defined]
    assert len(back["text_encoder"]) == len(components["text_encoder"].state_dict())  # type: ignore[attr-defined]

    yaml = cf.ldm_config_yaml(configs)
    assert "model_channels: 320" in yaml and "channel_mult: [1, 2, 4, 4]" in yaml
    assert "attention_resolutions: [4, 2, 1]" in yaml and "ch_mult: [1, 2, 4, 4]" in yaml
    if family == "sd1":
        assert "num_heads: 8" in yaml and "context_dim: 768" in yaml and "parameterization" not in yaml
    else:
        assert "num_head_channels: 64" in yaml and "context_dim: 1024" in yaml and 'parameterization: "v"' in yaml


# ------------------------------------------------------------------------------------------------- bad files


def _fake_unet_only(path: Path) -> None:
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))


class _Hostile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def test_files_that_are_not_checkpoints_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "payload-ran"
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(256))
    (tmp_path / "garbage.ckpt").write_bytes(b"\x80\x02not really a pickle" + os.urandom(64))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Hostile(marker)}, tmp_path / "hostile.ckpt")
    (tmp_path / "hostile-raw.ckpt").write_bytes(pickle.dumps({"state_dict": _Hostile(marker)}, protocol=2))
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(1)}, str(tmp_path / "no-unet.safetensors"))
    _fake_unet_only(tmp_path / "unet-only.safetensors")
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1),
        },
        str(tmp_path / "sdxl.safetensors"),
    )
    (tmp_path / "folder.ckpt").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    expected = {
        "garbage.safetensors": "safetensors",
        "garbage.ckpt": "not a loadable checkpoint",
        "empty.safetensors": "safetensors",
        "empty.ckpt": "empty file",
        "hostile.ckpt": "refused to unpickle",
        "hostile-raw.ckpt": "not a loadable checkpoint",
        "no-unet.safetensors": "no UNet weights",
        "unet-only.safetensors": "unknown model family",
        "sdxl.safetensors": "SDXL",
        "folder.ckpt": "not a file",
        "notes.txt": "unsupported file type",
        "missing.safetensors": "not a file",
    }
    for name, reason in expected.items():
        with pytest.raises(cf.CheckpointError) as info:
            cf.read_checkpoint(tmp_path / name)
        message = str(info.value)
        assert name in message and reason in message, message
        assert "\n" not in message
    assert not marker.exists(), "the pickle payload ran"


def test_lightning_ckpt_with_harmless_globals_loads(models, tmp_path: Path, monkeypatch) -> None:
    """Real .ckpt files pickle Lightning callback classes and numpy scalars beside the weights."""
    np = pytest.importorskip("numpy")
    name = "pytorch_lightning.callbacks.model_checkpoint"
    module = types.ModuleType(name)

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = name
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.setitem(sys.modules, part, module if part == name else types.ModuleType(part))
    weights = cf.diffusers_to_ldm(*_state_dicts(models["sd1"]), "sd1")
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "epoch": 6,
            "global_step": np.int64(470000),
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.1), "dirpath": "/logs"}},
            "state_dict": weights,
        },
        path,
    )
    for part in ("pytorch_lightning", "pytorch_lightning.callbacks", name):
        monkeypatch.delitem(sys.modules, part)
    state_dict = cf.read_checkpoint(path)
    assert set(state_dict) == set(weights)
