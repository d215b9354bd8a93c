"""The six uses, each generated with fixed seeds, measured by the probe and checked against its bar.

Each ``measure_*`` returns a ``Use``: its figures, its bars (label, value, bar) and the rows of its grid (the same
seeds with and without what was learned). ``Studio`` holds the loaded model and the learned words and hypernetwork.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from sdconcepts.showcase import pictures
from sdconcepts.showcase.recipes import Recipes, balanced_pictures, object_pictures
from sdconcepts.toyworld import world
from sdconcepts.toyworld.probe import classify

SAMPLES = 60  # generations per figure
STEPS, SAMPLER, CFG = 20, "DDIM", 5.0
# The inpainting mask: the box around the picture's shape grown by this many pixels. At 3 the smallest boxes (13-16
# px of a 32 px picture) leave the learned word too little room and it met its 80 % bar by one generation (81.7 %,
# on every step count from 300 to 600 and with 8 vectors); at 5 it draws the object in 88.3 % (also with other conv
# kernels: mkldnn off).
MASK_PADDING = 5


@dataclass
class Use:
    key: str
    title: str
    what: str
    figures: dict[str, Any]
    bars: list[dict[str, Any]]
    rows: list[tuple[str, list[Image.Image]]] = field(default_factory=list)
    note: str = ""

    def bar(self, label: str, value: float, bar: float) -> None:
        self.bars.append({"label": label, "value": round(value, 4), "bar": bar, "passed": value >= bar})


@dataclass
class Studio:
    """The loaded model and what was learned: embeddings by word, hypernetworks by name."""

    model: Any
    recipes: Recipes
    embeddings: dict[str, Any]
    hypernetworks: dict[str, Any]

    def txt2img(self, prompts: Sequence[str], seed: int, *, learned: bool = True, every: int = 1) -> list[Image.Image]:
        """One picture per prompt, seeds ``seed``, ``seed + every``, ...; equal prompts run as one batch (seeds in a
        batch count up by one, as A1111's do)."""
        from sdconcepts.backends.sampling import txt2img
        from sdconcepts.generation import GenerationParams
        from sdconcepts.hypernetworks.tags import resolve_in_memory

        out: list[Image.Image] = []
        i = 0
        while i < len(prompts):
            j = i
            while j < len(prompts) and prompts[j] == prompts[i] and j - i < (20 if every == 1 else 1):
                j += 1
            params = GenerationParams(prompt=prompts[i], steps=STEPS, sampler=SAMPLER, cfg_scale=CFG, seed=seed + every * i,
                                      batch_size=j - i)
            hypernetworks = resolve_in_memory(prompts[i], self.hypernetworks if learned else {}, self.model.unet)
            out += txt2img(self.model, params, embeddings=self.embeddings if learned else None,
                           hypernetworks=hypernetworks, size_limits=False).images
            i = j
        return out

    def inpaint(self, cases: Sequence[tuple[Image.Image, Image.Image, str]], seed: int, *,
                learned: bool = True, per_case: int = 2) -> list[Image.Image]:
        """Inpaint each (picture, mask, prompt) ``per_case`` times (mask blur 0, the original under the mask)."""
        from sdconcepts.backends.sampling import img2img
        from sdconcepts.generation import GenerationParams
        from sdconcepts.img2img import Img2ImgOptions

        options = Img2ImgOptions(denoising_strength=1.0, mask_blur=0, inpainting_fill="original")
        out: list[Image.Image] = []
        for i, (image, mask, prompt) in enumerate(cases):
            params = GenerationParams(prompt=prompt, steps=STEPS, sampler=SAMPLER, cfg_scale=CFG,
                                      seed=seed + per_case * i, batch_size=per_case)
            out += img2img(self.model, params, image, mask=mask, options=options,
                           embeddings=self.embeddings if learned else None).images
        return out


def hits(images: Sequence[Image.Image], expected: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Per attribute named in the expectations, the share of pictures the probe finds as expected; ``all``: every
    expected attribute at once."""
    if not images:
        return {}
    found = classify(images)
    names = sorted({name for e in expected for name in e})
    out = {name: sum(f[name] == e[name] for f, e in zip(found, expected, strict=True) if name in e) /
           max(1, sum(name in e for e in expected)) for name in names}
    out["all"] = sum(all(f[n] == v for n, v in e.items()) for f, e in zip(found, expected, strict=True)) / len(found)
    return {k: round(v, 4) for k, v in out.items()}


def normalised_entropy(counts: Mapping[str, int], kinds: int) -> float:
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values() if c)
    return round(entropy / math.log(kinds), 4)


def measure_text_guided(studio: Studio) -> Use:
    o = studio.recipes.object
    backgrounds = list(world.BACKGROUNDS)
    prompts = [f"a {o.name} on a {backgrounds[i % len(backgrounds)]} background" for i in range(SAMPLES)]
    prompts.sort(key=lambda p: backgrounds.index(p.split(" on a ")[1].split()[0]))
    expected = [{"shape": o.shape, "colour": o.colour, "background": p.split(" on a ")[1].split()[0]} for p in prompts]
    with_word = studio.txt2img(prompts, 100)
    without = studio.txt2img(prompts, 100, learned=False)
    trained = sorted({a.background for _, a in object_pictures(o)})
    new = [i for i, e in enumerate(expected) if e["background"] not in trained]
    use = Use("text_guided", "Text-guided synthesis",
              f"The word {o.name}, learned from {o.images} pictures of a {o.colour} {o.shape}, put in contexts the "
              f"prompt names: \"a {o.name} on a navy background\".", {}, [])
    use.figures = {"prompt": f"a {o.name} on a <background> background", "generations": len(prompts),
                   "with_word": hits(with_word, expected), "without_word": hits(without, expected),
                   "trained_backgrounds": trained,
                   "with_word_new_backgrounds": hits([with_word[i] for i in new], [expected[i] for i in new])}
    use.note = (f"The toy world's one context is the background, so new contexts are backgrounds: the word was "
                f"learned on {', '.join(trained)} only; 'with word new backgrounds' counts the others alone.")
    use.bar("object and named background right", use.figures["with_word"]["all"], 0.8)
    use.rows = [(f"a {o.name} on a <bg> background, without the word", without[::7]),
                (f"with {o.name}", with_word[::7])]
    return use


def _style_prompts(count: int) -> list[tuple[str, str]]:
    pairs = [(s, c) for s in world.SHAPES for c in world.COLOURS][::2]  # 15 of the 30 shape x colour pairs
    return [pairs[(i // 4) % len(pairs)] for i in range(count)]


def measure_style(studio: Studio) -> list[Use]:
    """The style as a word, then as a hypernetwork (at the recipe's strength, and at 1), on objects the prompt
    names."""
    s = studio.recipes.style
    pairs = _style_prompts(SAMPLES)
    expected = [{"shape": shape, "colour": colour} for shape, colour in pairs]
    uses = []
    plain_prompts = [f"a {colour} {shape}" for shape, colour in pairs]
    plain = studio.txt2img(plain_prompts, 200, learned=False)
    for kind, prompts in (("word", [f"a painting of a {c} {sh} in the style of {s.name}" for sh, c in pairs]),
                          ("hypernetwork", [f"a {c} {sh} <hypernet:{s.hypernetwork}:{s.strength:g}>"
                                            for sh, c in pairs])):
        styled = studio.txt2img(prompts, 200)
        # The figures' baseline is the plain prompt; the word's grid also shows its prompt read without the word.
        baseline = plain if kind == "hypernetwork" else studio.txt2img(prompts[::4][:8], 200, learned=False, every=4)
        style_rate = hits(styled, [{"background": s.background}] * len(pairs))["all"]
        learned = s.name if kind == "word" else f"<hypernet:{s.hypernetwork}:{s.strength:g}>"
        use = Use(f"style_{kind}", f"Style ({kind})",
                  f"The {kind} {learned}, learned from {s.images} pictures that share only their {s.background} "
                  f"background, applied to objects the prompt names: \"{prompts[0]}\".", {}, [])
        use.figures = {"prompt": prompts[0], "generations": len(prompts), "style": s.background,
                       "style_with": style_rate,
                       "style_plain_prompt": hits(plain, [{"background": s.background}] * len(pairs))["all"],
                       "objects_with": hits(styled, expected), "objects_plain_prompt": hits(plain, expected)}
        use.note = (f"The toy world has no painting styles; the one attribute that different objects can share is "
                    f"the background, so the style is a {s.background} background, and the prompt names the object "
                    "(shape and colour). 'plain prompt' is the prompt without the word or the hypernetwork."
                    + (f" The hypernetwork is applied at strength {s.strength:g}; at strength 1 ('strength 1' "
                       "figures) the style is stronger and the objects suffer: the multiplier tempers it."
                       if kind == "hypernetwork" else ""))
        if kind == "hypernetwork":
            full = studio.txt2img([p.replace(f":{s.strength:g}>", ":1>") for p in prompts], 200)
            use.figures["style_with_strength_1"] = hits(full, [{"background": s.background}] * len(pairs))["all"]
            use.figures["objects_with_strength_1"] = hits(full, expected)
            use.rows.append(("strength 1", full[::4][:8]))
        use.bar(f"{s.background} style present", style_rate, 0.7)
        use.bar("objects as named", use.figures["objects_with"]["all"], 0.8)
        use.rows[:0] = [("without the word" if kind == "word" else "strength 0", baseline if kind == "word" else
                         baseline[::4][:8]), (f"with {learned}", styled[::4][:8])]
        uses.append(use)
    return uses


def measure_variation(studio: Studio) -> Use:
    o = studio.recipes.object
    prompt = f"a {o.name}"
    varied = studio.txt2img([prompt] * SAMPLES, 300)
    without = studio.txt2img([prompt] * 8, 300, learned=False)
    training = [image for image, _ in object_pictures(o)]
    found = classify(varied)
    use = Use("variation", "Image variation",
              f"The word alone, \"{prompt}\": many different pictures of the one object.", {}, [])
    generated_spread, training_spread = pictures.spread(varied), pictures.spread(training)
    use.figures = {"prompt": prompt, "generations": SAMPLES,
                   "concept": hits(varied, [{"shape": o.shape, "colour": o.colour}] * SAMPLES),
                   "spread_generated": generated_spread, "spread_training": training_spread,
                   "backgrounds": dict(Counter(f["background"] for f in found))}
    use.note = ("A toy picture varies only in where its shape sits, its size and its background. The spread is "
                "measured on the pictures' own pixels (the shape's centre and size); the centre-distance ratio is "
                "the mean distance between two generations' centres over that between two training pictures'.")
    use.bar("concept (shape and colour)", use.figures["concept"]["all"], 0.8)
    ratio = generated_spread["centre_distance"] / max(training_spread["centre_distance"], 1e-6)
    use.figures["centre_distance_ratio"] = round(ratio, 4)
    use.bar("positions spread vs the training pictures'", ratio, 0.5)
    use.rows = [("the training pictures", training), (f"\"{prompt}\" without the word", without),
                (f"\"{prompt}\"", varied[:8])]
    return use


def measure_composition(studio: Studio) -> Use:
    o, s = studio.recipes.object, studio.recipes.style
    both = f"a painting of a {o.name} in the style of {s.name}"
    alone = f"a painting of a {o.name}"
    mixed = studio.txt2img([both] * SAMPLES, 400)
    only_object = studio.txt2img([alone] * SAMPLES, 400)
    without = studio.txt2img([both] * 8, 400, learned=False)
    expected = [{"shape": o.shape, "colour": o.colour, "background": s.background}] * SAMPLES
    use = Use("composition", "Concept composition",
              f"Two learned words in one prompt: \"{both}\".", {}, [])
    use.figures = {"prompt": both, "generations": SAMPLES, "both": hits(mixed, expected),
                   "object_alone_prompt": alone,
                   "object_alone": hits(only_object, [{"shape": o.shape, "colour": o.colour}] * SAMPLES)}
    found = use.figures["both"]
    object_and = hits(mixed, [{"shape": o.shape, "colour": o.colour}] * SAMPLES)["all"]
    use.figures["both_object"], use.figures["both_style"] = object_and, found["background"]
    use.note = ("A toy picture holds one shape, so two objects cannot share one; the two words are an object "
                "and a style, as in the paper's \"S* in the style of S**\". The style alone is the style use's "
                "figure.")
    use.bar("object and style both present", found["all"], 0.6)
    use.rows = [("without the words", without), (f"\"{alone}\"", only_object[:8]), (f"\"{both}\"", mixed[:8])]
    return use


def measure_inpaint(studio: Studio) -> Use:
    import numpy as np  # the outside-unchanged check

    o = studio.recipes.object
    sources = world.random_pictures(SAMPLES // 2, 11, {"shape": o.shape, "colour": o.colour})
    cases = [(image, pictures.box_mask(image, padding=MASK_PADDING), f"a {o.name} on a {a.background} background")
             for image, a in sources]
    edited = studio.inpaint(cases, 500)
    plain = studio.inpaint(cases, 500, learned=False)
    expected = [{"shape": o.shape, "colour": o.colour}] * len(edited)
    unchanged = [bool(np.array_equal(np.asarray(result)[np.asarray(cases[k // 2][1]) == 0],
                                     np.asarray(cases[k // 2][0])[np.asarray(cases[k // 2][1]) == 0]))
                 for k, result in enumerate(edited)]
    use = Use("inpaint", "Downstream edit (inpainting)",
              f"The shape's box in toy pictures inpainted with \"a {o.name} on a <its> background\".", {}, [])
    use.figures = {"prompt": cases[0][2], "generations": len(edited), "inside_with_word": hits(edited, expected),
                   "inside_without_word": hits(plain, expected),
                   "outside_unchanged": round(sum(unchanged) / len(unchanged), 4)}
    use.note = (f"The mask is the box around the picture's shape grown by {MASK_PADDING} pixels (mask blur 0, the "
                "original under the mask, denoising 1); 'outside unchanged' compares every pixel outside the mask.")
    use.bar("inside changed to the object", use.figures["inside_with_word"]["all"], 0.8)
    use.bar("outside unchanged (every pixel)", use.figures["outside_unchanged"], 1.0)
    use.rows = [("the pictures", [image for image, _, _ in cases][:8]), ("their masks", [m for _, m, _ in cases][:8]),
                ("without the word", plain[::2][:8]), (f"with {o.name}", edited[::2][:8])]
    return use


def measure_bias(studio: Studio) -> Use:
    b = studio.recipes.balanced
    plain_prompt, word_prompt = f"a {b.shape}", f"a {b.name} {b.shape}"
    plain = studio.txt2img([plain_prompt] * SAMPLES, 600, learned=False)
    fair = studio.txt2img([word_prompt] * SAMPLES, 600)
    kinds = len(world.COLOURS)
    counts = {name: dict(Counter(f["colour"] for f in classify(images))) for name, images in
              (("plain", plain), ("word", fair))}
    use = Use("bias", "Bias reduction",
              f"The plain prompt \"{plain_prompt}\" leaves the colour open and the model answers with a skewed "
              f"distribution of colours; the word {b.name}, learned from {len(balanced_pictures(b))} {b.shape}s "
              f"spread evenly over every colour, answers \"{word_prompt}\" with an even one.", {}, [])
    use.figures = {"prompt_plain": plain_prompt, "prompt_word": word_prompt, "generations": SAMPLES,
                   "colours_plain": counts["plain"], "colours_word": counts["word"],
                   "entropy_plain": normalised_entropy(counts["plain"], kinds),
                   "entropy_word": normalised_entropy(counts["word"], kinds),
                   "shape_word": hits(fair, [{"shape": b.shape}] * SAMPLES)["all"]}
    use.note = ("The toy world has no people; its skew is in colours: with the colour left open the model draws "
                "some colours far more often than others. Normalised entropy: 1 when all six colours come equally "
                "often, 0 when one always does.")
    use.bar("normalised entropy of the colours", use.figures["entropy_word"], 0.9)
    use.rows = [(f"\"{plain_prompt}\"", plain[:8]), (f"\"{word_prompt}\"", fair[:8])]
    return use
