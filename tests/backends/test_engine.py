"""The generation engine on a tiny real model: loading, A1111 prompt encoding, samplers, seeds, infotext."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from closeness import assert_images_close, assert_owned_weights, pixels

from sdconcepts.backends.model_loading import ModelLoadError, load_model, model_from_components
from sdconcepts.backends.prompt_encoder import PromptEncoder
from sdconcepts.backends.sampling import SCHEDULERS, txt2img
from sdconcepts.generation import SAMPLERS, GenerationError, GenerationParams, parse_infotext
from sdconcepts.images import read_infotext, save_png


def test_every_listed_sampler_has_a_scheduler() -> None:
    assert set(SAMPLERS) == set(SCHEDULERS)
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(SAMPLERS)


def test_loads_diffusers_folder_with_properties(tiny_model) -> None:  # type: ignore[no-untyped-def]
    assert tiny_model.family == "sd1"
    assert tiny_model.prediction_type == "epsilon"
    assert tiny_model.vae_scale_factor == 4 and tiny_model.default_size == 32 and tiny_model.size_multiple == 32
    assert tiny_model.short_hash is not None and len(tiny_model.short_hash) == 10
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())


def test_missing_and_bogus_models_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model(tmp_path / "empty")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a model") as info:
        load_model(text)
    assert "\n" not in str(info.value) and "notes.txt" in str(info.value)


def test_plain_prompt_matches_diffusers_encode_prompt(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        unet=tiny_model.unet, vae=tiny_model.vae, text_encoder=tiny_model.text_encoder,
        tokenizer=tiny_model.tokenizer, scheduler=DDIMScheduler.from_config(tiny_model.scheduler_config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    prompt = "a red circle on a teal background, sharp"
    theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    ours = PromptEncoder(tiny_model).encode(prompt)
    assert ours.shape == (77, 48)
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-6)


def test_emphasis_weights_change_only_the_weighted_tokens(tiny_model) -> None:  # type: ignore[no-untyped-def]
    plain = PromptEncoder(tiny_model, emphasis="No norm").encode("a red circle")
    weighted = PromptEncoder(tiny_model, emphasis="No norm").encode("a (red:1.5) circle")
    # BOS, "a", "red", "circle": only position 2 is scaled (the transformer output is weighted afterwards).
    torch.testing.assert_close(weighted[2], plain[2] * 1.5)
    torch.testing.assert_close(weighted[3], plain[3])
    original = PromptEncoder(tiny_model).encode("a (red:1.5) circle")
    torch.testing.assert_close(original.mean(), plain.mean(), rtol=1e-5, atol=1e-6)
    ignored = PromptEncoder(tiny_model, emphasis="Ignore").encode("a (red:1.5) circle")
    torch.testing.assert_close(ignored, plain)


def test_original_emphasis_restores_the_chunk_mean_as_a1111_does() -> None:
    from sdconcepts.backends.tiny import build_tiny_sd1

    components = build_tiny_sd1(seed=3)
    with torch.no_grad():  # a real encoder's final layer norm has a bias, so chunk means are not ~0
        encoder = components["text_encoder"]
        bias = getattr(encoder, "text_model", encoder).final_layer_norm.bias  # transformers 4 or 5 layout
        bias.copy_(0.2 + 0.1 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
    model = model_from_components(components)
    plain = PromptEncoder(model, emphasis="No norm").encode("a red circle")
    no_norm = PromptEncoder(model, emphasis="No norm").encode("a (red:1.5) circle")
    original = PromptEncoder(model).encode("a (red:1.5) circle")
    # A1111: z * multipliers, then times mean(z) / mean(z * multipliers).
    torch.testing.assert_close(original, no_norm * (plain.mean() / no_norm.mean()), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(original, no_norm)


def _a1111_emphasis_original() -> type:
    """A1111 1.10.1's own ``EmphasisOriginal`` (modules/sd_emphasis.py, which imports only torch), read from the host
    kit's tarball: the reference for how "Original" emphasis scales a batch."""
    import os
    import tarfile

    root = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("SDCONCEPTS_HOST_KIT", ""), str(root.parent / "shared" / "hosts"), "/work/shared/hosts"]
    for kit in filter(None, candidates):
        tarball = Path(kit) / "a1111-v1.10.1.tar.xz"
        if tarball.is_file():
            break
    else:
        pytest.skip("the host kit (../shared/hosts/a1111-v1.10.1.tar.xz) is not on this machine")
    with tarfile.open(tarball) as archive:
        for member in archive:
            if member.name.endswith("/modules/sd_emphasis.py"):
                source = archive.extractfile(member).read().decode()  # type: ignore[union-attr]
                break
    namespace: dict[str, object] = {}
    exec(compile(source, "sd_emphasis.py", "exec"), namespace)  # noqa: S102 - the real host's code, a test reference
    return namespace["EmphasisOriginal"]  # type: ignore[return-value]


