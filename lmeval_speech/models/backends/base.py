"""What the ``lslm`` adapter needs from one architecture family, and nothing more.

The adapter runs every model the same way: token embeddings, with each audio's *speech token
embeddings* (the adapter/projector output that enters the LLM) scattered over that audio's
placeholder tokens, then the LLM decoder, then the LM head on the positions that are scored.
Splitting the forward pass there is what lets the adapter

* encode each item's audio once for all its answer choices (MMLU: 4 continuations, 1 encoder pass),
* capture hidden states at known speech/text positions, and
* edit speech token embeddings (interventions) without touching the model's code.

A backend says how its family builds those speech embeddings and where its decoder, layers and
LM head are. One small class per family; no shared if/elif ladder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch


@dataclass
class DecoderOutput:
    last_hidden: torch.Tensor  # [B, T, D]
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings + one per layer, when asked (tests only)
    past: object = None  # the decoder's key/value cache, when asked (``use_cache=True``)
    next_position: torch.Tensor | None = None  # [B] position id of the token after each row's last


def select_rows(cache, rows: torch.Tensor):
    """A new ``DynamicCache`` holding ``cache``'s batch rows ``rows`` (repeats allowed), so several
    continuations can extend one shared prefix without copying it into each other."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, rows), layer.values.index_select(0, rows))
                                        for layer in cache.layers])


def length_dependent_rope(config) -> bool:
    """The config's RoPE picks its frequencies from the pass's longest position (``longrope``, ``dynamic``:
    transformers' ``dynamic_rope_update``), in the model's config or its text config."""
    for cfg in (config, getattr(config, "text_config", None)):
        params = getattr(cfg, "rope_parameters", None) or {}
        for p in (params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]):
            kind = str(p.get("rope_type", p.get("type", "")))
            if kind == "longrope" or "dynamic" in kind:
                return True
    return False


