"""SDXL single files (SGM layout) and diffusers folders: family detection, config inference, exact round trips."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closeness import assert_outputs_close, assert_owned_weights  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from sdconcepts.backends.single_file import load_single_file, save_single_file  # noqa: E402
from sdconcepts.backends.tiny import build_tiny_sdxl  # noqa: E402
from sdconcepts.checkpoints import files as cf  # noqa: E402
from sdconcepts.checkpoints.configs import reference_configs  # noqa: E402

NAMES = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def sdxl() -> dict[str, object]:
    return build_tiny_sdxl(seed=3)


def _outputs(c: dict[str, object]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 3])
    with torch.no_grad():
        h1 = c["text_encoder"](ids, output_hidden_states=True).hidden_states[-2]  # type: ignore[operator]
        out2 = c["text_encoder_2"](ids, output_hidden_states=True)  # type: ignore[operator]
        context = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        added = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        noise = c["unet"](torch.randn(1, 4, 8, 8, generator=g), 500, encoder_hidden_states=context,  # type: ignore[operator]
                          added_cond_kwargs=added).sample
        decoded = c["vae"].decode(torch.randn(1, 4, 8, 8, generator=g)).sample  # type: ignore[attr-defined]
    return {"context": context, "pooled": out2.text_embeds, "unet": noise, "decoded": decoded}


def test_sdxl_single_file_round_trip_is_exact(sdxl, tmp_path: Path) -> None:
    path = tmp_path / "xl.safetensors"
    save_single_file(sdxl, path)
    sd = cf.read_checkpoint(path)
    assert cf.detect_family(sd) == "sdxl"
    # The SGM layout A1111/Forge read: CLIP-L with HF names, OpenCLIP-G fused q/k/v, x @ P projection, label_emb.
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in sd
    assert sd["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (48, 40)
    assert "conditioner.embedders.1.model.logit_scale" in sd
    assert "model.diffusion_model.label_emb.0.0.weight" in sd
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight" in sd  # depth 2
    assert "model.diffusion_model.middle_block.1.transformer_blocks.1.attn1.to_q.weight" in sd
    assert not any(k.startswith("cond_stage_model.") for k in sd)

    loaded = load_single_file(path)
    assert loaded["family"] == "sdxl"
    assert loaded["tokenizer"].pad_token == "<|endoftext|>" and loaded["tokenizer_2"].pad_token == "!"
    assert loaded["unet"].config.addition_embed_type == "text_time"
    assert list(loaded["unet"].config.transformer_layers_per_block) == [1, 1, 2]
    for name in NAMES:
        want, got = sdxl[name].state_dict(), loaded[name].state_dict()  # type: ignore[attr-defined]
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
        assert_owned_weights(loaded[name])
    want_out, got_out = _outputs(sdxl), _outputs(loaded)
    for key in want_out:
        assert_outputs_close(got_out[key], want_out[key])

    again = tmp_path / "again.safetensors"
    save_single_file(loaded, again)
    second = cf.read_checkpoint(again)
    assert set(second) == set(sd) and all(torch.equal(sd[k], second[k]) for k in sd)


def test_sdxl_layout_matches_diffusers_own_converter(sdxl) -> None:
    """diffusers' SGM->diffusers converters read our SDXL tensors back to the same weights (an independent oracle)."""
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    states = {name: sdxl[name].state_dict() for name in NAMES}  # type: ignore[attr-defined]
    ldm = cf.diffusers_to_ldm(
        states["unet"], states["vae"], states["text_encoder"], "sdxl", text_encoder_2_sd=states["text_encoder_2"]
    )
    theirs = {
        "unet": su.convert_ldm_unet_checkpoint(ldm, dict(sdxl["unet"].config)),  # type: ignore[attr-defined]
        "vae": su.convert_ldm_vae_checkpoint(ldm, dict(sdxl["vae"].config)),  # type: ignore[attr-defined]
        "text_encoder": su.convert_ldm_clip_checkpoint(ldm),
        "text_encoder_2": su.convert_open_clip_checkpoint(
            sdxl["text_encoder_2"], ldm, prefix="conditioner.embedders.1.model."
        ),
    }
    for name, converted in theirs.items():
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        for key, value in states[name].items():
            if key.endswith("position_ids"):
                continue
            assert torch.equal(value, converted[key.removeprefix("text_model.")].reshape(value.shape)), (name, key)


def test_sdxl_real_size_configs_are_recovered() -> None:
    ref = reference_configs("sdxl")
    with torch.device("meta"):
        components = {
            "unet": UNet2DConditionModel(**ref["unet"]),
            "vae": AutoencoderKL(**ref["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**ref["text_encoder"])),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**ref["text_encoder_2"])),
        }
    states = {name: m.state_dict() for name, m in components.items()}
    ldm = cf.diffusers_to_ldm(
        states["unet"], states["vae"], states["text_encoder"], "sdxl", text_encoder_2_sd=states["text_encoder_2"]
    )
    # The shapes of SDXL base 1.0's released file.
    expected = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    }
    for key, shape in expected.items():
        assert tuple(ldm[key].shape) == shape, key
    configs = cf.infer_configs(ldm)
    assert configs.family == "sdxl" and configs.text_encoder_2 is not None
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        got = getattr(configs, name)
        for key, value in ref[name].items():
            assert got[key] == value, (name, key)
    back = cf.ldm_to_diffusers(ldm, configs)
    for name in NAMES:
        want = {k.removeprefix("text_model.") for k in states[name] if not k.endswith("position_ids")}
        assert {k.removeprefix("text_model.") for k in back[name]} == want, name


def test_sdxl_refiner_and_partial_files_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    refiner = tmp_path / "refiner.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
            "conditioner.embedders.0.model.transformer.resblocks.0.ln_1.weight": torch.zeros(1),
        },
        str(refiner),
    )
    with pytest.raises(cf.CheckpointError, match="refiner"):
        cf.read_checkpoint(refiner)


def test_load_model_reads_sdxl_folders_and_files(tiny_sdxl, tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    from sdconcepts.backends.model_loading import load_model

    assert tiny_sdxl.family == "sdxl" and tiny_sdxl.is_sdxl
    assert tiny_sdxl.context_width == 32 + 48
    assert tiny_sdxl.tokenizer.pad_token_id == 49407 and tiny_sdxl.tokenizer_2.pad_token_id == 0
    path = tmp_path / "tiny-xl.safetensors"
    save_single_file(
        {"unet": tiny_sdxl.unet, "vae": tiny_sdxl.vae, "text_encoder": tiny_sdxl.text_encoder,
         "text_encoder_2": tiny_sdxl.text_encoder_2},
        path,
    )
    from_file = load_model(path, device="cpu")
    assert from_file.family == "sdxl" and from_file.name == "tiny-xl"
    assert from_file.context_width == 80
    for a, b in zip(tiny_sdxl.text_encoders, from_file.text_encoders, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