def _a1111_batch(model, texts: list[str]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """What A1111's FrozenCLIPEmbedderWithCustomWordsBase.forward returns for ``texts`` as one batch: chunk by chunk
    (shorter texts padded with empty chunks), each chunk's batch given to EmphasisOriginal, then joined."""
    emphasis_class = _a1111_emphasis_original()
    raw = PromptEncoder(model, emphasis="Ignore")  # the same tokens and chunks, the transformer output unweighted
    per_text = [raw.chunks(text)[0] for text in texts]
    empty = raw.chunks("")[0][0]
    longest = max(len(chunks) for chunks in per_text)
    zs = []
    for i in range(longest):
        batch = [chunks[i] if i < len(chunks) else empty for chunks in per_text]
        emphasis = emphasis_class()
        emphasis.z = raw._run(batch)
        emphasis.multipliers = torch.tensor([c.multipliers for c in batch])
        emphasis.after_transformers()
        zs.append(emphasis.z)
    return torch.hstack(zs)


def _model_with_layer_norm_bias():  # type: ignore[no-untyped-def]
    from sdconcepts.backends.tiny import build_tiny_sd1

    components = build_tiny_sd1(seed=3)
    with torch.no_grad():  # a real encoder's final layer norm has a bias, so chunk means are not ~0
        encoder = components["text_encoder"]
        bias = getattr(encoder, "text_model", encoder).final_layer_norm.bias  # transformers 4 or 5 layout
        bias.copy_(0.2 + 0.1 * torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)))
    return model_from_components(components)


def test_original_emphasis_is_per_chunk_as_in_a1111() -> None:
    model = _model_with_layer_norm_bias()
    # Two chunks, emphasis only in the second: A1111 restores each chunk's own mean, so the first chunk is untouched.
    prompt = "a red circle on a teal background, " * 12 + "a (blue:1.4) square"
    ours = PromptEncoder(model).encode(prompt)
    assert ours.shape == (154, 48)
    want = _a1111_batch(model, [prompt])[0]
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[:77], PromptEncoder(model, emphasis="Ignore").encode(prompt)[:77])


