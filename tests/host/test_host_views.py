"""sdconcepts.host.views: the host's objects read as model_sharing_weights' input, for SD 1.x, SD 2.x and SDXL.

The hosts themselves are not here (tests/hosts/ runs them; tests/hosts/forge_views_check.py checks Forge's real classes):
their objects are stood in by what our code reads of them, with the names and layouts Forge and A1111 use. For
Forge, each text encoder is a real CLIPTextModel under ``.transformer`` with the extra ``text_projection`` Linear that
Forge's IntegratedCLIP adds to every CLIP (uninitialised for CLIP-L); only OpenCLIP-G's is real. For A1111's SDXL,
the conditioner appears twice in the state dict (also as ``cond_stage_model``) and its token embeddings and
embedders are wrapped (``.wrapped.``).
"""

from __future__ import annotations

import enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from closeness import assert_outputs_close

from sdconcepts.backends.model_loading import load_model, model_sharing_weights
from sdconcepts.backends.tiny import build_tiny_sdxl
from sdconcepts.checkpoints import files as cf
from sdconcepts.checkpoints.layout import VAE_PREFIX
from sdconcepts.host import views
from sdconcepts.training.training_model import TrainingModel

FORGE_NAMES = {"sd1": ["clip_l"], "sd2": ["clip_h"], "sdxl": ["clip_l", "clip_g"]}


class _Held:
    """A host module as our code reads it: its state dict."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)


def _forge_clip(weights: dict[str, torch.Tensor], config: Any, *, old: bool = False) -> torch.nn.Module:
    """Forge's IntegratedCLIP (the projection an nn.Linear on the transformer); ``old``: ldm_patched's SDClipModel of
    reForge/Forge-Classic (the projection a Parameter beside the transformer, applied as ``pooled @ P``; identity
    where the file has none)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = torch.nn.Module()
    clip.transformer = CLIPTextModel(CLIPTextConfig(**config))
    width = clip.transformer.config.hidden_size
    projection = weights.pop("text_projection.weight", None)
    if old:
        clip.text_projection = torch.nn.Parameter(torch.eye(width) if projection is None else projection.t().clone())
    else:
        clip.transformer.text_projection = torch.nn.Linear(
            width, width if projection is None else projection.shape[0], bias=False)
    weights = cf.match_text_encoder_keys(weights, clip.transformer.state_dict().keys())
    if projection is not None and not old:
        weights["text_projection.weight"] = projection
    missing, unexpected = clip.transformer.load_state_dict(weights, strict=False)
    # Forge loads no projection for CLIP-L (its files have none): that Linear keeps its random initial weights.
    assert not unexpected and set(missing) <= {"text_projection.weight"}, (missing, unexpected)
    return clip


class _ModelType(enum.Enum):
    """ldm_patched's ``model_base.ModelType`` (the members old Forge's UNet names its prediction with)."""

    EPS = 1
    V_PREDICTION = 2
    V_PREDICTION_EDM = 3


def _forge_objects(path: Path, *, old: bool = False) -> Any:
    """forge_objects as Forge builds them from the file: LDM UNet and VAE, CLIPTextModels under clip.cond_stage_model.
    ``old``: as reForge/Forge-Classic (ldm_patched) hold them."""
    state, metadata = cf.read_checkpoint_with_metadata(path)
    configs = cf.infer_configs(state, metadata=metadata)
    parts, _ = cf.split_checkpoint(state, configs)
    joint = torch.nn.Module()
    encoders = [("text_encoder", configs.text_encoder), ("text_encoder_2", configs.text_encoder_2)]
    for name, (part, config) in zip(FORGE_NAMES[configs.family], encoders, strict=False):
        joint.add_module(name, _forge_clip({k: v.clone() for k, v in parts[part].items()}, config, old=old))
    unet = {k[len(cf.UNET_PREFIX):]: v.clone() for k, v in state.items() if k.startswith(cf.UNET_PREFIX)}
    vae = {k[len(VAE_PREFIX):]: v.clone() for k, v in state.items() if k.startswith(VAE_PREFIX)}
    prediction = ({"model_type": _ModelType.EPS} if old
                  else {"predictor": SimpleNamespace(prediction_type="epsilon")})
    return SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=_Held(unet), **prediction)),
        vae=SimpleNamespace(first_stage_model=_Held(vae)),
        clip=SimpleNamespace(cond_stage_model=joint),
    )


