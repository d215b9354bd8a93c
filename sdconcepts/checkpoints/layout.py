"""The LDM key layouts every Stable Diffusion family shares, and renaming them to and from diffusers' names.

The UNet (``model.diffusion_model.*``) and VAE (``first_stage_model.*``) layouts are generic over widths, block and
layer counts (SD 1/2 and SDXL alike); the OpenCLIP text tower map (fused ``in_proj`` q/k/v) serves SD2's and SDXL's
second encoder. Family-specific maps: `sdconcepts.checkpoints.sd` (SD 1.x/2.x) and `sdconcepts.checkpoints.sdxl`.
Pure core: torch only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_MODEL = "text_model."


class CheckpointError(ValueError):
    """A file that is not a usable SD 1.x/2.x/XL single-file checkpoint; the message is one line."""


# ---------------------------------------------------------------------------------------------------- key layouts


@dataclass(frozen=True)
class UNetLayout:
    blocks: int
    layers: int  # resnets per down block; up blocks have one more
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool


@dataclass(frozen=True)
class VAELayout:
    blocks: int
    layers: int


# (ldm module, diffusers module, renames of the leading part of what follows the module, ldm name first)
ModuleMap = tuple[str, str, tuple[tuple[str, str], ...]]

_UNET_RESNET = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
_VAE_RESNET = (("nin_shortcut", "conv_shortcut"),)
_VAE_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_VAE_ATTENTION_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def key_indices(keys: Iterable[str], prefix: str) -> set[int]:
    found = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return found


def ldm_unet_layout(sd: Mapping[str, Tensor]) -> UNetLayout:
    p = UNET_PREFIX
    inputs = key_indices(sd, p + "input_blocks.")
    if not inputs:
        raise CheckpointError(f"no UNet input blocks ({p}input_blocks.*)")
    downs = sorted(i for i in inputs if f"{p}input_blocks.{i}.0.op.weight" in sd)
    layers = downs[0] - 1 if downs else max(inputs)
    blocks = len(downs) + 1
    expected_downs = [(i + 1) * (layers + 1) for i in range(blocks - 1)]
    if layers < 1 or downs != expected_downs or max(inputs) != blocks * (layers + 1) - 1:
        raise CheckpointError("UNet input blocks are not in the SD layout (resnets, then one downsampler per block)")
    step = layers + 1
    return UNetLayout(
        blocks=blocks,
        layers=layers,
        down_attention=tuple(f"{p}input_blocks.{1 + i * step}.1.proj_in.weight" in sd for i in range(blocks)),
        up_attention=tuple(f"{p}output_blocks.{i * step}.1.proj_in.weight" in sd for i in range(blocks)),
        mid_attention=f"{p}middle_block.1.proj_in.weight" in sd,
    )


def diffusers_unet_layout(sd: Mapping[str, Tensor]) -> UNetLayout:
    blocks = len(key_indices(sd, "down_blocks."))
    layers = len(key_indices(sd, "down_blocks.0.resnets."))
    if blocks < 1 or layers < 1:
        raise CheckpointError("UNet state dict has no down_blocks.*.resnets.*")
    return UNetLayout(
        blocks=blocks,
        layers=layers,
        down_attention=tuple(f"down_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(blocks)),
        up_attention=tuple(f"up_blocks.{i}.attentions.0.proj_in.weight" in sd for i in range(blocks)),
        mid_attention="mid_block.attentions.0.proj_in.weight" in sd,
    )


def unet_modules(layout: UNetLayout) -> list[ModuleMap]:
    step = layout.layers + 1
    mods: list[ModuleMap] = [
        ("time_embed.0", "time_embedding.linear_1", ()),
        ("time_embed.2", "time_embedding.linear_2", ()),
        ("input_blocks.0.0", "conv_in", ()),
        ("out.0", "conv_norm_out", ()),
        ("out.2", "conv_out", ()),
        ("middle_block.0", "mid_block.resnets.0", _UNET_RESNET),
    ]
    if layout.mid_attention:
        mods += [
            ("middle_block.1", "mid_block.attentions.0", ()),
            ("middle_block.2", "mid_block.resnets.1", _UNET_RESNET),
        ]
    else:
        mods.append(("middle_block.1", "mid_block.resnets.1", _UNET_RESNET))
    for i in range(layout.blocks):
        for j in range(layout.layers):
            idx = 1 + i * step + j
            mods.append((f"input_blocks.{idx}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if layout.down_attention[i]:
                mods.append((f"input_blocks.{idx}.1", f"down_blocks.{i}.attentions.{j}", ()))
        if i < layout.blocks - 1:
            mods.append((f"input_blocks.{(i + 1) * step}.0.op", f"down_blocks.{i}.downsamplers.0.conv", ()))
        for j in range(step):
            idx = i * step + j
            mods.append((f"output_blocks.{idx}.0", f"up_blocks.{i}.resnets.{j}", _UNET_RESNET))
            if layout.up_attention[i]:
                mods.append((f"output_blocks.{idx}.1", f"up_blocks.{i}.attentions.{j}", ()))
            if j == layout.layers and i < layout.blocks - 1:
                slot = 2 if layout.up_attention[i] else 1
                mods.append((f"output_blocks.{idx}.{slot}.conv", f"up_blocks.{i}.upsamplers.0.conv", ()))
    return mods


def ldm_vae_layout(sd: Mapping[str, Tensor]) -> VAELayout:
    blocks = len(key_indices(sd, VAE_PREFIX + "encoder.down."))
    layers = len(key_indices(sd, VAE_PREFIX + "encoder.down.0.block."))
    if blocks < 1 or layers < 1:
        raise CheckpointError(f"no VAE encoder blocks ({VAE_PREFIX}encoder.down.*.block.*)")
    return VAELayout(blocks, layers)


def _diffusers_vae_layout(sd: Mapping[str, Tensor]) -> VAELayout:
    blocks = len(key_indices(sd, "encoder.down_blocks."))
    layers = len(key_indices(sd, "encoder.down_blocks.0.resnets."))
    if blocks < 1 or layers < 1:
        raise CheckpointError("VAE state dict has no encoder.down_blocks.*.resnets.*")
    return VAELayout(blocks, layers)


def _vae_modules(layout: VAELayout) -> list[ModuleMap]:
    mods: list[ModuleMap] = [("quant_conv", "quant_conv", ()), ("post_quant_conv", "post_quant_conv", ())]
    for part in ("encoder", "decoder"):
        mods += [
            (f"{part}.conv_in", f"{part}.conv_in", ()),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTENTION),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET),
            (f"{part}.norm_out", f"{part}.conv_norm_out", ()),
            (f"{part}.conv_out", f"{part}.conv_out", ()),
        ]
    last = layout.blocks - 1
    for i in range(layout.blocks):
        for j in range(layout.layers):
            mods.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i < last:
            mods.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", ()))
        # LDM numbers decoder levels from the highest resolution; diffusers numbers up_blocks from the lowest.
        for j in range(layout.layers + 1):
            mods.append((f"decoder.up.{last - i}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", _VAE_RESNET))
        if i < last:
            mods.append((f"decoder.up.{last - i}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", ()))
    return mods


def rename_keys(
    sd: Mapping[str, Tensor], prefix: str, modules: list[ModuleMap], *, to_diffusers: bool, what: str
) -> dict[str, Tensor]:
    """Rename every key of `sd` under `prefix` by the module table; a key no module claims is an error."""
    table: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}
    for ldm, diff, renames in modules:
        if to_diffusers:
            table[ldm] = (diff, renames)
        else:
            table[diff] = (ldm, tuple((b, a) for a, b in renames))
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        parts = name.split(".")
        for n in range(len(parts) - 1, 0, -1):
            hit = table.get(".".join(parts[:n]))
            if hit is not None:
                target, renames = hit
                rest = ".".join(parts[n:])
                for src, dst in renames:
                    if rest == src or rest.startswith(src + "."):
                        rest = dst + rest[len(src) :]
                        break
                out[f"{target}.{rest}"] = value
                break
        else:
            unknown.append(key)
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise CheckpointError(f"unexpected {what} keys {shown}; only the SD 1.x, 2.x and XL layouts are supported")
    return out


# ------------------------------------------------------------------------------------------------- text encoders


def strip_text_model(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {(k[len(TEXT_MODEL) :] if k.startswith(TEXT_MODEL) else k): v for k, v in sd.items()}


_OPENCLIP_LAYER = (
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    ("mlp.c_fc", "mlp.fc1"),
    ("mlp.c_proj", "mlp.fc2"),
    ("attn.out_proj", "self_attn.out_proj"),
)
# Keys a SD2 file may hold that no CLIPTextModel has: the pooled-output projection and the contrastive scale.


_OPENCLIP_UNUSED = frozenset({"text_projection", "logit_scale", "attn_mask"})


def openclip_to_hf(
    sd: Mapping[str, Tensor], p: str, layers: int, *, what: str
) -> tuple[dict[str, Tensor], set[str]]:
    """Rename an OpenCLIP text tower under prefix `p` (fused ``in_proj`` q/k/v split) to CLIPTextModel keys.

    Resblocks from `layers` on are left out (SD2 never runs its last one); ``text_projection``, ``logit_scale`` and
    ``attn_mask`` are not converted (they are not CLIPTextModel weights) and stay out of the returned used keys.
    """
    tm = TEXT_MODEL
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    singles = {
        "token_embedding.weight": "embeddings.token_embedding.weight",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_final.weight": "final_layer_norm.weight",
        "ln_final.bias": "final_layer_norm.bias",
    }
    unknown: list[str] = []
    for key, value in sd.items():
        if not key.startswith(p):
            continue
        name = key[len(p) :]
        if name in singles:
            out[tm + singles[name]] = value
        elif name.startswith("transformer.resblocks."):
            idx_str, rest = name[len("transformer.resblocks.") :].split(".", 1)
            idx = int(idx_str)
            if idx == layers:
                continue  # the unused last layer stays in the leftovers
            layer = f"{tm}encoder.layers.{idx}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                q, k, v = value.chunk(3, dim=0)
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                    out[f"{layer}self_attn.{proj}.{kind}"] = part
            else:
                for src, dst in _OPENCLIP_LAYER:
                    if rest.startswith(src + "."):
                        out[layer + dst + rest[len(src) :]] = value
                        break
                else:
                    unknown.append(key)
                    continue
        elif name in _OPENCLIP_UNUSED:
            continue
        else:
            unknown.append(key)
            continue
        used.add(key)
    if unknown:
        raise CheckpointError(f"unexpected {what} text encoder keys {', '.join(unknown[:3])}")
    return out, used


def hf_to_openclip(te: Mapping[str, Tensor], p: str) -> dict[str, Tensor]:
    """CLIPTextModel keys (without ``text_model.``) to an OpenCLIP text tower under prefix `p`, q/k/v fused."""
    singles = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in te.items():
        if key in singles:
            out[p + singles[key]] = value
            continue
        if key.endswith("position_ids"):
            continue
        if not key.startswith("encoder.layers."):
            raise CheckpointError(f"unexpected text encoder key {key}")
        idx_str, rest = key[len("encoder.layers.") :].split(".", 1)
        block = f"{p}transformer.resblocks.{idx_str}."
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            _, proj, kind = rest.split(".")
            qkv.setdefault((int(idx_str), kind), {})[proj] = value
            continue
        for ldm, hf in _OPENCLIP_LAYER:
            if rest.startswith(hf + "."):
                out[block + ldm + rest[len(hf) :]] = value
                break
        else:
            raise CheckpointError(f"unexpected text encoder key {key}")
    for (idx, kind), parts in qkv.items():
        if set(parts) != {"q_proj", "k_proj", "v_proj"}:
            raise CheckpointError(f"text encoder layer {idx} lacks one of q/k/v {kind}")
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
        out[f"{p}transformer.resblocks.{idx}.attn.in_proj_{kind}"] = fused
    return out


def match_text_encoder_keys(sd: Mapping[str, Tensor], model_keys: Iterable[str]) -> dict[str, Tensor]:
    """Rename CLIP text-encoder keys to the form the installed CLIPTextModel uses.

    transformers 4 keys start with ``text_model.``; transformers >= 5.6 flattened the model and dropped that level.
    `sd` may use either form. A `position_ids` buffer is dropped when the model does not persist it, and created
    (0..n-1) when the model does but `sd` lacks it.
    """
    keys = list(model_keys)
    with_level = any(k.startswith(TEXT_MODEL) for k in keys)
    wanted = set(keys)
    # Keys outside the text tower (CLIPTextModelWithProjection's text_projection) never take the level.
    out = {
        (k if k in wanted or not with_level else TEXT_MODEL + k): v for k, v in strip_text_model(sd).items()
    }
    for k in [k for k in out if k.endswith("position_ids") and k not in wanted]:
        del out[k]
    for k in wanted - set(out):
        if k.endswith("position_ids"):
            table = out.get(k.replace("position_ids", "position_embedding.weight"))
            if table is not None:
                out[k] = torch.arange(table.shape[0], device=table.device).unsqueeze(0)
    return out


# --------------------------------------------------------------------------------------------------------- VAE


def split_vae(state_dict: Mapping[str, Tensor]) -> tuple[StateDict, StateDict]:
    """The diffusers-layout VAE state dict of an LDM/SGM file, and the file's VAE tensors it came from."""
    vae_sd = {k: v for k, v in state_dict.items() if not k.startswith(VAE_PREFIX + "loss.")}
    vae = rename_keys(vae_sd, VAE_PREFIX, _vae_modules(ldm_vae_layout(state_dict)), to_diffusers=True, what="VAE")
    for key in list(vae):
        if key.endswith(_VAE_ATTENTION_LINEAR) and vae[key].ndim == 4:
            w = vae[key]
            vae[key] = w.reshape(w.shape[0], w.shape[1])  # 1x1 convolutions in LDM, Linear layers in diffusers
    return vae, {k: v for k, v in vae_sd.items() if k.startswith(VAE_PREFIX)}


def join_vae(vae_sd: Mapping[str, Tensor]) -> StateDict:
    """A diffusers-layout VAE state dict in the LDM layout, without the ``first_stage_model.`` prefix."""
    vae = {}
    for key, value in vae_sd.items():
        if key.endswith(_VAE_ATTENTION_LINEAR) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        vae[key] = value
    return rename_keys(vae, "", _vae_modules(_diffusers_vae_layout(vae_sd)), to_diffusers=False, what="VAE")