def test_prompt_editing_variants_share_emphasis_as_in_a1111() -> None:
    model = _model_with_layer_norm_bias()
    # [a (red:1.5) circle:a blue square, ...:5]: A1111 encodes the variants as one batch, restores each chunk's mean
    # over both, and pads the one-chunk variant to two chunks.
    short = "a (red:1.5) circle"
    long = "a blue square, " * 20
    encoder = PromptEncoder(model)
    group = encoder.encode_group([short, long])
    want = _a1111_batch(model, [short, long])
    torch.testing.assert_close(group[short], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(group[long], want[1], rtol=1e-5, atol=1e-6)
    assert group[short].shape == (154, 48)
    # On its own the same text is encoded differently (its own mean, one chunk).
    alone = encoder.encode(short)
    assert alone.shape == (77, 48) and not torch.allclose(alone, group[short][:77])


def test_original_emphasis_of_zero_mean_vectors_is_not_nan(tiny_model) -> None:  # type: ignore[no-untyped-def]
    from sdconcepts.backends.prompt_encoder import apply_emphasis

    # Token vectors whose mean is exactly 0 (a layer norm without bias), also after weighting by 1.5: A1111's
    # rescale is 0/0 here.
    z = torch.tensor([[1.0, -1.0, 2.0, -2.0]] * 5)
    multipliers = torch.tensor([1.0, 1.5, 1.0, 1.0, 1.0])
    out = apply_emphasis(z, multipliers, normalize=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, z * multipliers.unsqueeze(-1), rtol=0, atol=0)
    # The tiny model has no layer norm bias either: the rescale is skipped, nothing blows up.
    original = PromptEncoder(tiny_model).encode("a (red:1.1) circle")
    no_norm = PromptEncoder(tiny_model, emphasis="No norm").encode("a (red:1.1) circle")
    assert torch.isfinite(original).all()
    torch.testing.assert_close(original, no_norm, rtol=0, atol=0)


def test_long_prompts_and_break_make_more_chunks(tiny_model) -> None:  # type: ignore[no-untyped-def]
    enc = PromptEncoder(tiny_model)
    long_prompt = ", ".join(["red circle"] * 40)
    assert enc.encode(long_prompt).shape == (154, 48)
    assert enc.encode("a red circle BREAK a blue square").shape == (154, 48)
    assert enc.encode("").shape == (77, 48)


def test_prompt_length_is_bounded_before_anything_is_encoded(tiny_model) -> None:  # type: ignore[no-untyped-def]
    enc = PromptEncoder(tiny_model)
    assert enc.encode(" BREAK ".join(["x"] * 64)).shape == (64 * 77, 48)
    with pytest.raises(GenerationError, match="a prompt of 65 chunks of 75 tokens; at most 64 are encoded"):
        enc.encode(" BREAK ".join(["x"] * 65))  # BREAK × 50,000 ended in an allocator traceback
    with pytest.raises(GenerationError, match="at most 32768 are read"):
        enc.encode("x" * 32_769)
    with pytest.raises(GenerationError, match="the negative prompt has 20000000 characters; at most 32768"):
        GenerationParams(negative_prompt="x" * 20_000_000).validated()  # the web kept 5.76 GB after one


def test_clip_skip_uses_an_earlier_layer(tiny_model) -> None:  # type: ignore[no-untyped-def]
    one = PromptEncoder(tiny_model, clip_skip=1).encode("a red circle")
    two = PromptEncoder(tiny_model, clip_skip=2).encode("a red circle")
    assert one.shape == two.shape and not torch.allclose(one, two)


def test_embedding_vectors_are_placed_at_the_word(tiny_model) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    vectors = torch.randn(2, 48)
    with_emb = PromptEncoder(tiny_model, {"mything": vectors}).encode("a MyThing circle")
    without = PromptEncoder(tiny_model).encode("a mything circle")
    assert not torch.allclose(with_emb, without)
    # The same prompt with the vectors written straight into the token embedding gives the same output.
    te = tiny_model.text_encoder
    table = te.get_input_embeddings().weight
    ids = tiny_model.tokenizer("a x x circle", padding="max_length", max_length=77).input_ids
    embeds = table[torch.tensor(ids)].clone()
    embeds[2:4] = vectors
    handle = te.get_input_embeddings().register_forward_hook(lambda m, a, out: embeds.unsqueeze(0))
    try:
        expected = te(input_ids=torch.tensor([ids])).last_hidden_state[0]
    finally:
        handle.remove()
    torch.testing.assert_close(with_emb, expected, rtol=0, atol=1e-6)


def test_same_seed_same_image_and_seeds_differ(tiny_model) -> None:  # type: ignore[no-untyped-def]
    params = GenerationParams(prompt="a red circle", steps=4, seed=7, cfg_scale=5)
    a = txt2img(tiny_model, params)
    b = txt2img(tiny_model, params)
    c = txt2img(tiny_model, GenerationParams(prompt="a red circle", steps=4, seed=8, cfg_scale=5))
    assert (pixels(a) == pixels(b)).all()
    assert (pixels(a) != pixels(c)).any()
    assert a.images[0].size == (32, 32)


def test_batch_image_matches_single_generation_with_its_seed(tiny_model) -> None:  # type: ignore[no-untyped-def]
    batch = txt2img(tiny_model, GenerationParams(prompt="a blue cross", steps=3, seed=10, batch_size=2,
                                                  batch_count=2, sampler="Euler a"))
    assert batch.seeds == [10, 11, 12, 13] and len(batch.images) == 4
    single = txt2img(tiny_model, GenerationParams(prompt="a blue cross", steps=3, seed=13, sampler="Euler a"))
    assert np.abs(pixels(batch)[3] - pixels(single)[0]).max() <= 1


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_generates(tiny_model, sampler: str) -> None:  # type: ignore[no-untyped-def]
    result = txt2img(tiny_model, GenerationParams(prompt="a green ring", steps=3, seed=1, sampler=sampler))
    image = pixels(result)
    assert image.shape == (1, 32, 32, 3) and image.std() > 0


def test_prompt_editing_switches_conditioning_mid_run(tiny_model) -> None:  # type: ignore[no-untyped-def]
    def run(prompt: str) -> np.ndarray:
        return pixels(txt2img(tiny_model, GenerationParams(prompt=prompt, steps=6, seed=3, sampler="DDIM")))

    edited = run("a [red:blue:3] circle")
    assert (edited != run("a red circle")).any()
    assert (edited != run("a blue circle")).any()
    # A switch after the last step never happens: identical to the first prompt.
    assert (run("a [red:blue:10] circle") == run("a red circle")).all()
    assert (run("a [red|blue] circle") != run("a red circle")).any()


def test_guidance_scale_one_skips_the_unconditional_pass(tiny_model) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    handle = tiny_model.unet.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    try:
        txt2img(tiny_model, GenerationParams(prompt="x", steps=2, seed=1, cfg_scale=1.0))
        txt2img(tiny_model, GenerationParams(prompt="x", steps=2, seed=1, cfg_scale=7.0))
    finally:
        handle.remove()
    assert calls == [1, 1, 2, 2]


def test_negative_prompt_and_tags(tiny_model) -> None:  # type: ignore[no-untyped-def]
    base = GenerationParams(prompt="a red circle", steps=3, seed=5, sampler="DDIM")
    plain = txt2img(tiny_model, base)
    negative = txt2img(tiny_model, GenerationParams(**{**base.__dict__, "negative_prompt": "blue"}))
    assert (pixels(plain) != pixels(negative)).any()
    tagged = txt2img(tiny_model, GenerationParams(**{**base.__dict__, "prompt": "a red circle <hypernet:nope:0.5>"}))
    # The tag is stripped before encoding (same image) and reported as unknown; the infotext drops it as the warning
    # says (issue 26 item 13: it had no effect, so Reuse and PNG Info must not bring it back).
    assert (pixels(tagged) == pixels(plain)).all()
    assert tagged.infotexts[0].startswith("a red circle \n") and "nope" not in tagged.infotexts[0]
    assert any("nope" in w for w in tagged.warnings)


def test_sizes_must_fit_the_model(tiny_model) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GenerationError, match="multiples of 32"):
        txt2img(tiny_model, GenerationParams(prompt="x", steps=1, width=40, height=32))
    wide = txt2img(tiny_model, GenerationParams(prompt="x", steps=1, seed=1, width=64, height=32))
    assert wide.images[0].size == (64, 32)


