"""Sampling on the diffusers backend: A1111's sampler names as diffusers schedulers, txt2img and img2img with
A1111's seeds, hypernetworks and infotext, and decoding the latents.

This is the only place that drives diffusers schedulers at generation time. Prompt parsing, seeds and infotext are
pure functions in the core; the prompt's conditioning is `prompt_encoder`'s, the model is `model_loading`'s.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdconcepts.backends.compiled import compiled_unet
from sdconcepts.backends.loaded_model import LoadedModel
from sdconcepts.backends.prompt_encoder import PromptEncoder, check_clip_skip, stack_conds
from sdconcepts.backends.sampler_start import (
    ImageSource,
    InitLatents,
    initial_noise,
    keep_denoised,
    noised_init,
    unet_extra_input,
)
from sdconcepts.embeddings.embedding import names_in_prompt
from sdconcepts.generation import GenerationError, GenerationParams, format_infotext
from sdconcepts.hypernetworks.attach import attach_hypernetworks
from sdconcepts.hypernetworks.tags import ResolvedHypernetworks, resolve_hypernetworks
from sdconcepts.img2img import Img2ImgOptions
from sdconcepts.limits import generation_bytes, memory_problem
from sdconcepts.prompts.editing import get_prompt_schedule, text_at_step
from sdconcepts.prompts.network_tags import ExtraNetworkTag, parse_extra_network_tags, without_tags

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


def _out_of_memory_is_one_line(generate: Callable[..., GenerationResult]) -> Callable[..., GenerationResult]:
    """The memory check runs first, but it counts a lower bound: what still fails to allocate is one line, not the
    allocator's traceback (and what was allocated is freed with the frames that held it)."""

    @functools.wraps(generate)
    def wrapper(*args: Any, **kwargs: Any) -> GenerationResult:
        try:
            return generate(*args, **kwargs)
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; so is the CPU allocator's refusal
            text = str(exc)
            if not isinstance(exc, torch.cuda.OutOfMemoryError) and "can't allocate memory" not in text \
                    and "out of memory" not in text.lower():
                raise
            raise GenerationError(
                "out of memory while generating (the device could not allocate what this request needs); "
                "use a smaller size or batch"
            ) from None

    return wrapper


def _hypernet_hashes_field(resolved: ResolvedHypernetworks[Any], hashes: Mapping[str, str]) -> dict[str, str]:
    """``Hypernet hashes: "name: <10 hex>, ..."`` for the hypernetworks used, first use first: the field Forge's
    extension writes (a1111-compat §3.8; shaped like A1111's ``Lora hashes``); names lose ``:`` and ``,``."""
    entries = [f"{name.replace(':', '').replace(',', '')}: {hashes[name][:10]}"
               for name, _file in resolved.used if hashes.get(name)]
    return {"Hypernet hashes": ", ".join(entries)} if entries else {}


def _infotext_prompt(prompt: str, resolved: ResolvedHypernetworks[Any]) -> str:
    """The prompt as the infotext records it: the tags that had no effect (unknown kind or name, a file that did not
    load) dropped, as their warnings say; the hypernetworks used kept as written."""
    used = {name for name, _file in resolved.used}
    return without_tags(prompt, lambda tag: tag.name != "hypernet" or not tag.args or tag.args[0] not in used)


