"""A model over a host's weights for every family: SD 1.x, SD 2.x and SDXL, as A1111 and as Forge hold them.

A1111 holds the whole model in LDM/SGM layout (``shared.sd_model.state_dict()``: OpenCLIP's fused q/k/v). Forge holds
its UNet and VAE in LDM layout but its text encoders as transformers CLIPTextModels (q/k/v apart; SDXL's OpenCLIP-G
with its ``text_projection`` as an nn.Linear weight), converted from the file when it loaded. Both are built here
from one tiny checkpoint file, in memory the "host" owns; the view over them must copy nothing, encode, predict and
generate as the same file loaded by our single-file loader, and leave the host's tensors and flags as they were
after training on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from closeness import assert_images_close, assert_outputs_close, pixels

from sdconcepts.backends.model_loading import load_model, model_from_components, model_sharing_weights
from sdconcepts.backends.sampling import txt2img
from sdconcepts.backends.single_file import save_single_file
from sdconcepts.backends.tiny import build_tiny_sdxl
from sdconcepts.checkpoints import files as cf
from sdconcepts.checkpoints.layout import VAE_PREFIX
from sdconcepts.generation import GenerationParams
from sdconcepts.training import EmbeddingTrainingConfig, create_embedding_file, train_embedding
from sdconcepts.training.training_model import TrainingModel


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    # The host's own memory; its LDM modules keep torch's default requires_grad=True on every weight.
    copy = tensor.clone()
    return copy.requires_grad_(True) if copy.is_floating_point() else copy


def _a1111_held(path: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    return {k: _owned(v) for k, v in cf.read_checkpoint(path).items()}, None


def _forge_held(path: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """UNet and VAE under LDM keys, text encoders converted to transformers' layout into memory of their own (Forge's
    loader slices q/k/v and transposes SDXL's projection into its CLIPTextModels, then they are separate tensors)."""
    state, metadata = cf.read_checkpoint_with_metadata(path)
    parts, _ = cf.split_checkpoint(state, cf.infer_configs(state, metadata=metadata))
    held = {k: _owned(v) for k, v in state.items() if k.startswith((cf.UNET_PREFIX, VAE_PREFIX))}
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if "text_encoder_2" in parts else [])
    return held, [{k: _owned(v.contiguous()) for k, v in te.items()} for te in encoders]


def _view(family: str, path: Path, held: dict[str, torch.Tensor], encoders: Any) -> Any:
    _, metadata = cf.read_checkpoint_with_metadata(path)  # the tiny model's heads: what shapes cannot tell
    return model_sharing_weights(held, name="host", short_hash="0123456789", metadata=metadata,
                                 text_encoders=encoders, family=family if encoders is not None else None)


def _given(held: dict[str, torch.Tensor], encoders: Any) -> list[torch.Tensor]:
    return [*held.values(), *(v for te in encoders or [] for v in te.values())]


def _modules(model: Any) -> dict[str, torch.nn.Module]:
    parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    if model.text_encoder_2 is not None:
        parts["text_encoder_2"] = model.text_encoder_2
    return parts


