"""SDXL embeddings and hypernetworks created and trained on a tiny SDXL: both halves initialised from the init text
through each encoder's own tokenizer and table, the objective conditioning the UNet as txt2img does (context, pooled
output, size), files in the clip_l/clip_g layout that our loader and diffusers read."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from closeness import assert_outputs_close  # noqa: E402

from sdconcepts.backends.prompt_encoder import PromptEncoder  # noqa: E402
from sdconcepts.embeddings.files import load_embedding  # noqa: E402
from sdconcepts.hypernetworks.attach import attention_layers  # noqa: E402
from sdconcepts.hypernetworks.files import load_hypernetwork  # noqa: E402
from sdconcepts.training import (  # noqa: E402
    EmbeddingTrainingConfig,
    HypernetworkTrainingConfig,
    create_embedding_file,
    create_hypernetwork_file,
    train_embedding,
    train_hypernetwork,
)
from sdconcepts.training.training_model import TrainingModel  # noqa: E402


def test_create_sdxl_embedding_initialises_each_half_from_its_own_table(tiny_sdxl: Any, tmp_path: Path) -> None:
    rows = TrainingModel(tiny_sdxl).token_rows("yellow triangle", 3)
    assert isinstance(rows, dict) and rows["clip_l"].shape == (2, 32) and rows["clip_g"].shape == (2, 48)
    path = create_embedding_file(tmp_path, "tri", rows, vectors=3, width=80)
    emb = load_embedding(path)
    assert emb.is_sdxl and emb.vector_count == 3 and emb.step == 0 and path.suffix == ".safetensors"
    ids = tiny_sdxl.tokenizer("yellow triangle", add_special_tokens=False)["input_ids"]
    table_l = tiny_sdxl.text_encoder.get_input_embeddings().weight
    table_g = tiny_sdxl.text_encoder_2.get_input_embeddings().weight
    # A1111's picks: vec[i] = rows[i * n // vectors] with n = 2 tokens: rows 0, 0, 1.
    for i, row in enumerate((0, 0, 1)):
        assert torch.equal(emb.vectors["clip_l"][i], table_l[ids[row]])  # type: ignore[index]
        assert torch.equal(emb.vectors["clip_g"][i], table_g[ids[row]])  # type: ignore[index]


def test_sdxl_objective_conditions_the_unet_as_txt2img(tiny_sdxl: Any) -> None:
    vectors = torch.randn(2, 80, generator=torch.Generator().manual_seed(1)) * 0.02
    trainable = vectors.clone().requires_grad_(True)
    model = TrainingModel(tiny_sdxl, {"zq": trainable})
    texts = ["a photo of zq", "zq on grass, studio light"]
    context = model.encode_text(texts)
    g = torch.Generator().manual_seed(2)
    noisy, timesteps = torch.randn(2, 4, 4, 4, generator=g), torch.tensor([100, 700])
    ours = model.predict(noisy, timesteps, context)
    encoder = PromptEncoder(tiny_sdxl, {"zq": vectors})
    hidden = torch.stack([encoder.encode(t) for t in texts])
    pooled = torch.stack([encoder.pooled(t) for t in texts])
    time_ids = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)  # 4x4 latents of a 16x16 image, crop (0, 0)
    with torch.no_grad():
        want = tiny_sdxl.unet(noisy, timesteps, encoder_hidden_states=hidden,
                              added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert_outputs_close(ours.detach(), want)
    ours.square().mean().backward()
    assert trainable.grad is not None
    assert trainable.grad[:, :32].abs().sum() > 0 and trainable.grad[:, 32:].abs().sum() > 0  # both halves learn
    # Frozen prompts (hypernetwork training) give the same conditioning.
    frozen = TrainingModel(tiny_sdxl).encode_text(["a photo of cats"])
    trained = TrainingModel(tiny_sdxl, {"unused": trainable.detach()}).encode_text(["a photo of cats"])
    assert_outputs_close(frozen, trained.detach())


def _config(dataset: Path, tmp_path: Path, **fields: Any) -> dict[str, Any]:
    return {"dataset": str(dataset), "template": "subject", "width": 32, "height": 32,
            "log_directory": str(tmp_path / "log"), "save_every": 0, "preview_every": 0, "max_steps": 2, **fields}


def test_sdxl_embedding_training_moves_both_halves_and_saves_the_pair(
    tiny_sdxl: Any, dataset: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "emb"
    rows = TrainingModel(tiny_sdxl).token_rows("triangle", 2)
    path = create_embedding_file(folder, "xltri", rows, vectors=2)
    start = load_embedding(path)
    unet = {k: v.clone() for k, v in tiny_sdxl.unet.state_dict().items()}
    config = EmbeddingTrainingConfig(**_config(dataset, tmp_path, learn_rate="0.01", preview_every=2))
    events = list(train_embedding(tiny_sdxl, "xltri", config, embeddings_dir=folder))
    assert [e.kind for e in events] == ["step", "step", "finished"]
    trained = load_embedding(path)
    assert trained.is_sdxl and trained.step == 2
    for key in ("clip_l", "clip_g"):
        assert (trained.vectors[key] - start.vectors[key]).abs().min() > 0, key  # type: ignore[index]
    assert all(torch.equal(unet[k], v) for k, v in tiny_sdxl.unet.state_dict().items())
    assert Path(f"{path}.optim").is_file()
    # Resuming finds the optimizer state through the SDXL checksum.
    more = list(train_embedding(tiny_sdxl, "xltri", EmbeddingTrainingConfig(**{**config.__dict__, "max_steps": 3}),
                                embeddings_dir=folder))
    assert more[-1].step == 3
    # The file is the pair Forge and kohya read, with the step in the safetensors metadata.
    from safetensors import safe_open

    assert path.suffix == ".safetensors"
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"] and (f.metadata() or {}).get("step") == "3"

def test_sdxl_hypernetwork_training_moves_only_the_hypernetwork(tiny_sdxl: Any, dataset: Path, tmp_path: Path) -> None:
    path = create_hypernetwork_file(tmp_path, "xlstyle", widths=(80, 64, 96), seed=1)
    before = {k: v.clone() for k, v in load_hypernetwork(path).state_dict().items()}
    config = HypernetworkTrainingConfig(**_config(dataset, tmp_path, template="filewords", learn_rate="1e-3"))
    events = list(train_hypernetwork(tiny_sdxl, "xlstyle", config, hypernetworks_dir=tmp_path))
    assert [e.kind for e in events] == ["step", "step", "finished"]
    trained = load_hypernetwork(path)
    assert all(not torch.equal(v, trained.state_dict()[k]) for k, v in before.items())
    assert all(not layer.to_k._forward_pre_hooks for layer in attention_layers(tiny_sdxl.unet))
