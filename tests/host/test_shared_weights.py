"""A model over weights someone else holds (a host's loaded checkpoint): no copy, same outputs, left untouched.

The "host" here is a tiny diffusers model whose components are seen through an LDM-layout state dict, as A1111's
``shared.sd_model.state_dict()`` shows its model; ``model_sharing_weights`` must build modules over that memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdconcepts.backends.half_weights import computes_in_float32
from sdconcepts.backends.model_loading import ModelLoadError, load_model, model_sharing_weights
from sdconcepts.backends.sampling import txt2img
from sdconcepts.checkpoints import files as cf
from sdconcepts.embeddings.files import load_embedding
from sdconcepts.generation import GenerationParams
from sdconcepts.hypernetworks.files import load_hypernetwork
from sdconcepts.training import (
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    create_embedding_file,
    create_hypernetwork_file,
    train_embedding,
    train_hypernetwork,
)
from sdconcepts.training.training_model import TrainingModel


def _ldm_view(host: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The host's weights under LDM keys (renamed, never copied) and the header our single files carry."""
    state = cf.diffusers_to_ldm(host.unet.state_dict(), host.vae.state_dict(), host.text_encoder.state_dict(), "sd1")
    configs = {"unet": dict(host.unet.config), "vae": dict(host.vae.config),
               "text_encoder": host.text_encoder.config.to_dict(), "scheduler": host.scheduler_config}
    return state, cf.make_metadata(configs, family="sd1", prediction_type="epsilon")


def _storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values()}


@pytest.fixture()
def host(tiny_model_dir: Path) -> Any:
    model = load_model(tiny_model_dir, device="cpu")
    # A1111's LDM modules keep torch's default requires_grad=True on every parameter: ours must not change that.
    for module in (model.unet, model.vae, model.text_encoder):
        module.requires_grad_(True)
    return model


def test_shared_model_copies_no_weight_and_generates_as_the_host(host: Any) -> None:
    state, metadata = _ldm_view(host)
    shared = model_sharing_weights(state, name="host-model", short_hash="0123456789", metadata=metadata)
    host_memory = set().union(*(_storages(m) for m in (host.unet, host.vae, host.text_encoder)))
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(shared, part)
        owned = {n for n, p in module.named_parameters() if p.untyped_storage().data_ptr() not in host_memory}
        assert not owned, f"{part} copied {sorted(owned)[:3]}"
        assert not any(p.requires_grad for p in module.parameters())
        assert all(p is not q for p, q in zip(module.parameters(), getattr(host, part).parameters(), strict=False))
    assert all(p.requires_grad for p in host.unet.parameters())  # the host's own flags are left alone
    assert (shared.name, shared.short_hash, shared.family, shared.context_width) == ("host-model", "0123456789", "sd1", 48)
    params = GenerationParams(prompt="a red circle", steps=2, seed=7, width=32, height=32, sampler="Euler")
    mine, theirs = txt2img(shared, params), txt2img(host, params)
    # Same modules' math on the same memory: the very same pixels.
    assert mine.images[0].tobytes() == theirs.images[0].tobytes()
    assert "Model hash: 0123456789" in mine.infotexts[0]


def test_training_on_the_shared_model_leaves_the_host_as_it_was(host: Any, dataset: Path, tmp_path: Path) -> None:
    state, metadata = _ldm_view(host)
    shared = model_sharing_weights(state, name="host-model", short_hash="0123456789", metadata=metadata)
    before = {k: v.detach().clone() for k, v in state.items()}
    params = GenerationParams(prompt="a red circle", steps=2, seed=3, width=32, height=32, sampler="Euler")
    picture = txt2img(host, params).images[0].tobytes()

    rows = TrainingModel(shared).token_rows("circle", 1)
    create_embedding_file(tmp_path / "emb", "hostemb", rows, vectors=1)
    config = EmbeddingTrainingConfig(dataset=str(dataset), template="subject", width=32, height=32,
                                     log_directory=str(tmp_path / "log"), save_every=0, preview_every=2,
                                     max_steps=2, learn_rate="0.05")
    events = list(train_embedding(shared, "hostemb", config, embeddings_dir=tmp_path / "emb"))
    assert events[-1].kind == "finished" and events[-1].preview is None and events[-2].preview is not None
    assert load_embedding(tmp_path / "emb" / "hostemb.pt").sd_checkpoint == "0123456789"

    create_hypernetwork_file(tmp_path / "hn", "hosthn", widths=[48, 32, 64])
    hn_config = HypernetworkTrainingConfig(dataset=str(dataset), template="subject", width=32, height=32,
                                           log_directory=str(tmp_path / "log"), save_every=0, preview_every=0,
                                           max_steps=2, learn_rate="0.05")
    events = list(train_hypernetwork(shared, "hosthn", hn_config, hypernetworks_dir=tmp_path / "hn"))
    assert events[-1].kind == "finished"
    assert load_hypernetwork(tmp_path / "hn" / "hosthn.pt").step == 2

    assert all(torch.equal(before[k], v) for k, v in state.items())
    for module in (host.unet, host.vae, host.text_encoder):
        assert all(p.requires_grad and p.grad is None for p in module.parameters())
    # No hook or patch left in the host's modules: its output is the very same as before training.
    assert txt2img(host, params).images[0].tobytes() == picture


