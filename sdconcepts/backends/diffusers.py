"""The diffusers backend: load a model, encode prompts with A1111's semantics, and sample txt2img images.

This is the only place that drives diffusers models and schedulers at generation time. Prompt parsing, seeds and
infotext are pure functions in the core; here they meet the UNet, the VAE and the CLIP text encoder.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from sdconcepts.backends.loaded_model import LoadedModel
from sdconcepts.backends.sampler_start import (
    ImageSource,
    InitLatents,
    initial_noise,
    keep_denoised,
    noised_init,
    unet_extra_input,
)
from sdconcepts.backends.tokenizer import BOS_ID, EOS_ID, load_clip_tokenizer
from sdconcepts.checkpoints.files import CheckpointError, match_text_encoder_keys
from sdconcepts.embeddings.embedding import names_in_prompt
from sdconcepts.generation import GenerationError, GenerationParams, format_infotext
from sdconcepts.hypernetworks.attach import attach_hypernetworks, attention_widths
from sdconcepts.hypernetworks.hypernetwork import Hypernetwork, width_mismatch
from sdconcepts.img2img import Img2ImgOptions
from sdconcepts.limits import generation_bytes, memory_problem
from sdconcepts.model_shape import EMBEDDED_MODEL_DIR, EMBEDDED_XL_MODEL_DIR
from sdconcepts.prompts import (
    EmbeddingEntry,
    PromptChunk,
    build_chunks,
    build_embedding_index,
    get_prompt_schedule,
    hypernetwork_tags,
    parse_extra_network_tags,
    text_at_step,
)
from sdconcepts.safe_load import load_torch_file

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = EMBEDDED_MODEL_DIR  # the embedded SD-1 toy-world model
XL_MODEL_DIR = EMBEDDED_XL_MODEL_DIR  # the embedded SDXL-layout toy-world model
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")

# A1111 sampler name -> (diffusers scheduler class name, extra config). A1111 runs these through k-diffusion, whose
# sigmas come from timesteps spaced evenly from the last training step down to 0: diffusers' "linspace" spacing.
# Karras variants use Karras sigmas. DDIM and PLMS keep the model's own ("leading", offset 1) spacing, as A1111 does.
_KDIFFUSION = {"timestep_spacing": "linspace"}
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", _KDIFFUSION),
    "Euler": ("EulerDiscreteScheduler", _KDIFFUSION),
    "Heun": ("HeunDiscreteScheduler", _KDIFFUSION),
    "DPM2": ("KDPM2DiscreteScheduler", _KDIFFUSION),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", _KDIFFUSION),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", _KDIFFUSION),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {**_KDIFFUSION, "use_karras_sigmas": True}),
    "DDIM": ("DDIMScheduler", {}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}

ProgressCallback = Callable[[int, int], None]


class ModelLoadError(ValueError):
    """A model path that cannot be loaded; the message names the path and the reason."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_model(
    ref: str | Path | None = None, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LoadedModel:
    """Load the embedded default model (``ref`` None), a diffusers folder, or an A1111 single-file checkpoint."""
    dev = torch.device(device) if device is not None else default_device()
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    path = Path(ref) if ref is not None else DEFAULT_MODEL_DIR
    if not path.exists():
        if ref is None:
            raise ModelLoadError(f"{path}: the embedded default model is missing from this install")
        raise ModelLoadError(f"{path}: no such file or folder")
    if path.is_dir():
        model = _load_diffusers_folder(path, dt)
    elif path.suffix.lower() in CHECKPOINT_SUFFIXES:
        model = _load_single_file(path, dt)
    else:
        raise ModelLoadError(f"{path}: not a model (expected a diffusers folder or {', '.join(CHECKPOINT_SUFFIXES)})")
    return _finish(model, dev)


def model_from_components(components: Mapping[str, Any], *, name: str = "in-memory", family: str = "sd1") -> LoadedModel:
    """Wrap already-built components (tests, training previews) as a LoadedModel without touching disk."""
    scheduler = components["scheduler"]
    unet = components["unet"]
    if components.get("text_encoder_2") is not None:
        family = "sdxl"
    model = LoadedModel(
        unet=unet,
        vae=components["vae"],
        text_encoder=components["text_encoder"],
        tokenizer=components.get("tokenizer") or load_clip_tokenizer(family),
        scheduler_config=dict(scheduler.config),
        family=family,
        prediction_type=str(scheduler.config.get("prediction_type", "epsilon")),
        name=name,
        path=None,
        device=unet.device,
        dtype=unet.dtype,
        text_encoder_2=components.get("text_encoder_2"),
        tokenizer_2=components.get("tokenizer_2") or (load_clip_tokenizer("sd2") if family == "sdxl" else None),
    )
    return model


