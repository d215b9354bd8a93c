"""Check sdconcepts.host.views.forge_weights against Forge's own classes, without the web UI.

Run with a prepared Forge tree's Python (tools/host_tests.sh prepares one), from anywhere:

    PYTHONDONTWRITEBYTECODE=1 $FORGE/venv/bin/python tests/hosts/forge_views_check.py $FORGE

For tiny SD 1.x, SD 2.x and SDXL checkpoints written by our own writer, it builds Forge's engine objects the way
Forge's loader does (backend/loader.py: huggingface_guess's text-encoder conversion, IntegratedCLIP,
IntegratedAutoencoderKL, IntegratedUNet2DConditionModel, then the StableDiffusion/2/XL engine), with tiny configs
where Forge reads its full-size ones from backend/huggingface. Then our view over forge_objects must alias Forge's
tensors, and its prompt conditioning must equal Forge's own get_learned_conditioning (and SDXL's pooled vector), its
UNet output Forge's UNet output. Nothing is written into the Forge tree.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

FORGE = Path(sys.argv[1]).resolve()
ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(FORGE), str(FORGE / "packages_3rdparty"), str(FORGE / "repositories/huggingface_guess"), str(ROOT)]
# Forge keeps CLIP in float16 by default, even on CPU (memory_management.text_encoder_dtype), and computes it in
# float32 (its embeddings are cast to float32 at each call, its layers cast their weights to the input's dtype); our
# view runs the layers' float16 (the float32 tables converted: a logged copy). --clip-fp16 checks that default with
# a float16 tolerance; without it CLIP is float32 and the comparison is of layout and meaning only.
CLIP_FP16 = "--clip-fp16" in sys.argv
TOLERANCE = 1e-2 if CLIP_FP16 else 1e-4
sys.argv = [sys.argv[0], "--always-cpu", "--skip-torch-cuda-test", *([] if CLIP_FP16 else ["--clip-in-fp32"])]

import torch  # noqa: E402
from backend import memory_management  # noqa: E402
from backend.args import dynamic_args  # noqa: E402
from backend.diffusion_engine.sd15 import StableDiffusion  # noqa: E402
from backend.diffusion_engine.sd20 import StableDiffusion2  # noqa: E402
from backend.diffusion_engine.sdxl import StableDiffusionXL  # noqa: E402
from backend.nn import vae as forge_vae  # noqa: E402
from backend.nn.clip import IntegratedCLIP  # noqa: E402
from backend.nn.unet import IntegratedUNet2DConditionModel, Timestep  # noqa: E402
from backend.nn.vae import IntegratedAutoencoderKL  # noqa: E402
from backend.operations import using_forge_operations  # noqa: E402
from backend.state_dict import load_state_dict, try_filter_state_dict  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402
from huggingface_guess import detection, model_list  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, modeling_utils  # noqa: E402

from sdconcepts.backends.model_loading import model_sharing_weights  # noqa: E402
from sdconcepts.backends.prompt_encoder import PromptEncoder  # noqa: E402
from sdconcepts.backends.single_file import save_single_file  # noqa: E402
from sdconcepts.backends.tiny import build_tiny_sd1, build_tiny_sd2, build_tiny_sdxl  # noqa: E402
from sdconcepts.checkpoints import files as cf  # noqa: E402
from sdconcepts.host import views  # noqa: E402

ENGINES = {"sd1": (StableDiffusion, model_list.SD15), "sd2": (StableDiffusion2, model_list.SD20),
           "sdxl": (StableDiffusionXL, model_list.SDXL)}
CLIPS = {"sd1": {"clip_l": "text_encoder"}, "sd2": {"clip_h": "text_encoder"},
         "sdxl": {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}}


def tiny(family: str) -> dict:
    if family == "sd1":
        return build_tiny_sd1(seed=3)
    if family == "sd2":
        return build_tiny_sd2(seed=3)
    # Forge gives every CLIP a square text_projection (nn/clip.py): SDXL's OpenCLIP-G projects 1280 to 1280. The
    # tiny SDXL projects 48 to 40; here it is square too, and the UNet's added conditioning takes that width.
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    parts = build_tiny_sdxl(seed=3)
    config = parts["text_encoder_2"].config.to_dict()
    config["projection_dim"] = config["hidden_size"]
    torch.manual_seed(4)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    unet_config = dict(parts["unet"].config)
    unet_config["projection_class_embeddings_input_dim"] = config["hidden_size"] + 6 * unet_config["addition_time_embed_dim"]
    parts["unet"] = UNet2DConditionModel.from_config(unet_config).eval()
    return parts


def forge_engine(family: str, path: Path, parts: dict):
    """Forge's engine for the file, built as backend/loader.py builds it (tiny configs instead of its repo's)."""
    sd = cf.read_checkpoint(path)
    engine_class, guess_class = ENGINES[family]
    unet_config = detection.detect_unet_config(sd, "model.diffusion_model.")
    guess = guess_class(unet_config)
    widths, heads = parts["unet"].config.block_out_channels, parts["unet"].config.attention_head_dim
    if family == "sd1":
        guess.unet_config.update(num_heads=int(heads), num_head_channels=-1)
    else:
        guess.unet_config.update(num_heads=-1, num_head_channels=int(widths[-1] // heads[-1]))
    guess.model_type = guess.model_type(sd)
    guess.ztsnr = False
    guess.clip_target = guess.clip_target(sd)
    sd = guess.process_vae_state_dict(sd)
    unet_sd = try_filter_state_dict(sd, guess.unet_key_prefix if hasattr(guess, "unet_key_prefix") else ["model.diffusion_model."])
    vae_sd = try_filter_state_dict(sd, guess.vae_key_prefix)
    sd = guess.process_clip_state_dict(sd)
    components = {}
    # Forge's UNet has 32 GroupNorm groups built in (nn/unet.py), the tiny UNet 16: the groups (no weight shape)
    # follow the tiny config while Forge's UNet is built, so that the outputs can be compared.
    groups = int(parts["unet"].config.norm_num_groups)
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32):
        base = torch.nn.GroupNorm

        class TinyGroupNorm(base):
            def __init__(self, num_groups: int, num_channels: int, *args, **kwargs) -> None:
                super().__init__(groups, num_channels, *args, **kwargs)

        torch.nn.GroupNorm = TinyGroupNorm
        try:
            unet = IntegratedUNet2DConditionModel.from_config(guess.unet_config)
        finally:
            torch.nn.GroupNorm = base
    load_state_dict(unet, unet_sd)
    unet.storage_dtype = unet.computation_dtype = torch.float32
    unet.load_device = unet.initial_device = unet.offload_device = memory_management.cpu
    components["unet"] = unet
    # Forge's VAE has 32 GroupNorm groups built in, more than the tiny VAE's 16 channels: the groups (no weight
    # shape) follow the tiny config here; VAE outputs are not compared.
    groups = int(parts["vae"].config.norm_num_groups)
    forge_vae.Normalize = lambda channels, num_groups=groups: torch.nn.GroupNorm(groups, channels, eps=1e-6)
    with using_forge_operations(device=memory_management.cpu, dtype=torch.float32):
        vae = IntegratedAutoencoderKL.from_config(dict(parts["vae"].config))
    load_state_dict(vae, vae_sd, ignore_start="loss.")
    components["vae"] = vae
    for prefix, target in guess.clip_target.items():
        clip_sd = try_filter_state_dict(sd, [prefix + "."])
        config = CLIPTextConfig(**parts[target].config.to_dict())
        to_args = dict(device=memory_management.cpu, dtype=memory_management.text_encoder_dtype())
        with modeling_utils.no_init_weights(), using_forge_operations(**to_args, manual_cast_enabled=True):
            model = IntegratedCLIP(CLIPTextModel, config, add_text_projection=True).to(**to_args)
        load_state_dict(model, clip_sd, ignore_errors=["transformer.text_projection.weight",
                                                       "transformer.text_model.embeddings.position_ids", "logit_scale"])
        components[target] = model
        components["tokenizer" + target[len("text_encoder"):]] = parts["tokenizer" + target[len("text_encoder"):]]
    components["scheduler"] = DDIMScheduler.from_config(parts["scheduler"].config)
    return engine_class(estimated_config=guess, huggingface_components=components)


def check(family: str, folder: Path) -> None:
    parts = tiny(family)
    path = folder / f"{family}.safetensors"
    save_single_file({**parts, "family": family}, path)
    with torch.inference_mode():
        engine = forge_engine(family, path, parts)
    objects = engine.forge_objects
    # What Forge holds: the names checked by views.forge_family, the layer count of SD2's clip_h.
    names = sorted(n for n, _ in objects.clip.cond_stage_model.named_children())
    assert names == sorted(CLIPS[family]), names
    # No emphasis: A1111 and Forge restore the mean over the whole batch, our encoder per prompt.
    prompts = ["a red circle", "a blue square, on grass, a long prompt " * 4]
    with torch.inference_mode():
        theirs = engine.get_learned_conditioning(prompts)
    state, encoders, got_family = views.forge_weights(objects)
    assert got_family == family
    _, metadata = cf.read_checkpoint_with_metadata(path)  # the tiny model's heads: what shapes cannot tell
    view = model_sharing_weights(state, name=family, text_encoders=encoders, family=family, metadata=metadata)
    held = {t.untyped_storage().data_ptr() for m in (objects.unet.model, objects.vae.first_stage_model,
                                                       objects.clip.cond_stage_model) for t in m.state_dict().values()}
    modules = [view.unet, view.vae, *view.text_encoders]
    copied = [n for m in modules for n, p in m.named_parameters() if p.untyped_storage().data_ptr() not in held]
    encoder = PromptEncoder(view)
    mine = torch.stack([encoder.encode(p) for p in prompts]).float()
    forge_context = theirs["crossattn"] if family == "sdxl" else theirs
    error = (mine - forge_context).abs().max().item()
    line = f"{family}: Forge holds {names}"
    if family == "sd2":
        line += f" ({objects.clip.cond_stage_model.clip_h.transformer.config.num_hidden_layers} layers)"
    line += f"; view copied {len(copied)} parameters {copied[:3]}; context max |ours - Forge's| {error:.2e}"
    assert error < TOLERANCE, line
    if family == "sdxl":
        pooled = torch.stack([encoder.pooled(p) for p in prompts]).float()
        width = pooled.shape[-1]
        pooled_error = (pooled - theirs["vector"][:, :width]).abs().max().item()
        line += f"; pooled {pooled_error:.2e}"
        assert pooled_error < TOLERANCE, line
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 700])
    with torch.inference_mode():
        added = None
        y = None
        if family == "sdxl":
            time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * 2, dtype=torch.float32)
            added = {"text_embeds": pooled, "time_ids": time_ids}
            # As the engine's get_learned_conditioning builds the vector, at the tiny model's time-embedding width.
            embedder = Timestep(int(view.unet.config.addition_time_embed_dim))
            emb = torch.cat([embedder(torch.Tensor([v])) for v in (32, 32, 0, 0, 32, 32)]).flatten()
            y = torch.cat([pooled, emb.unsqueeze(0).repeat(2, 1)], dim=1)
        ours_out = view.unet(x, t, encoder_hidden_states=mine, added_cond_kwargs=added).sample
        forge_out = objects.unet.model.diffusion_model(x, t, context=mine, y=y, transformer_options={})
    unet_error = (ours_out - forge_out).abs().max().item()
    line += f"; UNet {unet_error:.2e}"
    assert unet_error < TOLERANCE, line
    # float16 CLIP: only the float32 token/position tables are converted (copied) for one dtype per module.
    assert all("embeddings" in name for name in copied) if CLIP_FP16 else not copied, line
    print("OK " + line)


def main() -> None:
    # The web UI's options, as Forge's text engines read them (modules.shared.opts is set by the UI's start-up).
    from types import SimpleNamespace

    from backend.diffusion_engine import sdxl as forge_sdxl
    from backend.text_processing import classic_engine

    classic_engine.opts = forge_sdxl.opts = SimpleNamespace(emphasis="Original", sdxl_crop_left=0, sdxl_crop_top=0)
    dynamic_args["embedding_dir"] = tempfile.mkdtemp()
    dynamic_args["emphasis_name"] = "Original"
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd1", "sd2", "sdxl"):
            check(family, Path(tmp))


if __name__ == "__main__":
    main()