def test_weights_that_are_not_sd_say_so(host: Any) -> None:
    state, metadata = _ldm_view(host)
    del state["model.diffusion_model.input_blocks.1.0.emb_layers.1.bias"]
    with pytest.raises(ModelLoadError, match="^broken: the loaded model's UNet weights do not fit"):
        model_sharing_weights(state, name="broken", metadata=metadata)


# -- inside a host: the Train tab's model choice and the host's reload -------------------------------------------


class _TinyHost:
    """A host source as sdconcepts.host.model.HostModel is, over a tiny model that plays the host's checkpoint."""

    def __init__(self, host: Any) -> None:
        self.host = host
        self.model: Any = None

    def load(self) -> Any:
        if self.model is None:
            state, metadata = _ldm_view(self.host)
            self.model = model_sharing_weights(state, name="host-model", short_hash="0123456789", metadata=metadata)
        return self.model

    def loaded_width(self) -> int | None:
        return None if self.model is None else int(self.model.context_width)

    def loaded(self) -> Any:
        return self.model


def test_inside_a_host_the_train_tab_uses_the_hosts_model_and_tells_it_about_saves(
    host: Any, tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    from sdconcepts.model_shape import shape_of_loaded
    from sdconcepts.ui import train_handlers, train_jobs
    from sdconcepts.ui.ui_session import DEFAULT_MODEL_LABEL, HOST_MODEL_LABEL, XL_MODEL_LABEL, UiConfig, UiSession

    models = tmp_path / "models"
    models.mkdir()
    (models / "other.safetensors").write_bytes(b"\0" * (3 * 2**20))
    source, changed = _TinyHost(host), []
    session = UiSession(UiConfig(models_dir=models, embeddings_dirs=[tmp_path / "emb"],
                                 hypernetworks_dirs=[tmp_path / "hn"], outputs_dir=tmp_path / "out", device="cpu",
                                 host_model=source, files_changed=changed.append))
    assert list(session.model_choices()) == [HOST_MODEL_LABEL, DEFAULT_MODEL_LABEL, XL_MODEL_LABEL,
                                             "other.safetensors (loads a second copy: 3 MB)"]
    assert session.default_choice() == HOST_MODEL_LABEL
    assert session.context_width() is None  # nothing loaded just to draw the page
    # The Create hypernetwork form: A1111's defaults until the host's model is seen, never the embedded toy model's
    # widths (48/32/64; a hypernetwork created with them cannot train on the host's model).
    before = train_handlers.form_defaults(session, HOST_MODEL_LABEL)
    assert (before.widths_ticked, before.size) == (["768", "320", "640", "1280"], 512) and source.model is None
    assert session.model(HOST_MODEL_LABEL) is source.load()
    assert session.context_width() == 48
    after = train_handlers.form_defaults(session, HOST_MODEL_LABEL)
    assert after.widths_ticked == [str(w) for w in shape_of_loaded(source.load()).widths]

    train_handlers.create_embedding(session, HOST_MODEL_LABEL, "hostemb", "circle", 1, False)
    assert changed == ["embedding"]  # the host lists the new file at once
    config, _ = train_handlers.training_config("embedding", "hostemb", {
        "dataset": str(dataset), "learn_rate": "0.01", "batch_size": 1, "gradient_accumulation": 1,
        "log_directory": str(tmp_path / "log"), "template": "subject", "width": 32, "height": 32, "keep_size": False,
        "max_steps": 2, "preview_every": 0, "save_every": 1, "use_alpha_weight": False, "shuffle_tags": False,
        "tag_dropout": 0.0, "latent_sampling": "once", "clip_grad_mode": "disabled", "clip_grad_value": "0.1",
        "save_image_with_embedding": False, "preview_steps": 2, "preview_seed": 1,
    })
    assert config is not None
    jobs = train_jobs.TrainingJobs(session.generate_lock)
    job = train_handlers.start_training(session, jobs, "embedding", HOST_MODEL_LABEL, "hostemb", config)
    assert job.wait(300) and job.error is None, job.error
    # Then the saves at steps 1 and 2: each time the host reloads (once per save).
    assert changed == ["embedding"] * 3
    assert load_embedding(tmp_path / "emb" / "hostemb.pt").sd_checkpoint == "0123456789"


def test_sd2_host_weights_are_shared_too() -> None:
    """SD 2.x as A1111 holds it: OpenCLIP's fused q/k/v ``in_proj_weight`` is split into views, not copies."""
    from sdconcepts.backends.model_loading import model_from_components
    from sdconcepts.backends.tiny import build_tiny_sd2

    reference = model_from_components(build_tiny_sd2(seed=4), name="tiny-sd2", family="sd2")
    state = cf.diffusers_to_ldm(reference.unet.state_dict(), reference.vae.state_dict(),
                                reference.text_encoder.state_dict(), "sd2")
    state = {k: v.clone() for k, v in state.items()}  # the host's own memory, in the layout A1111 holds
    configs = {"unet": dict(reference.unet.config), "vae": dict(reference.vae.config),
               "text_encoder": reference.text_encoder.config.to_dict(), "scheduler": reference.scheduler_config}
    metadata = cf.make_metadata(configs, family="sd2", prediction_type="epsilon")
    shared = model_sharing_weights(state, name="host-sd2", metadata=metadata)
    memory = {t.untyped_storage().data_ptr() for t in state.values()}
    for part in ("unet", "vae", "text_encoder"):
        module = getattr(shared, part)
        assert all(p.untyped_storage().data_ptr() in memory for p in module.parameters()), part
    assert shared.family == "sd2"
    params = GenerationParams(prompt="a red circle", steps=2, seed=7, width=32, height=32, sampler="Euler")
    mine = np.asarray(txt2img(shared, params).images[0], dtype=np.int16)
    theirs = np.asarray(txt2img(reference, params).images[0], dtype=np.int16)
    assert np.abs(mine - theirs).max() <= 1  # same weights; q/k/v read from views of one fused tensor


def test_inference_tensors_as_forge_holds_them_train_without_a_copy(host: Any, dataset: Path, tmp_path: Path) -> None:
    """Forge builds its model under torch.inference_mode(): its weights are inference tensors, which autograd cannot
    save for backward and a Parameter cannot wrap. The view must still alias them and train through them."""
    state, metadata = _ldm_view(host)
    with torch.inference_mode():
        held = {k: v.clone() for k, v in state.items()}
    assert all(v.is_inference() for v in held.values())
    shared = model_sharing_weights(held, name="forge-model", metadata=metadata)
    memory = {t.untyped_storage().data_ptr() for t in held.values()}
    assert all(p.untyped_storage().data_ptr() in memory for p in shared.unet.parameters())
    rows = TrainingModel(shared).token_rows("circle", 1)
    create_embedding_file(tmp_path / "emb", "forgeemb", rows, vectors=1)
    config = EmbeddingTrainingConfig(dataset=str(dataset), template="subject", width=32, height=32,
                                     log_directory=str(tmp_path / "log"), save_every=0, preview_every=0,
                                     max_steps=1, learn_rate="0.05")
    events = list(train_embedding(shared, "forgeemb", config, embeddings_dir=tmp_path / "emb"))
    assert events[-1].kind == "finished", events[-1].message
    assert all(torch.equal(held[k], state[k]) for k in state)


def test_a_text_encoder_held_in_half_precision_on_the_cpu_computes_in_float32(host: Any, dataset: Path,
                                                                          tmp_path: Path) -> None:
    """Forge and its forks hold CLIP's layers in half precision on the CPU (token/position tables in float32) and
    compute them in float32, casting at every call; x86 CPUs have no fast half-precision matrix product (40x slower
    here), so the view does the same (``backends.half_weights``): every tensor stays the host's (nothing converted),
    the conditioning is what float32 layers give with those rounded weights, and an embedding trains through it."""
    state, metadata = _ldm_view(host)
    prefix = "cond_stage_model.transformer."
    for key in [k for k in state if k.startswith(prefix) and "embeddings" not in k]:
        state[key] = state[key].to(torch.bfloat16)
    shared = model_sharing_weights(state, name="mixed", metadata=metadata)
    assert {p.dtype for p in shared.text_encoder.parameters()} == {torch.bfloat16, torch.float32}
    memory = {t.untyped_storage().data_ptr() for t in state.values()}
    assert all(p.untyped_storage().data_ptr() in memory for p in shared.text_encoder.parameters())
    assert computes_in_float32(shared.text_encoder)
    # The same rounded weights held in float32: the same arithmetic, so equal up to kernel-order differences.
    rounded = model_sharing_weights({k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                                    name="rounded", metadata=metadata)
    prompts = ["a red circle", "a blue square on grass"]
    conditioning = TrainingModel(shared).encode_text(prompts)
    assert conditioning.dtype == torch.float32
    torch.testing.assert_close(conditioning, TrainingModel(rounded).encode_text(prompts), rtol=1e-5, atol=1e-5)

    trained = {}
    for name, model in (("half", shared), ("rounded", rounded)):
        rows = TrainingModel(model).token_rows("circle", 1)
        create_embedding_file(tmp_path / name, "emb", rows, vectors=1)
        config = EmbeddingTrainingConfig(dataset=str(dataset), template="subject", width=32, height=32,
                                         log_directory=str(tmp_path / f"log-{name}"), save_every=0, preview_every=0,
                                         max_steps=2, learn_rate="0.05")
        events = list(train_embedding(model, "emb", config, embeddings_dir=tmp_path / name))
        assert events[-1].kind == "finished", events[-1].message
        trained[name] = load_embedding(tmp_path / name / "emb.pt").vectors
    assert not torch.equal(trained["half"], TrainingModel(shared).token_rows("circle", 1))  # it learned
    torch.testing.assert_close(trained["half"], trained["rounded"], rtol=1e-4, atol=1e-4)