def model_sharing_weights(
    state_dict: dict[str, torch.Tensor],
    *,
    name: str,
    short_hash: str | None = None,
    prediction_type: str | None = None,
    metadata: dict[str, str] | None = None,
    text_encoders: Sequence[Mapping[str, torch.Tensor]] | None = None,
    family: str | None = None,
) -> LoadedModel:
    """A LoadedModel over the tensors of an LDM-layout state dict held by someone else (a host's loaded model).

    No tensor is copied or converted (see ``single_file.components_sharing_weights``; one exception: an SDXL VAE held
    in float16 gets a float32 copy, as ``_upcast_vae`` does for files, logged): generation and training run
    on the same memory as the owner's model and never write it; the LoadedModel stays valid while the owner keeps
    those tensors where they are. ``short_hash`` is the owner's model hash (infotexts, files' ``sd_checkpoint``);
    ``metadata`` as in a single file's header (our configs, for shapes the tensors cannot tell). ``text_encoders``
    (transformers layout) and ``family``: text encoders given apart from the LDM-layout UNet and VAE, as Forge holds
    them (see ``components_sharing_weights``).
    """
    from sdconcepts.backends.single_file import components_sharing_weights  # lazy: diffusers

    try:
        parts = components_sharing_weights(state_dict, text_encoders=text_encoders, family=family,
                                           prediction_type=prediction_type, metadata=metadata)
    except CheckpointError as exc:
        raise ModelLoadError(f"{name}: {exc}") from exc
    weight = next(parts["unet"].parameters())
    model = LoadedModel(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler_config=parts["scheduler_config"],
        family=parts["family"],
        prediction_type=parts["prediction_type"],
        name=name,
        path=None,
        device=weight.device,
        dtype=weight.dtype,
        _hash=short_hash,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
    )
    if _upcast_vae(model, next(model.vae.parameters()).dtype):
        # Our own float32 copy of the VAE only: .to() gives our Parameters new tensors, the owner's stay as they are.
        model.vae.to(torch.float32)
        size = sum(p.numel() * 4 for p in model.vae.parameters())
        log.info("%s: the SDXL VAE held in float16 runs in float32 here (%.0f MB copied)", name, size / 2**20)
    return model


def _finish(model: LoadedModel, device: torch.device) -> LoadedModel:
    for module in (model.unet, model.vae, *model.text_encoders):
        dtype = model.dtype
        if module is model.vae and _upcast_vae(model):
            dtype = torch.float32
        if module.device != device or module.dtype != dtype:
            module.to(device=device, dtype=dtype)
        module.eval()
        module.requires_grad_(False)
    model.device = device
    return model


def _upcast_vae(model: LoadedModel, dtype: torch.dtype | None = None) -> bool:
    """SDXL's VAE overflows in float16 (NaN images): it runs in float32, as diffusers does for a VAE whose config says
    ``force_upcast`` and as A1111 ends up doing (it reverts the VAE to 32-bit floats at the first NaN). ``dtype``:
    the VAE's own when it differs from the model's (a host may hold them apart)."""
    return (model.is_sdxl and (dtype or model.dtype) == torch.float16
            and bool(getattr(model.vae.config, "force_upcast", False)))


def _load_diffusers_folder(path: Path, dtype: torch.dtype) -> LoadedModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # lazy: diffusers
    from transformers import CLIPTokenizer  # lazy: transformers' models

    from sdconcepts.backends.single_file import own_weights  # lazy: diffusers

    missing = [sub for sub in ("unet", "vae", "text_encoder", "scheduler") if not (path / sub).is_dir()]
    if missing:
        raise ModelLoadError(f"{path}: not a diffusers model folder (missing {', '.join(missing)})")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        text_encoder = _load_text_encoder(path / "text_encoder", dtype)
        sdxl = (path / "text_encoder_2").is_dir()
        text_encoder_2 = _load_text_encoder(path / "text_encoder_2", dtype, projection=True) if sdxl else None
        own_weights(unet)
        own_weights(vae)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: cannot load the diffusers folder: {_first_line(exc)}") from exc
    scheduler_config = _read_json(path / "scheduler" / "scheduler_config.json")
    family = "sdxl" if sdxl else "sd2" if text_encoder.config.hidden_act == "gelu" else "sd1"
    if (path / "tokenizer" / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    else:
        tokenizer = load_clip_tokenizer("sd1" if sdxl else family)
    tokenizer_2 = None
    if sdxl and (path / "tokenizer_2" / "vocab.json").is_file():
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    elif sdxl:
        tokenizer_2 = load_clip_tokenizer("sd2")
    return LoadedModel(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler_config=scheduler_config,
        family=family,
        prediction_type=str(scheduler_config.get("prediction_type", "epsilon")),
        name={DEFAULT_MODEL_DIR: "toyworld", XL_MODEL_DIR: "toyworld-xl"}.get(path, path.name),
        path=path,
        device=torch.device("cpu"),
        dtype=dtype,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )


def _load_text_encoder(folder: Path, dtype: torch.dtype, *, projection: bool = False) -> Any:
    """Load a CLIP text encoder whatever transformers version wrote it.

    transformers 5 saves the weights without the ``text_model.`` level that transformers 4 expects, and
    ``from_pretrained`` in 4.x would silently leave such weights random; so the keys are matched here.
    """
    from transformers import (  # lazy: transformers' models
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
    )


    config = CLIPTextConfig.from_pretrained(folder, local_files_only=True)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)
    weights = sorted(folder.glob("*.safetensors"))
    if weights:
        state: dict[str, torch.Tensor] = {}
        for file in weights:
            state.update(load_file(str(file)))
    else:
        bins = sorted(folder.glob("*.bin"))
        if not bins:
            raise OSError(f"no weights in {folder}")
        loaded = load_torch_file(bins[0])
        if not isinstance(loaded, dict):
            raise ValueError(f"{bins[0]}: not a state dict")
        state = loaded
    state = match_text_encoder_keys(state, model.state_dict().keys())
    model.load_state_dict(state, strict=True)
    return model.to(dtype)