class Backend:
    """Base class: a text-only causal LM (no audio). Speech families override the audio part."""

    #: Text that stands for one audio in a prompt; the tokenizer must map it to tokens that
    #: include ``audio_token_id`` exactly once.
    audio_placeholder: ClassVar[str | None] = None
    sampling_rate: ClassVar[int] = 16000
    #: Longest audio one placeholder can hold; longer audio is cut (and flagged per item) or refused.
    max_audio_seconds: ClassVar[float] = 30.0
    #: Encoder window: a longer clip is encoded as consecutive windows of this length, concatenated
    #: in order under its one placeholder (``None``: the encoder takes the clip whole).
    segment_seconds: ClassVar[float | None] = None
    #: Every prompt starts with the tokenizer's BOS (added when its tokenizer does not add it itself).
    requires_bos: ClassVar[bool] = False
    #: The model behaves differently for audio and text inputs (Granite's speech LoRA): batches never
    #: mix the two, and ``set_modality`` is called before each one.
    modality_dependent: ClassVar[bool] = False
    #: ``run_decoder(use_cache=True)`` + ``run_continuation`` give the whole-sequence numbers, so the
    #: runner may score an item's choices from one pass over their context (tested per backend in
    #: tests/test_prefix_cache.py); a backend that is not tested that way sets False.
    supports_prefix_cache: ClassVar[bool] = True
    #: With prefix sharing, a batch's continuations run as one packed row per prefix (``run_packed``: a 4D
    #: attention mask, positions restarting per continuation) rather than one row per continuation holding a
    #: copy of its prefix's cache; tested against the whole sequences per backend (tests/test_prefix_cache.py).
    packed_continuations: ClassVar[bool] = True
    #: Scores do not depend on which other sequences share a batch. False where the RoPE frequencies are
    #: chosen from the longest position of the pass (``length_dependent_rope``): each sequence then runs alone.
    batch_independent: ClassVar[bool] = True

    #: The system prompt of the model card's own examples, rendered under ``--apply_chat_template``
    #: (``None``: the chat template's default); see ``models/chat.py``.
    card_system_prompt: ClassVar[str | None] = None
    #: Text a processor's chat template writes for one audio, when it is not ``audio_placeholder``.
    chat_audio_token: ClassVar[str | None] = None
    #: Decoder layers output several streams ``[S, B, T, D]`` (Gemma 3n's AltUp): the one that is the layer's
    #: hidden state for capture and interventions (``None``: layers output ``[B, T, D]``).
    layer_output_stream: int | None = None
    #: ``generate`` needs the prompt's token ids (``prompt_ids``) besides its embeddings.
    generate_needs_ids: ClassVar[bool] = False

    def set_modality(self, has_audio: bool) -> None:
        """Put the model in its state for audio (True) or text-only (False) inputs."""

    def generate(self, prompt_ids=None, **kwargs):
        """``generate`` from ``inputs_embeds`` (speech already scattered in); ``prompt_ids`` only when
        ``generate_needs_ids``."""
        return self.language_model.generate(**kwargs)

    def __init__(self, model, tokenizer, processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        if length_dependent_rope(getattr(model, "config", None)):
            # Phi-4's LongRoPE: short factors while the pass's longest position is below the switch, long ones
            # past it, for every row. A cached prefix below the switch, or a short row batched with a long one,
            # would get other frequencies than the sequence run alone (the model's own forward on it).
            self.supports_prefix_cache = False
            self.batch_independent = False

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, *, dtype, revision=None, trust_remote_code=False, **load):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, **load
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code
        )
        return cls(model, tokenizer)

    # ---- structure -----------------------------------------------------------------------
    @property
    def supports_audio(self) -> bool:
        return self.audio_placeholder is not None

    @property
    def audio_token_id(self) -> int | None:
        return None

    @property
    def language_model(self) -> torch.nn.Module:
        """The causal LM (decoder + head) that consumes ``inputs_embeds``."""
        return self.model

    @property
    def decoder(self) -> torch.nn.Module:
        return self.language_model.model

    @property
    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.decoder.layers)

    @property
    def final_norm(self) -> torch.nn.Module | None:
        """The decoder's final norm, whose output is ``last_hidden``: the site of the last
        hidden-state index for capture and interventions (``lmeval_speech.hooks``). ``norm`` in every
        supported family (Llama, Qwen2, Granite, Qwen2.5-Omni thinker's text model, Voxtral's Llama,
        the embedded model's Llama); a family that names it otherwise overrides this."""
        norm = getattr(self.decoder, "norm", None)
        if not isinstance(norm, torch.nn.Module):
            raise AttributeError(f"{type(self).__name__}: decoder {type(self.decoder).__name__} has no final norm "
                                 "attribute `norm`; override Backend.final_norm")
        return norm

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def run_decoder(self, inputs_embeds, attention_mask, input_ids, output_hidden_states=False,
                    use_cache=False) -> DecoderOutput:
        """The decoder on right-padded rows; with ``use_cache`` also its cache and each row's next
        position, for ``run_continuation``. The adapter never asks for ``output_hidden_states``
        (capture reads through ``lmeval_speech.hooks``); tests do, to compare."""
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=use_cache,
        )
        return DecoderOutput(out.last_hidden_state, out.hidden_states if output_hidden_states else None,
                             out.cache if use_cache else None,
                             attention_mask.sum(-1) if use_cache else None)

    def continuation_positions(self, start: torch.Tensor, width: int) -> torch.Tensor:
        """Position ids of ``width`` text tokens following positions ``start`` ([B])."""
        return start[:, None] + torch.arange(width, device=start.device)[None]

    def run_continuation(self, prefix: DecoderOutput, prefix_mask, rows, input_ids, attention_mask) -> torch.Tensor:
        """Last hidden states of text tokens ``input_ids`` [N, C] (right-padded, ``attention_mask``)
        appended to the cached prefix rows ``rows`` [N] of ``prefix``: the same numbers as running
        prefix + tokens from scratch, without recomputing the prefix for each continuation."""
        out = self.decoder(
            inputs_embeds=self.embed_tokens(input_ids),
            attention_mask=torch.cat([prefix_mask.index_select(0, rows), attention_mask], dim=1),
            position_ids=self.continuation_positions(prefix.next_position.index_select(0, rows), input_ids.shape[1]),
            cache=select_rows(prefix.past, rows),
            use_cache=True,
        )
        return out.last_hidden_state

    def run_packed(self, prefix: DecoderOutput, prefix_mask, input_ids, segments, offsets, rows=None) -> torch.Tensor:
        """Last hidden states of every continuation of a batch in one pass: row r of ``input_ids`` [B, W]
        holds the text tokens of prefix row r's continuations back to back (``segments`` [B, W]: which
        continuation each token belongs to, -1 for padding; ``offsets``: each token's index inside its
        continuation). A 4D mask lets each token see its prefix and the earlier tokens of its own
        continuation only, and positions restart after the prefix for each continuation: the numbers of
        ``run_continuation``, with one row per prefix instead of a copy of the prefix's cache per
        continuation. ``rows`` [B]: the prefix row of each packed row (repeats allowed: a copy of those
        rows' cache); ``None``: row r extends prefix row r, whose cache is extended in place (used once)."""
        bsz, width = input_ids.shape
        cache, start = prefix.past, prefix.next_position
        if rows is not None:
            cache, start, prefix_mask = select_rows(cache, rows), start.index_select(0, rows), prefix_mask.index_select(0, rows)
        seg, offsets = segments.to(prefix_mask.device), offsets.to(prefix_mask.device)
        idx = torch.arange(width, device=seg.device)
        own = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & (idx[:, None] >= idx[None, :])
        own = own | torch.eye(width, dtype=torch.bool, device=seg.device)  # padding sees itself: no NaN rows
        seen = torch.cat([prefix_mask.bool()[:, None, :].expand(bsz, width, -1), own], dim=2)[:, None]
        # additive (0 where seen, the dtype's minimum elsewhere): what eager attention adds to its scores and
        # SDPA takes as a float mask (a boolean mask would be added as 0/1 by eager attention)
        embeds = self.embed_tokens(input_ids)
        mask = torch.zeros(seen.shape, dtype=embeds.dtype, device=seen.device).masked_fill(~seen, torch.finfo(embeds.dtype).min)
        positions = self.continuation_positions(start, width)
        positions = positions.gather(-1, offsets.expand_as(positions))
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.last_hidden_state

    @property
    def packs(self) -> bool:
        """Whether ``run_packed`` may be used: the family allows it and its attention takes a 4D additive mask
        as given (eager, SDPA; not FlashAttention or flex attention, which build their own)."""
        config = self.language_model.config
        impl = getattr(getattr(config, "text_config", None) or config, "_attn_implementation", None) or "eager"
        return self.packed_continuations and impl in {"eager", "sdpa"}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_output_embeddings()(hidden)

    # ---- audio ---------------------------------------------------------------------------
    def num_audio_tokens(self, num_samples: int) -> int:
        """Speech positions of one clip of ``num_samples`` (within one encoder window)."""
        raise NotImplementedError(f"{type(self).__name__} takes no audio")

    def encode_audio(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Speech token embeddings ``[n_i, D]`` for each 16 kHz mono array (within one window)."""
        raise NotImplementedError(f"{type(self).__name__} takes no audio")

    def _segments(self, num_samples: int) -> list[tuple[int, int]]:
        if not self.segment_seconds:
            return [(0, num_samples)]
        step = int(self.segment_seconds * self.sampling_rate)
        return [(a, min(a + step, num_samples)) for a in range(0, max(num_samples, 1), step)]

    def count_tokens(self, num_samples: int) -> int:
        """Speech positions of a clip of any accepted length: the sum over its encoder windows."""
        return sum(self.num_audio_tokens(b - a) for a, b in self._segments(num_samples))

    def encode(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Speech embeddings of clips of any accepted length: each window encoded, concatenated in order."""
        pieces, owner = [], []
        for i, a in enumerate(arrays):
            for lo, hi in self._segments(len(a)):
                pieces.append(a[lo:hi])
                owner.append(i)
        encoded = self.encode_audio(pieces)
        out = [[] for _ in arrays]
        for i, e in zip(owner, encoded, strict=True):
            out[i].append(e)
        return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in out]



