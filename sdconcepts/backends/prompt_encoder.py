"""How prompts become the UNet's conditioning with A1111's semantics, SD 1/2 and SDXL: 75-token chunks, emphasis,
clip skip, and embeddings placed at their token positions (SDXL: the clip_l and clip_g halves each in its own
encoder)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from sdconcepts.backends.loaded_model import LoadedModel
from sdconcepts.backends.tokenizer import BOS_ID, EOS_ID
from sdconcepts.generation import GenerationError
from sdconcepts.limits import MAX_PROMPT_CHARS, MAX_PROMPT_CHUNKS
from sdconcepts.prompts.chunks import EmbeddingEntry, PromptChunk, build_chunks, build_embedding_index

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
        """A1111's chunks of ``text``; GenerationError for a text over the prompt limits (``sdconcepts.limits``),
        checked before tokenizing and before anything is encoded: BREAK × 50,000 ended in an allocator traceback."""
        if len(text) > MAX_PROMPT_CHARS:
            raise GenerationError(f"a prompt of {len(text)} characters; at most {MAX_PROMPT_CHARS} are read")
        chunks, count = self._build(text)
        if len(chunks) > MAX_PROMPT_CHUNKS:
            raise GenerationError(
                f"a prompt of {len(chunks)} chunks of 75 tokens; at most {MAX_PROMPT_CHUNKS} are encoded "
                "(BREAK starts a new chunk)"
            )
        return chunks, count

    def _build(self, text: str) -> tuple[list[PromptChunk], int]:
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