def _load_single_file(path: Path, dtype: torch.dtype) -> LoadedModel:
    from sdconcepts.backends.single_file import load_single_file  # lazy: diffusers

    try:
        parts = load_single_file(path, dtype=dtype)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    scheduler = parts["scheduler"]
    return LoadedModel(
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        scheduler_config=dict(scheduler.config),
        family=parts["family"],
        prediction_type=parts["prediction_type"],
        name=path.stem,
        path=path,
        device=torch.device("cpu"),
        dtype=dtype,
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON: {_first_line(exc)}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Prompt encoding (A1111 semantics: 75-token chunks, emphasis, embeddings placed at their token positions)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PromptEncoder:
    """Encodes prompt texts to conditioning tensors ``[77 * chunks, width]`` the way A1111 does.

    ``embeddings`` maps an embedding's prompt word to its vectors ``[n, width]``; matching is case-insensitive as in
    A1111 (names are looked up through their token ids, and the CLIP tokenizer lower-cases).

    SDXL (A1111's sd_hijack_clip/sd_hijack_open_clip on sgm's conditioner): both encoders read the same chunks;
    each gives its penultimate hidden states (no final layer norm; clip skip does not apply, as A1111's default),
    emphasis is applied to each encoder's output on its own, and the two are concatenated (CLIP-L first). An SDXL
    embedding's vectors are ``clip_l`` and ``clip_g`` concatenated the same way, so each encoder places its own
    half. `pooled` gives OpenCLIP-G's projected end-token output of the first chunk, before emphasis.
    """

    model: LoadedModel
    embeddings: Mapping[str, torch.Tensor] = field(default_factory=dict)
    clip_skip: int = 1
    emphasis: str = "Original"
    comma_backtrack: int = 20
    _cache: dict[tuple[str, ...], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_clip_skip(self.model, self.clip_skip)
        self._pooled: dict[str, torch.Tensor] = {}
        tok = self.model.tokenizer
        self._comma = int(tok.convert_tokens_to_ids(",</w>"))
        entries: list[EmbeddingEntry] = []
        self._vectors: dict[str, torch.Tensor] = {}
        names = list(self.embeddings)
        for name, ids in zip(names, self.tokenize(names), strict=True):
            vectors = self.embeddings[name]
            if vectors.ndim != 2 or not ids:
                continue
            entries.append(EmbeddingEntry(ids=tuple(ids), name=name, vectors=int(vectors.shape[0])))
            self._vectors[name] = vectors
        self._index = build_embedding_index(entries)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        ids: list[list[int]] = self.model.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]
        return ids

    def chunks(self, text: str) -> tuple[list[PromptChunk], int]:
        return build_chunks(
            text,
            self.tokenize,
            bos=BOS_ID,
            eos=EOS_ID,
            comma=self._comma,
            embeddings=self._index,
            comma_backtrack=self.comma_backtrack,
            emphasis=self.emphasis != "None",
        )

    def encode(self, text: str) -> torch.Tensor:
        """``text`` encoded on its own, as A1111 encodes a prompt without prompt editing."""
        return self.encode_group([text])[text]

    def encode_group(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Encode the texts A1111 encodes as one batch: one prompt's variants under prompt editing and alternation.

        A1111 runs a batch chunk by chunk and applies "Original" emphasis to each chunk's batch tensor as a whole:
        the mean it restores is that of chunk ``i`` over every variant, not of one text. A variant with fewer chunks
        than the longest gets empty chunks (which that restoring scales too), so every text comes back
        ``[77 * longest, width]``. A text's encoding may therefore depend on the other texts of its group.
        """
        group = tuple(dict.fromkeys(texts))
        cached = self._cache.get(group)
        if cached is None:
            cached = self._encode_group(group)
            self._cache[group] = cached
        return cached

    def encode_many(self, texts: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each text encoded on its own (no shared emphasis: for texts that A1111 encodes in separate batches)."""
        return {text: self.encode(text) for text in dict.fromkeys(texts)}

    def embeddings_in(self, texts: Iterable[str]) -> list[str]:
        """Names of the embeddings that ``texts`` place, in A1111's order: chunk by chunk across the texts."""
        per_text = [self.chunks(text)[0] for text in dict.fromkeys(texts)]
        names: dict[str, None] = {}
        for i in range(max((len(chunks) for chunks in per_text), default=0)):
            for chunks in per_text:
                for fix in chunks[i].fixes if i < len(chunks) else ():
                    names[fix.name] = None
        return list(names)

    def pooled(self, text: str) -> torch.Tensor:
        """SDXL's pooled text output ``[projection]`` for ``text`` (OpenCLIP-G, first chunk)."""
        if not self.model.is_sdxl:
            raise ValueError("only SDXL models have a pooled text output")
        if text not in self._pooled:
            self.encode(text)
        return self._pooled[text]

    @torch.no_grad()
    def _encode_group(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        z, pooled = self._encode_chunks([self._training_chunks(text) for text in texts])
        if pooled is not None:
            for text, row in zip(texts, pooled, strict=True):
                self._pooled.setdefault(text, row)
        return dict(zip(texts, z, strict=True))

    def _encode_chunks(self, per_text: Sequence[Sequence[PromptChunk]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[len(per_text), 77 * chunks, width]`` for texts already split into chunks, encoded as one A1111 batch
        (shorter texts padded with empty chunks, emphasis per chunk over the batch), under the caller's autograd mode;
        and SDXL's pooled output of each text's first chunk (None for SD 1/2)."""
        longest = max(len(chunks) for chunks in per_text)
        empty = self._training_chunks("")[0]
        flat = [c for chunks in per_text for c in (*chunks, *[empty] * (longest - len(chunks)))]
        outputs, pooled = self._run_encoders(flat)
        if pooled is not None:
            pooled = pooled[::longest]
        count = len(per_text)
        parts = [z.reshape(count, longest, 77, -1) for z in outputs]
        if self.emphasis in ("Original", "No norm") and any(m != 1 for c in flat for m in c.multipliers):
            multipliers = torch.tensor([c.multipliers for c in flat], dtype=parts[0].dtype, device=parts[0].device)
            multipliers = multipliers.reshape(count, longest, -1)
            normalize = self.emphasis == "Original"
            # Chunk by chunk, each chunk's batch as one tensor (A1111's process_tokens for chunk i of every text).
            parts = [
                torch.stack([apply_emphasis(z[:, i], multipliers[:, i], normalize=normalize) for i in range(longest)],
                            dim=1)
                for z in parts
            ]
        z = torch.cat(parts, dim=-1)
        return z.reshape(count, -1, z.shape[-1]), pooled

    def _run(self, chunks: Sequence[PromptChunk]) -> torch.Tensor:
        """The text encoders' output ``[chunks, 77, width]`` with each chunk's embedding vectors placed."""
        return torch.cat(self._run_encoders(chunks)[0], dim=-1)

    def _run_encoders(self, chunks: Sequence[PromptChunk]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Each text encoder's output ``[chunks, 77, width_i]`` with the embedding vectors placed, and SDXL's
        pooled output ``[chunks, projection]`` (None for SD 1/2)."""
        model = self.model
        tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long)
        if not model.is_sdxl:
            if model.family == "sd2":
                _pad_after_end(tokens, model.tokenizer.pad_token_id)
            fixes = [[(f.offset, self._vectors[f.name]) for f in c.fixes] for c in chunks]
            with _embedding_fixes(model.text_encoder, fixes):
                return [_run_text_encoder(model.text_encoder, tokens.to(model.device), self.clip_skip)], None
        parts: list[torch.Tensor] = []
        pooled = None
        start = 0
        for encoder, tokenizer in ((model.text_encoder, model.tokenizer), (model.text_encoder_2, model.tokenizer_2)):
            width = int(encoder.config.hidden_size)
            ids = tokens.clone()
            if tokenizer.pad_token_id != EOS_ID:
                _pad_after_end(ids, tokenizer.pad_token_id)
            fixes = [[(f.offset, self._vectors[f.name][:, start : start + width]) for f in c.fixes] for c in chunks]
            with _embedding_fixes(encoder, fixes):
                out = encoder(input_ids=ids.to(model.device), output_hidden_states=True)
            parts.append(out.hidden_states[-2])
            if encoder is model.text_encoder_2:
                pooled = out.text_embeds
            start += width
        return parts, pooled

    def encode_batch(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode ``texts`` as one batch ``[len(texts), 77 * chunks, width]`` under the caller's autograd mode.

        For training: nothing is cached but the token chunks, so gradients reach the embedding vectors this encoder
        was given, placed as ``encode`` places them, in one text-encoder call. Texts with fewer chunks get empty
        chunks appended, as A1111's text encoder does for a batch (A1111's training encodes a batch's texts together),
        and emphasis is applied per chunk over the batch as there.
        """
        return self.encode_batch_with_pooled(texts)[0]

    def encode_batch_with_pooled(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`encode_batch`, and SDXL's pooled output ``[len(texts), projection]`` of each text's first chunk (None for
        SD 1/2), both under the caller's autograd mode."""
        return self._encode_chunks([self._training_chunks(text) for text in texts])

    def _training_chunks(self, text: str) -> list[PromptChunk]:
        cache: dict[str, list[PromptChunk]] = self.__dict__.setdefault("_chunk_cache", {})
        if text not in cache:
            cache[text] = self.chunks(text)[0]
        return cache[text]


def _pad_after_end(tokens: torch.Tensor, pad_id: int) -> None:
    """OpenCLIP pads with its own id (0) after the first end-of-text token (A1111 does the same), in place."""
    for row in tokens:
        eos_at = (row == EOS_ID).nonzero()
        if len(eos_at):
            row[int(eos_at[0]) + 1 :] = pad_id


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """A1111's emphasis: hidden states scaled by their token's multiplier (``normalize``: the mean restored)."""
    if bool((multipliers == 1).all()):
        return z
    weighted = z * multipliers.unsqueeze(-1)
    if normalize:
        # A1111 "Original": restore the mean of the whole chunk tensor after weighting.
        original_mean, new_mean = z.mean(), weighted.mean()
        if _meaningful_mean(original_mean, z) and _meaningful_mean(new_mean, weighted):
            weighted = weighted * (original_mean / new_mean)
    return weighted


def _meaningful_mean(mean: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `mean` is more than the rounding noise of averaging `values`.

    A real text encoder's final layer norm has a bias, so a chunk's mean is a sizeable fraction of its magnitude
    (SD 1.5: about a tenth). With a zero bias (a freshly initialised model) every token vector is zero-mean, the chunk
    mean is rounding noise of order sqrt(n)·eps·mean|v|, and A1111's ratio of two such means is arbitrary: 0/0 (NaN)
    on some CPUs, a huge factor on others. Below that noise level the rescale is skipped; above it the arithmetic is
    A1111's exactly.
    """
    noise = values.numel() ** 0.5 * torch.finfo(values.dtype).eps * float(values.abs().mean())
    return bool(torch.isfinite(mean)) and abs(float(mean)) > noise


def _text_model(text_encoder: Any) -> Any:
    """transformers 5 flattened CLIPTextModel; transformers 4 keeps the layers under ``.text_model``."""
    return getattr(text_encoder, "text_model", text_encoder)


def check_clip_skip(model: LoadedModel, clip_skip: int) -> None:
    """Refuse a clip skip the model's text encoder has no layer for (it would index past its hidden states)."""
    layers = model.text_encoder_layers
    if not 1 <= clip_skip <= layers:
        raise GenerationError(
            f"clip skip must be between 1 and {layers} for this model (its text encoder has {layers} layers), "
            f"got {clip_skip}"
        )


def _run_text_encoder(text_encoder: Any, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip <= 1:
        return text_encoder(input_ids=tokens).last_hidden_state
    out = text_encoder(input_ids=tokens, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    return _text_model(text_encoder).final_layer_norm(hidden)


@contextmanager
def _embedding_fixes(text_encoder: Any, fixes: Sequence[Sequence[tuple[int, torch.Tensor]]]) -> Any:
    """Overwrite the token-embedding rows of each placed embedding (A1111's EmbeddingsWithFixes)."""
    if not any(fixes):
        yield
        return
    layer = text_encoder.get_input_embeddings()

    def hook(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        rows = []
        for chunk_fixes, row in zip(fixes, output, strict=True):
            for offset, vectors in chunk_fixes:
                count = min(row.shape[0] - offset - 1, vectors.shape[0])
                row = torch.cat(
                    [row[: offset + 1], vectors[:count].to(row), row[offset + 1 + count :]]
                )
            rows.append(row)
        return torch.stack(rows)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def stack_conds(conds: Sequence[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """Batch conditionings of different chunk counts by appending empty-prompt chunks (A1111's pad_cond)."""
    longest = max(c.shape[0] for c in conds)
    padded = []
    for c in conds:
        missing = (longest - c.shape[0]) // empty.shape[0]
        padded.append(torch.cat([c, empty.repeat(missing, 1)]) if missing else c)
    return torch.stack(padded)


# ---------------------------------------------------------------------------------------------------------------
# txt2img
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    params: GenerationParams
    warnings: list[str]


def make_scheduler(model: LoadedModel, sampler: str) -> Any:
    import diffusers  # lazy: diffusers

    if sampler not in SCHEDULERS:
        raise GenerationError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SCHEDULERS)}")
    class_name, extra = SCHEDULERS[sampler]
    cls = getattr(diffusers, class_name)
    config = {k: v for k, v in model.scheduler_config.items() if not k.startswith("_")}
    config["prediction_type"] = model.prediction_type
    return cls.from_config(config, **extra)


def txt2img(
    model: LoadedModel,
    params: GenerationParams,
    *,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    progress: ProgressCallback | None = None,
    emphasis: str = "Original",
    known_networks: Mapping[str, Iterable[str]] | None = None,
    embedding_hashes: Mapping[str, str] | None = None,
    skipped_embeddings: Mapping[str, str] | None = None,
    hypernetworks: Mapping[str, Hypernetwork] | None = None,
    size_limits: bool = True,
    source: ImageSource | None = None,
) -> GenerationResult:
    """Generate ``batch_count`` batches of ``batch_size`` images with A1111's prompt semantics and seeds.

    Extra-network tags (``<hypernet:name:1>``) are removed from the positive prompt before encoding and kept in the
    infotext; a tag naming a network that ``known_networks`` does not list comes back as a warning.
    ``embedding_hashes`` (name -> SHA-256) gives the infotext's ``TI hashes`` for the embeddings the prompts use;
    a prompt word naming one of ``skipped_embeddings`` (name -> reason) comes back as a warning.
    ``hypernetworks`` (name -> loaded) are known hypernet names; the prompt's ``<hypernet:name:strength>`` tags are
    applied in prompt order to the UNet's attention key/value inputs during sampling, and detached afterwards.
    ``size_limits`` False lifts the web UI's size and batch limits; a request that cannot fit in the device's
    memory is refused either way, before anything is allocated.
    With ``source`` (an ``ImageSource``; see ``img2img``), sampling starts from an init image instead of noise.
    """
    params = params.validated(size_limits=size_limits)
    width = params.width or model.default_size
    height = params.height or model.default_size
    multiple = model.size_multiple
    if width % multiple or height % multiple or width <= 0 or height <= 0:
        raise GenerationError(f"width and height must be positive multiples of {multiple} for this model")
    check_clip_skip(model, params.clip_skip)
    on_device, on_host = generation_memory(model, params, width, height)
    problem = memory_problem(on_device, model.device, f"generating {params.batch_size} image(s) of {width}x{height} "
                             "per batch", host_bytes=on_host)
    if problem:
        raise GenerationError(problem)

    # img2img prepares its image before anything costly, so that a bad image or mask fails fast.
    start = source.prepare(model, width=width, height=height, steps=params.steps, seeds=params.image_seeds()) \
        if source is not None else None

    prompt_text, tags = parse_extra_network_tags(params.prompt)
    warnings = list(start.warnings) if start is not None else []
    networks = {kind: set(names) for kind, names in (known_networks or {}).items()}
    available = dict(hypernetworks or {})
    networks.setdefault("hypernet", set()).update(available)
    for tag in tags:
        name = tag.args[0] if tag.args else ""
        if name not in networks.get(tag.name, ()):
            warnings.append(f"unknown {tag.name} {name!r}: the tag was removed from the prompt and has no effect")
        elif tag.name == "hypernet" and name not in available:
            warnings.append(f"hypernet {name!r} could not be loaded: the tag was removed from the prompt and has no effect")
    try:
        chain = [(available[t.name], t.strength) for t in hypernetwork_tags(tags) if t.name in available]
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    if chain:
        widths = attention_widths(model.unet)
        for used in hypernetwork_tags(tags):
            mismatch = width_mismatch(used.name, available[used.name], widths) if used.name in available else None
            if mismatch is not None and mismatch not in warnings:
                warnings.append(mismatch)
    for hypernetwork, _strength in chain:
        hypernetwork.to(model.device)  # as A1111, the modules run on the model's device and stay float32

    encoder = PromptEncoder(model, embeddings or {}, clip_skip=params.clip_skip, emphasis=emphasis)
    steps = params.steps
    cond_schedule = get_prompt_schedule(prompt_text, steps)
    uncond_schedule = get_prompt_schedule(params.negative_prompt, steps)
    try:
        # As A1111: the prompt's variants are one batch, the negative prompt's another, the padding chunk its own.
        conds = encoder.encode_group([t for _, t in cond_schedule])
        unconds = encoder.encode_group([t for _, t in uncond_schedule])
        empty = encoder.encode("")
    except ValueError as exc:  # a prompt the encoder cannot take (an embedding longer than a chunk): one line
        raise GenerationError(str(exc)) from None
    pooled = {text: encoder.pooled(text) for text in {*conds, *unconds, ""}} if model.is_sdxl else None
    extra = _ti_hashes_field(encoder, cond_schedule, uncond_schedule, embedding_hashes or {})
    if start is not None:
        extra = {**start.infotext, **extra}
    skipped = skipped_embeddings or {}
    for name in names_in_prompt(f"{prompt_text}\n{params.negative_prompt}", list(skipped)):
        warnings.append(f"embedding {name!r} was skipped ({skipped[name]}); the prompt reads its name as words")

    images: list[Image.Image] = []
    infotexts: list[str] = []
    all_seeds: list[int] = []
    total = (start.sampled_steps if start is not None else steps) * params.batch_count
    done = 0
    for batch_seeds in params.image_seeds():

        def step_progress(_i: int) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        # Hooks live only while sampling: the handle detaches them even when sampling raises.
        with attach_hypernetworks(model.unet, chain):
            latents = sample_latents(
                model,
                sampler=params.sampler,
                steps=steps,
                cfg_scale=params.cfg_scale,
                seeds=batch_seeds,
                width=width,
                height=height,
                cond_at=lambda i: text_at_step(cond_schedule, i),
                uncond_at=lambda i: text_at_step(uncond_schedule, i),
                conds=conds,
                unconds=unconds,
                empty=empty,
                on_step=step_progress,
                init=start.init_latents(batch_seeds) if start is not None else None,
                pooled=pooled,
                zero_uncond=model.is_sdxl and all(text == "" for _, text in uncond_schedule),
            )
        for image, seed in zip(decode_latents(model, latents), batch_seeds, strict=True):
            images.append(start.finish(image) if start is not None else image)
            all_seeds.append(seed)
            infotexts.append(
                format_infotext(
                    params,
                    prompt=params.prompt,
                    negative_prompt=params.negative_prompt,
                    seed=seed,
                    width=width,
                    height=height,
                    model_name=model.name,
                    model_hash=model.short_hash,
                    extra=extra,
                )
            )
    return GenerationResult(images=images, infotexts=infotexts, seeds=all_seeds, params=params, warnings=warnings)


def img2img(
    model: LoadedModel,
    params: GenerationParams,
    image: Image.Image,
    *,
    mask: Image.Image | None = None,
    options: Img2ImgOptions | None = None,
    **txt2img_options: Any,
) -> GenerationResult:
    """img2img from ``image`` (inpainting where ``mask`` is white), with txt2img's prompts, seeds and samplers.

    ``txt2img_options`` are txt2img's keyword arguments (embeddings, hypernetworks, progress, size_limits, ...).

    ``params.width``/``height`` are the processing size (default: the model's); the result has that size, except
    "Only masked" inpainting, which pastes its result back into an image of the init image's size.
    """
    if not isinstance(image, Image.Image):
        raise GenerationError("img2img needs an init image")
    source = ImageSource(image, mask, options or Img2ImgOptions())
    return txt2img(model, params, source=source, **txt2img_options)


def generation_memory(model: LoadedModel, params: GenerationParams, width: int, height: int) -> tuple[int, int]:
    """Lower bounds of the bytes ``txt2img`` needs at its peak on the model's device and on the CPU
    (``sdconcepts.limits.generation_bytes``)."""
    return generation_bytes(
        batch=params.batch_size,
        images_total=params.batch_size * params.batch_count,
        width=width,
        height=height,
        latent_scale=model.vae_scale_factor,
        latent_channels=int(model.unet.config.in_channels),
        unet_channels=int(model.unet.config.block_out_channels[0]),
        vae_channels=int(model.vae.config.block_out_channels[0]),
        dtype_bytes=torch.finfo(model.dtype).bits // 8,
        guided=params.cfg_scale != 1.0,
        attention_heads=_materialized_attention_heads(model.unet),
    )


def _materialized_attention_heads(unet: Any) -> int:
    """The first level's head count when the UNet's attention computes the whole score map (diffusers' classic
    ``AttnProcessor``), else 0: the scaled-dot-product processors leave that to kernels that may work in tiles."""
    processors = getattr(unet, "attn_processors", {})
    if not any(type(p).__name__ == "AttnProcessor" for p in processors.values()):
        return 0
    heads = unet.config.attention_head_dim  # diffusers' name for SD's head count
    return int(heads[0] if isinstance(heads, (list, tuple)) else heads)


def _ti_hashes_field(
    encoder: PromptEncoder,
    cond_schedule: Sequence[tuple[int, str]],
    uncond_schedule: Sequence[tuple[int, str]],
    hashes: Mapping[str, str],
) -> dict[str, str]:
    """A1111's ``TI hashes: "name: <12 hex>, ..."`` for the embeddings used; names lose ``:`` and ``,``.

    A1111 encodes the negative prompt first and each later encoding puts its hashes in front, so the positive
    prompt's embeddings come first; one used in both prompts is listed twice, as A1111 does.
    """
    entries = []
    for schedule in (cond_schedule, uncond_schedule):
        for name in encoder.embeddings_in(text for _, text in schedule):
            if hashes.get(name):
                entries.append(f"{name.replace(':', '').replace(',', '')}: {hashes[name][:12]}")
    return {"TI hashes": ", ".join(entries)} if entries else {}


@torch.no_grad()
def sample_latents(
    model: LoadedModel,
    *,
    sampler: str,
    steps: int,
    cfg_scale: float,
    seeds: Sequence[int],
    width: int,
    height: int,
    cond_at: Callable[[int], str],
    uncond_at: Callable[[int], str],
    conds: Mapping[str, torch.Tensor],
    empty: torch.Tensor,
    unconds: Mapping[str, torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    init: InitLatents | None = None,
    pooled: Mapping[str, torch.Tensor] | None = None,
    zero_uncond: bool = False,
) -> torch.Tensor:
    """Run the sampler loop; the conditioning may change per step (prompt editing and alternation).

    ``conds`` maps the prompt's texts to their conditioning, ``unconds`` the negative prompt's (default ``conds``):
    two mappings, since a text's encoding depends on the batch A1111 encodes it in.

    SDXL takes ``pooled`` (text -> pooled output) and A1111's size conditioning: original and target size the
    image's, crop (0, 0) (A1111's defaults). ``zero_uncond``: A1111 on SDXL zeroes the whole text conditioning of
    a negative prompt that is empty at every step (sd_models_xl.get_learned_conditioning's
    ``force_zero_embeddings``), the hidden states and the pooled output alike; batch padding still uses ``empty``.

    With ``init`` (img2img), the last steps of the ``steps`` schedule run from the init latents noised to the first
    one's level; for inpainting, the kept region of each step's denoised estimate is the init latents' (A1111).
    """
    scheduler = make_scheduler(model, sampler)
    scheduler.set_timesteps(steps, device=model.device)
    # Each image's generator goes on to give the sampler's own noise (ancestral samplers), as A1111's ImageRNG does.
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = initial_noise(model, generators, width, height)
    timesteps = scheduler.timesteps
    if init is None:
        latents = noise * scheduler.init_noise_sigma
    else:
        latents, timesteps = noised_init(scheduler, init, noise)
    image_conditioning = unet_extra_input(model, init, len(seeds), width, height)
    batch = len(seeds)
    guided = cfg_scale != 1.0
    context_cache: dict[tuple[str, str], tuple[torch.Tensor, dict[str, torch.Tensor] | None]] = {}
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=model.dtype, device=model.device)

    def context(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        key = (cond_at(i), uncond_at(i))
        if key not in context_cache:
            uncond = (conds if unconds is None else unconds)[key[1]]
            if zero_uncond:
                uncond = torch.zeros_like(uncond)
            rows = ([uncond] * batch if guided else []) + [conds[key[0]]] * batch
            hidden = stack_conds(rows, empty).to(model.device, model.dtype)
            added = None
            if pooled is not None:
                pooled_uncond = torch.zeros_like(pooled[key[1]]) if zero_uncond else pooled[key[1]]
                pooled_rows = ([pooled_uncond] * batch if guided else []) + [pooled[key[0]]] * batch
                added = {
                    "text_embeds": torch.stack(pooled_rows).to(model.device, model.dtype),
                    "time_ids": time_ids.expand(len(pooled_rows), -1),
                }
            context_cache[key] = (hidden, added)
        return context_cache[key]

    accepts_generator = "generator" in _step_parameters(scheduler)
    if image_conditioning is not None and guided:
        image_conditioning = torch.cat([image_conditioning, image_conditioning])
    for i, t in enumerate(timesteps):
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if image_conditioning is not None:
            model_input = torch.cat([model_input, image_conditioning], dim=1)
        hidden, added = context(i)
        noise_pred = model.unet(model_input, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        if guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + cfg_scale * (cond - uncond)
        if init is not None and init.keep is not None:
            noise_pred = keep_denoised(scheduler, t, latents, noise_pred, init, model.prediction_type)
        kwargs = {"generator": generators} if accepts_generator else {}
        latents = scheduler.step(noise_pred, t, latents, **kwargs).prev_sample
        if on_step is not None:
            on_step(i)
    if init is not None and init.keep is not None:
        latents = init.latents * init.keep + latents * (1 - init.keep)
    return latents


_STEP_PARAMS: dict[type, frozenset[str]] = {}


def _step_parameters(scheduler: Any) -> frozenset[str]:
    cls = type(scheduler)
    if cls not in _STEP_PARAMS:
        _STEP_PARAMS[cls] = frozenset(inspect.signature(scheduler.step).parameters)
    return _STEP_PARAMS[cls]


@torch.no_grad()
def decode_latents(model: LoadedModel, latents: torch.Tensor) -> list[Image.Image]:
    if not bool(torch.isfinite(latents).all()):
        # A1111 raises NansException here too: an all-black image would hide the failure.
        raise GenerationError("the model produced NaN or infinite values; try another sampler, or float32 weights")
    scaling = float(getattr(model.vae.config, "scaling_factor", 0.18215))
    pixels = model.vae.decode((latents / scaling).to(model.vae.dtype)).sample
    pixels = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