@_out_of_memory_is_one_line
def txt2img(
    model: LoadedModel,
    params: GenerationParams,
    *,
    embeddings: Mapping[str, torch.Tensor] | None = None,
    progress: ProgressCallback | None = None,
    emphasis: str = "Original",
    embedding_hashes: Mapping[str, str] | None = None,
    skipped_embeddings: Mapping[str, str] | None = None,
    hypernetworks: ResolvedHypernetworks[Any] | None = None,
    hypernetwork_hashes: Mapping[str, str] | None = None,
    size_limits: bool = True,
    source: ImageSource | None = None,
    converted_embeddings: Collection[str] = (),
    compile_unet: bool = False,
) -> GenerationResult:
    """Generate ``batch_count`` batches of ``batch_size`` images with A1111's prompt semantics and seeds.

    Extra-network tags (``<hypernet:name:1>``) are removed from the positive prompt before encoding; the infotext
    keeps those of the hypernetworks loaded (as A1111) and drops the tags that had no effect (an unknown kind or name,
    a file that could not be loaded), as the warnings about them say. ``hypernetwork_hashes`` (name -> SHA-256) gives
    the infotext's ``Hypernet hashes`` for the hypernetworks used, as Forge's extension writes it.
    ``embedding_hashes`` (name -> SHA-256) gives the infotext's ``TI hashes`` for the embeddings the prompts use;
    a prompt word naming one of ``skipped_embeddings`` (name -> reason) comes back as a warning.
    ``converted_embeddings``: names of SD 1.x embeddings converted for this SDXL model on the fly
    (``backends.embedding_conversion``); those the prompts use are named in the infotext's ``TI converted``.
    ``hypernetworks`` is what the caller resolved the prompt's tags to (``hypernetworks.tags.resolve_hypernetworks``):
    its chain is applied in prompt order to the UNet's attention key/value inputs during sampling, and detached
    afterwards; its warnings come after img2img's, its error refuses the generation. None: no network is known, so
    every tag is warned about and has no effect.
    ``size_limits`` False lifts the web UI's size and batch limits; a request that cannot fit in the device's
    memory is refused either way, before anything is allocated.
    With ``source`` (an ``ImageSource``; see ``img2img``), sampling starts from an init image instead of noise.
    ``compile_unet`` runs the UNet through torch.compile (``backends.compiled``; eager, with a warning, where the
    machine cannot compile).
    """
    params = params.validated(size_limits=size_limits)
    width, height = _checked_size(model, params)

    # img2img prepares its image before anything costly, so that a bad image or mask fails fast.
    start = source.prepare(model, width=width, height=height, steps=params.steps, seeds=params.image_seeds()) \
        if source is not None else None

    prompt_text, tags = parse_extra_network_tags(params.prompt)  # tags: resolved by the caller (hypernetworks)
    warnings = list(start.warnings) if start is not None else []
    resolved = hypernetworks if hypernetworks is not None else _nothing_known(tags)
    warnings += resolved.warnings
    if resolved.error is not None:
        raise GenerationError(resolved.error)
    chain = resolved.chain
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
    extra = {**(start.infotext if start is not None else {}),
             **_ti_hashes_field(encoder, cond_schedule, uncond_schedule, embedding_hashes or {}),
             **_hypernet_hashes_field(resolved, hypernetwork_hashes or {}),
             **_converted_field(encoder, [*cond_schedule, *uncond_schedule], converted_embeddings)}
    infotext_prompt = _infotext_prompt(params.prompt, resolved)
    skipped = skipped_embeddings or {}
    for name in names_in_prompt(f"{prompt_text}\n{params.negative_prompt}", list(skipped)):
        warnings.append(f"embedding {name!r} was skipped ({skipped[name]}); the prompt reads its name as words")

    images: list[Image.Image] = []
    infotexts: list[str] = []
    all_seeds: list[int] = []
    total = (start.sampled_steps if start is not None else steps) * params.batch_count
    done = 0
    unet = compiled_unet(model.unet) if compile_unet else None
    for batch_seeds in params.image_seeds():

        def step_progress(_i: int) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        # Hooks live only while sampling: the handle detaches them even when sampling raises.
        with attach_hypernetworks(model.unet, chain):
            latents = sample_latents(
                model, sampler=params.sampler, steps=steps, cfg_scale=params.cfg_scale, seeds=batch_seeds,
                width=width, height=height, cond_at=lambda i: text_at_step(cond_schedule, i),
                uncond_at=lambda i: text_at_step(uncond_schedule, i), conds=conds, unconds=unconds, empty=empty,
                on_step=step_progress, init=start.init_latents(batch_seeds) if start is not None else None,
                pooled=pooled, zero_uncond=model.is_sdxl and all(text == "" for _, text in uncond_schedule),
                unet=unet,
            )
        for image, seed in zip(decode_latents(model, latents), batch_seeds, strict=True):
            images.append(start.finish(image) if start is not None else image)
            all_seeds.append(seed)
            infotexts.append(format_infotext(
                params, prompt=infotext_prompt, negative_prompt=params.negative_prompt, seed=seed, width=width,
                height=height, model_name=model.name, model_hash=model.short_hash, extra=extra,
            ))
    if unet is not None and unet.fallback is not None:
        warnings.append(unet.fallback)
    return GenerationResult(images=images, infotexts=infotexts, seeds=all_seeds, params=params, warnings=warnings)


def _checked_size(model: LoadedModel, params: GenerationParams) -> tuple[int, int]:
    """The generation's width and height; refuses a size the model cannot make, a clip skip it does not have, and a
    request whose memory the device cannot hold (before anything is allocated)."""
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
    return width, height


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


def _nothing_known(tags: Sequence[ExtraNetworkTag]) -> ResolvedHypernetworks[Any]:
    """The tags resolved with no hypernetwork known: each one is warned about."""

    def nothing(_name: str) -> None:
        return None

    def unreachable(_file: Any) -> Any:
        raise AssertionError("nothing is known, so nothing is loaded")

    return resolve_hypernetworks(tags, nothing, unreachable)


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


def _converted_field(encoder: PromptEncoder, schedule: Sequence[tuple[int, str]],
                     converted: Collection[str]) -> dict[str, str]:
    """``TI converted: "a, b"``: the embeddings used that were converted from SD 1.x for this SDXL model (ours; an
    A1111 reading the infotext ignores it, and without the conversion it skips those words)."""
    if not converted:
        return {}
    used = [name for name in encoder.embeddings_in(text for _, text in schedule) if name in converted]
    return {"TI converted": ", ".join(f"{name} (SD 1.x -> SDXL)" for name in used)} if used else {}


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
    unet: Callable[..., Any] | None = None,
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
    ``unet``: what runs the UNet (a ``backends.compiled.CompiledUnet``); default the model's own.
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
            if not bool(torch.isfinite(hidden).all()):
                # Said before sampling: after it, "NaN values" would point at the sampler or the weights' precision.
                raise GenerationError(
                    "the prompt's conditioning has NaN or infinite values: an emphasis weight too large for "
                    f"{str(model.dtype).removeprefix('torch.')} (e.g. many nested brackets), or an embedding with "
                    "such values"
                )
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
        noise_pred = (unet or model.unet)(model_input, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
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