def test_png_carries_the_infotext(tiny_model, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = txt2img(tiny_model, GenerationParams(prompt="a red circle", negative_prompt="blurry", steps=2,
                                                   seed=99, cfg_scale=4.5, sampler="DDIM"))
    path = save_png(result.images[0], tmp_path / "out.png", result.infotexts[0])
    prompt, negative, fields = parse_infotext(read_infotext(path) or "")
    assert (prompt, negative) == ("a red circle", "blurry")
    assert fields == {"Steps": "2", "Sampler": "DDIM", "CFG scale": "4.5", "Seed": "99", "Size": "32x32",
                      "Model hash": tiny_model.short_hash, "Model": "tiny-sd1"}


def test_in_memory_components_generate() -> None:
    from sdconcepts.backends.tiny import build_tiny_sd1

    model = model_from_components(build_tiny_sd1(seed=3))
    assert model.short_hash is None
    result = txt2img(model, GenerationParams(prompt="a red circle", steps=2, seed=1))
    assert "Model hash" not in result.infotexts[0]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_checkpoint_generates_identically(tiny_model, tmp_path: Path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler

    from sdconcepts.backends.single_file import save_single_file

    components = {"unet": tiny_model.unet, "vae": tiny_model.vae, "text_encoder": tiny_model.text_encoder,
                  "scheduler": DDIMScheduler.from_config(tiny_model.scheduler_config)}
    path = save_single_file(components, tmp_path / f"tiny{suffix}")
    loaded = load_model(path, device="cpu")
    assert (loaded.family, loaded.prediction_type, loaded.name) == ("sd1", "epsilon", "tiny")
    # No emphasis here: A1111's "Original" mean rescale is ill-conditioned on random weights (mean ~0).
    params = GenerationParams(prompt="a red circle, a square", negative_prompt="blue", steps=3, seed=4, sampler="Euler")
    assert_images_close(pixels(txt2img(loaded, params)), pixels(txt2img(tiny_model, params)))
    assert loaded.short_hash != tiny_model.short_hash


def test_sd2_v_prediction_single_file_loads_and_generates(tmp_path: Path) -> None:
    from sdconcepts.backends.single_file import save_single_file
    from sdconcepts.backends.tiny import build_tiny_sd2

    components = build_tiny_sd2(seed=2, prediction_type="v_prediction")
    path = tmp_path / "sd2v.safetensors"
    save_single_file(components, path)  # type: ignore[arg-type]
    model = load_model(path, device="cpu")
    assert (model.family, model.prediction_type) == ("sd2", "v_prediction")
    assert model.tokenizer.pad_token_id == 0
    for name in ("unet", "vae", "text_encoder"):
        components[name].requires_grad_(False)  # type: ignore[attr-defined]
        assert_owned_weights(getattr(model, name))
    in_memory = model_from_components(components, family="sd2")
    params = GenerationParams(prompt="a red circle", steps=3, seed=4, sampler="DDIM")
    assert_images_close(pixels(txt2img(model, params)), pixels(txt2img(in_memory, params)))


def test_non_finite_cfg_and_conditioning_are_named_before_sampling(tiny_model) -> None:  # type: ignore[no-untyped-def]
    for cfg in (float("nan"), float("inf")):
        with pytest.raises(GenerationError, match="CFG scale must be a finite number"):
            txt2img(tiny_model, GenerationParams(prompt="x", steps=2, seed=1, cfg_scale=cfg))
    steps: list[int] = []
    emphasis = "(" * 1000 + "x" + ")" * 1000  # 1.1 ** 1000: infinite in float32
    with pytest.raises(GenerationError, match="conditioning has NaN or infinite values: an emphasis weight"):
        txt2img(tiny_model, GenerationParams(prompt=emphasis, steps=2, seed=1), progress=lambda *a: steps.append(1))
    assert steps == []  # refused before the first step, not after the whole run


def test_an_allocation_that_fails_after_the_memory_check_is_one_line() -> None:
    from sdconcepts.backends import sampling

    def allocates_too_much() -> object:
        return torch.empty(1 << 60, dtype=torch.uint8)  # the CPU allocator's real refusal

    with pytest.raises(GenerationError, match="^out of memory while generating .*use a smaller size or batch$"):
        sampling._out_of_memory_is_one_line(allocates_too_much)()  # type: ignore[arg-type]
    assert sampling.txt2img.__wrapped__  # type: ignore[attr-defined]  # the generation goes through it


def test_nan_output_is_an_error_not_a_black_image() -> None:
    from sdconcepts.backends.tiny import build_tiny_sd1

    components = build_tiny_sd1(seed=5)
    with torch.no_grad():
        components["unet"].conv_out.bias.fill_(float("nan"))  # type: ignore[attr-defined]
    with pytest.raises(GenerationError, match="NaN"):
        txt2img(model_from_components(components), GenerationParams(prompt="x", steps=2, seed=1))


def test_text_encoder_weights_load_in_either_transformers_key_form(tiny_model_dir: Path, tmp_path: Path) -> None:
    """transformers 5 writes flattened keys, transformers 4 ``text_model.*``; both must load (never left random)."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "text_encoder" / "model.safetensors"
    state = load_file(str(weights))
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    prefixed = {f"text_model.{k}": v for k, v in flat.items()}
    reference = PromptEncoder(load_model(tiny_model_dir, device="cpu")).encode("a red circle")
    for form in (flat, prefixed):
        save_file(form, str(weights))
        encoded = PromptEncoder(load_model(copy, device="cpu")).encode("a red circle")
        torch.testing.assert_close(encoded, reference, rtol=0, atol=0)