@pytest.mark.parametrize("holder", [_a1111_held, _forge_held], ids=["a1111", "forge"])
def test_the_view_copies_nothing_and_computes_as_the_file(tiny_family_file: tuple[str, Path], holder: Any) -> None:
    family, path = tiny_family_file
    held, encoders = holder(path)
    view = _view(family, path, held, encoders)
    reference = load_model(path, device="cpu", dtype=torch.float32)
    assert (view.family, view.is_sdxl, view.context_width) == (family, family == "sdxl", reference.context_width)

    storages = {}
    for tensor in _given(held, encoders):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    for part, module in _modules(view).items():
        for name, param in module.named_parameters():
            start = param.untyped_storage().data_ptr()
            assert start in storages and param.data_ptr() < start + storages[start], f"{part}.{name} was copied"
            assert not param.requires_grad

    mine, theirs = TrainingModel(view), TrainingModel(reference)
    prompts = ["a red circle", "a (blue:1.3) square, on grass"]
    context = mine.encode_text(prompts)
    assert_outputs_close(context, theirs.encode_text(prompts))
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn((2, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([10, 700])
    with torch.no_grad():
        assert_outputs_close(mine.predict(noisy, timesteps, context), theirs.predict(noisy, timesteps, context))
    params = GenerationParams(prompt="a red circle", negative_prompt="blurry", steps=3, seed=7, width=32, height=32,
                              sampler="Euler")
    assert_images_close(pixels(txt2img(view, params)), pixels(txt2img(reference, params)))


@pytest.mark.parametrize("holder", [_a1111_held, _forge_held], ids=["a1111", "forge"])
def test_training_on_the_view_leaves_the_hosts_tensors_and_flags(
    tiny_family_file: tuple[str, Path], holder: Any, dataset: Path, tmp_path: Path
) -> None:
    family, path = tiny_family_file
    held, encoders = holder(path)
    given = _given(held, encoders)
    before = [(t.detach().clone(), t.requires_grad) for t in given]
    view = _view(family, path, held, encoders)

    create_embedding_file(tmp_path / "emb", "hostemb", TrainingModel(view).token_rows("circle", 1), vectors=1)
    config = EmbeddingTrainingConfig(dataset=str(dataset), template="subject", width=32, height=32,
                                     log_directory=str(tmp_path / "log"), save_every=0, preview_every=0,
                                     max_steps=2, learn_rate="0.05")
    events = list(train_embedding(view, "hostemb", config, embeddings_dir=tmp_path / "emb"))
    assert events[-1].kind == "finished", events[-1].message
    for tensor, (value, flag) in zip(given, before, strict=True):
        assert torch.equal(tensor.detach(), value) and tensor.requires_grad == flag and tensor.grad is None


def test_one_encoder_in_transformers_layout_needs_the_family(tiny_family_file: tuple[str, Path]) -> None:
    family, path = tiny_family_file
    held, encoders = _forge_held(path)
    if family == "sdxl":
        with pytest.raises(ValueError, match="has 2 text encoder"):
            model_sharing_weights(held, name="host", text_encoders=encoders[:1], family="sdxl")
        return
    with pytest.raises(ValueError, match=r"^host: the model family \(sd1 or sd2\) is needed"):
        model_sharing_weights(held, name="host", text_encoders=encoders)


def test_an_sdxl_view_from_a1111_slices_and_transposes_in_place() -> None:
    """A1111's SDXL OpenCLIP-G: q/k/v are row slices of in_proj_weight, the projection a transposed view of
    ``text_projection`` ([width, projection], applied as x @ P): no copy of either."""
    components = build_tiny_sdxl(seed=2)
    reference = model_from_components(components, family="sdxl")
    state = cf.diffusers_to_ldm(reference.unet.state_dict(), reference.vae.state_dict(),
                                reference.text_encoder.state_dict(), "sdxl",
                                text_encoder_2_sd=reference.text_encoder_2.state_dict())
    state = {k: v.clone() for k, v in state.items()}
    configs = {"unet": dict(reference.unet.config), "vae": dict(reference.vae.config),
               "text_encoder": reference.text_encoder.config.to_dict(),
               "text_encoder_2": reference.text_encoder_2.config.to_dict(), "scheduler": reference.scheduler_config}
    view = model_sharing_weights(state, name="xl", metadata=cf.make_metadata(configs, family="sdxl",
                                                                             prediction_type="epsilon"))
    fused = state["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"]
    attention = view.text_encoder_2.text_model.encoder.layers[0].self_attn
    width = fused.shape[1]
    for i, proj in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        assert proj.weight.data_ptr() == fused.data_ptr() + i * width * width * fused.element_size()
    projection = state["conditioner.embedders.1.model.text_projection"]
    assert view.text_encoder_2.text_projection.weight.data_ptr() == projection.data_ptr()
    assert torch.equal(view.text_encoder_2.text_projection.weight, projection.t())


def test_an_sdxl_vae_held_in_float16_runs_in_float32_on_a_copy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SDXL's VAE overflows in float16 (NaN previews): as for a file (and as A1111 reverts its own), the view's VAE
    is a float32 copy, logged; everything else stays the host's float16 memory, and the host's VAE is untouched."""
    path = tmp_path / "xl.safetensors"
    save_single_file({**build_tiny_sdxl(seed=3), "family": "sdxl"}, path)
    state, metadata = cf.read_checkpoint_with_metadata(path)
    held = {k: v.to(torch.float16) if v.is_floating_point() else v.clone() for k, v in state.items()}
    before = {k: v.clone() for k, v in held.items() if k.startswith(VAE_PREFIX)}
    with caplog.at_level("INFO", logger="sdconcepts.backends.model_loading"):
        view = model_sharing_weights(held, name="xl16", metadata=metadata)
    assert {p.dtype for p in view.vae.parameters()} == {torch.float32}
    assert "the SDXL VAE held in float16 runs in float32 here" in caplog.text
    assert {p.dtype for p in view.unet.parameters()} == {torch.float16}
    memory = {t.untyped_storage().data_ptr() for t in held.values()}
    assert all(p.untyped_storage().data_ptr() in memory for p in view.unet.parameters())
    assert all(held[k].dtype == torch.float16 and torch.equal(held[k], v) for k, v in before.items())