class ComposedSpeechBackend(Backend):
    """transformers' composite speech-LLM layout (Qwen2-Audio, Qwen2.5-Omni thinker, Voxtral,
    Granite Speech): ``model.model.language_model`` is the decoder, ``model.lm_head`` the head,
    ``config.audio_token_id`` the placeholder id and ``config.text_config`` the LLM's config."""

    @property
    def audio_token_id(self) -> int:
        return self.model.config.audio_token_id

    @property
    def decoder(self):
        return self.model.model.language_model

    def embed_tokens(self, input_ids):
        return self.model.get_input_embeddings()(input_ids)

    def logits(self, hidden):
        return self.model.lm_head(hidden)


class WhisperStyleBackend(Backend):
    """Families whose encoder eats one 30 s log-mel window padded to 3000 frames, halved by a
    stride-2 conv and (optionally) pooled again: Qwen2-Audio, Qwen2.5-Omni, the mini model."""

    feature_extractor_attr: ClassVar[str] = "feature_extractor"

    @property
    def feature_extractor(self):
        return getattr(self.processor, self.feature_extractor_attr)

    def mel_features(self, arrays: list[np.ndarray]):
        fe = self.feature_extractor
        feats = fe(
            [np.asarray(a, dtype=np.float32) for a in arrays],
            sampling_rate=self.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return feats["input_features"], feats["attention_mask"]


class MRopeBackend:
    """Mixin for decoders with three-row multimodal RoPE position ids (Qwen2.5-Omni, Qwen3-Omni
    thinkers): the backend gives the ids of a fresh forward (``rope_positions``); text after a
    cached prefix continues from the prefix's largest position, on all three rows."""

    def rope_positions(self, input_ids, attention_mask) -> torch.Tensor:
        raise NotImplementedError

    def run_decoder(self, inputs_embeds, attention_mask, input_ids, output_hidden_states=False,
                    use_cache=False) -> DecoderOutput:
        position_ids = self.rope_positions(input_ids, attention_mask)
        out = self.decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=output_hidden_states,
            use_cache=use_cache,
        )
        nxt = None
        if use_cache:
            last = attention_mask.sum(-1) - 1
            nxt = position_ids[:, torch.arange(len(last), device=last.device), last].max(0).values + 1
        return DecoderOutput(out.last_hidden_state, out.hidden_states if output_hidden_states else None,
                             out.cache if use_cache else None, nxt)

    def continuation_positions(self, start, width):
        return super().continuation_positions(start, width)[None].expand(3, -1, -1)