@pytest.mark.parametrize("old", [False, True], ids=["forge", "old-forge"])
def test_forge_objects_give_a_view_that_aliases_them_and_encodes_as_the_file(tiny_family_file: tuple[str, Path],
                                                                            old: bool) -> None:
    family, path = tiny_family_file
    objects = _forge_objects(path, old=old)
    state, encoders, got = views.forge_weights(objects)
    assert got == family and encoders is not None and len(encoders) == len(FORGE_NAMES[family])
    _, metadata = cf.read_checkpoint_with_metadata(path)
    view = model_sharing_weights(state, name="forge", text_encoders=encoders, family=got, metadata=metadata)
    for name, module in zip(FORGE_NAMES[family], view.text_encoders, strict=True):
        forge = getattr(objects.clip.cond_stage_model, name)
        held = {t.untyped_storage().data_ptr() for t in forge.state_dict().values()}  # old Forge: + its projection
        assert all(p.untyped_storage().data_ptr() in held for p in module.parameters()), name
    if family == "sdxl":
        held_g = objects.clip.cond_stage_model.clip_g
        projection = held_g.text_projection if old else held_g.transformer.text_projection.weight
        assert view.text_encoder_2.text_projection.weight.data_ptr() == projection.data_ptr()
    reference = load_model(path, device="cpu", dtype=torch.float32)
    prompts = ["a red circle", "a blue square on grass"]
    assert_outputs_close(TrainingModel(view).encode_text(prompts), TrainingModel(reference).encode_text(prompts))
    assert views.forge_prediction(objects) == "epsilon"


def test_old_forge_prediction_types_from_ldm_patched_model_type() -> None:
    def objects(member: _ModelType) -> Any:
        return SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(model_type=member)))

    assert views.forge_prediction(objects(_ModelType.EPS)) == "epsilon"
    assert views.forge_prediction(objects(_ModelType.V_PREDICTION)) == "v_prediction"
    with pytest.raises(views.UnsupportedHostModel, match="predicts V_PREDICTION_EDM; training on it supports"):
        views.forge_prediction(objects(_ModelType.V_PREDICTION_EDM))


@pytest.mark.parametrize(("names", "says"), [
    (["clip_l", "t5xxl"], "Flux/SD3"),
    (["clip_g"], "SDXL refiner"),
    (["clip_l", "clip_g", "t5xxl"], "Flux/SD3"),
    ([], "not SD 1.x, 2.x or XL: text encoders none"),
])
def test_forge_models_other_than_sd_1_2_xl_say_so(names: list[str], says: str) -> None:
    joint = torch.nn.Module()
    for name in names:
        joint.add_module(name, torch.nn.Module())
    with pytest.raises(views.UnsupportedHostModel, match=f"^the web UI's model \\({says}.*supports SD 1.x, SD 2.x and SDXL$"):
        views.forge_family(joint)


def test_a1111_sdxl_is_read_once_under_its_sgm_names() -> None:
    components = build_tiny_sdxl(seed=1)
    state = cf.diffusers_to_ldm(components["unet"].state_dict(), components["vae"].state_dict(),  # type: ignore[attr-defined]
                                components["text_encoder"].state_dict(), "sdxl",  # type: ignore[attr-defined]
                                text_encoder_2_sd=components["text_encoder_2"].state_dict())  # type: ignore[attr-defined]
    hijacked: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        # A1111's hijack: embedders wrapped, token embeddings wrapped; the conditioner again as cond_stage_model.
        key = key.replace("embedders.0.", "embedders.0.wrapped.").replace("embedders.1.", "embedders.1.wrapped.")
        key = key.replace("token_embedding.", "token_embedding.wrapped.")
        hijacked[key] = value
        if key.startswith("conditioner."):
            hijacked["cond_stage_model." + key[len("conditioner."):]] = value
    model = SimpleNamespace(state_dict=lambda: hijacked, conditioner=object())
    got, encoders, family = views.a1111_weights(model)
    assert (encoders, family) == (None, None)
    assert got.keys() == state.keys()
    assert all(got[k] is state[k] for k in state)


def test_the_train_tab_knows_an_sdxl_host_model_once_its_view_exists(tmp_path: Path) -> None:
    """SDXL embeddings are clip_l + clip_g pairs: the Textual Inversion cards must know the host's model is SDXL
    (not only its 2 x width) as soon as our view of it exists, without loading it just to draw the page."""
    from sdconcepts.backends.model_loading import model_from_components
    from sdconcepts.ui.ui_session import HOST_MODEL_LABEL, UiConfig, UiSession

    view = model_from_components(build_tiny_sdxl(seed=1), family="sdxl")
    source = SimpleNamespace(model=None)
    source.load = lambda: setattr(source, "model", view) or view
    source.loaded = lambda: source.model
    source.loaded_width = lambda: None if source.model is None else view.context_width
    (tmp_path / "models").mkdir()
    session = UiSession(UiConfig(models_dir=tmp_path / "models", embeddings_dirs=[tmp_path / "emb"],
                                 hypernetworks_dirs=[tmp_path / "hn"], outputs_dir=tmp_path / "out", device="cpu",
                                 host_model=source))
    assert session.is_sdxl(HOST_MODEL_LABEL) is None  # nothing loaded just to draw the page
    assert session.model(HOST_MODEL_LABEL) is view
    assert session.is_sdxl(HOST_MODEL_LABEL) is True
