"""Owns turning lm-eval requests into sequences to score: tokens and spans, never audio samples.

The audio is resolved before (``audio/resolver.py``: keyed by content, failures and cuts recorded,
a cascade item's transcript); the planner places each audio's placeholder, expands it to the audio's
token count, cuts to ``max_length``, and for a text twin finds the positions of its spoken text with
the tokenizer's character offsets on the exact string that was encoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

from lmeval_speech import AUDIO_MARKER, twins
from lmeval_speech.audio.resolver import AudioRequestError, AudioResolver, audio_items, audio_key

__all__ = ["AudioRequestError", "Planner", "PromptTokens", "Seq", "audio_items", "audio_key"]

log = logging.getLogger(__name__)


@dataclass
class Seq:
    """One sequence to score: token ids with audio placeholders expanded."""

    index: int  # position in the caller's request list (or window index for rolling)
    tokens: list[int]  # model input (everything but the last token)
    cont: list[int]  # continuation tokens scored at the end of ``tokens``
    audio: list[tuple[int, str, int]] = field(default_factory=list)  # (start, audio key, n positions)
    request: object = None  # the lm-eval Instance
    span: tuple[int, int] | None = None  # text twin: positions of its spoken text
    cut: int = 0  # tokens dropped from the left to fit max_length (the item is marked truncated)
    transcript: str = ""  # a cascade item: the ASR transcripts it reads in place of its audio

    @property
    def speech_positions(self) -> list[int]:
        return [p for start, _, n in self.audio for p in range(start, start + n)]

    @cached_property
    def input_sha256(self) -> str:
        """The model input a captured record comes from: its tokens (prompt, chat template, choice)
        and its audios' content keys (computed once; a sequence is not changed after it is built)."""
        return hashlib.sha256(json.dumps([list(map(int, self.tokens)), [k for _, k, _ in self.audio]]).encode()).hexdigest()

    @property
    def twin_key(self) -> tuple | None:
        """(pair, doc id): what joins a text twin's item with its speech twin's."""
        if self.request is None:
            return None
        return twins.twin_of(self.request.task_name, bool(self.audio)).pair, self.request.doc_id


@dataclass(frozen=True)
class PromptTokens:
    """What the planner needs of the tokenizer side: lm-eval's encoding rules as the model class applies
    them (``tok_encode``, ``_encode_pair``, its BOS rule), its limits, and the backend's audio placeholder."""

    tokenizer: object
    encode: Callable  # tok_encode(string, add_special_tokens=None)
    encode_pair: Callable  # lm-eval's TemplateLM._encode_pair(context, continuation)
    special_token_kwargs: Callable  # (string) -> tokenizer kwargs of lm-eval hf's BOS rule
    prefix_token_id: int
    max_length: int
    audio_placeholder: str
    audio_token_id: int


class Planner:
    """Builds the sequences of one run from its prompt tokenizer and its resolved audio
    (``audio/resolver.py``: content keys, outcomes, transcripts)."""

    def __init__(self, tokens: PromptTokens, audio: AudioResolver):
        self.tok, self.audio = tokens, audio

    # ------------------------------------------------------------------ sequences
    def place_audio(self, context: str, n_audio: int, chat_applied: bool = False) -> str:
        """Swap each ``<audio>`` marker for the backend's placeholder (audio first if none; under a chat
        template, none is an error)."""
        found = context.count(AUDIO_MARKER)
        if found == 0:
            if chat_applied:
                raise ValueError("a speech prompt without an <audio> marker under --apply_chat_template: the audio "
                                 "would go before the template's first turn; put <audio> in the task's doc_to_text")
            return self.tok.audio_placeholder * n_audio + context
        if found != n_audio:
            raise AudioRequestError(f"prompt has {found} {AUDIO_MARKER} markers but the request carries {n_audio} "
                                    "audios (few-shot exemplars have no audio: use --num_fewshot 0 for speech twins)")
        return context.replace(AUDIO_MARKER, self.tok.audio_placeholder)

    def expand(self, tokens: list[int], keys: list[str]):
        """Replace the k-th audio token with n_tokens[keys[k]] copies; return tokens and audio spans."""
        audio_id = self.tok.audio_token_id
        if keys and tokens.count(audio_id) != len(keys):  # the prompt's own text holds the placeholder
            raise AudioRequestError(f"tokenized prompt holds {tokens.count(audio_id)} audio placeholders for "
                                    f"{len(keys)} audios: its text contains the model's audio placeholder "
                                    f"{self.tok.audio_placeholder!r}, which would receive the audio")
        out, spans, k = [], [], 0
        for t in tokens:
            if t == audio_id and k < len(keys):
                n = self.audio.status[keys[k]].n_tokens
                spans.append((len(out), keys[k], n))
                out.extend([audio_id] * n)
                k += 1
            else:
                out.append(t)
        if k != len(keys):
            raise AudioRequestError(f"tokenized prompt holds {k} audio placeholders for {len(keys)} audios")
        return out, spans

    def build(self, index, context, continuation, keys, request=None, want_span=False, chat_applied=False) -> Seq:
        tok = self.tok
        context, keys, transcript = self.audio.heard_as_text(context, keys)  # cascade: each marker becomes its transcript
        if keys:
            # lm-eval's rule moves the context's trailing whitespace into the continuation; it applies to
            # the prompt's own text, never to the placeholder's (Gemma 3n's ends in "\n\n": every choice
            # would be scored with those tokens in front)
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            context = self.place_audio(context, len(keys), chat_applied)
            ctx_enc, whole = tok.encode(context), tok.encode(context + continuation)
            # whole-then-split, as lm-eval; where the context's last token merges with the continuation
            # (whitespace on both sides of the cut), the continuation is encoded on its own instead
            cont_enc = whole[len(ctx_enc):] if whole[: len(ctx_enc)] == ctx_enc \
                else tok.encode(continuation, add_special_tokens=False)
        elif context == "":
            cont_enc = tok.encode(continuation, add_special_tokens=False)
            if not cont_enc or tok.prefix_token_id != cont_enc[0]:
                ctx_enc = [tok.prefix_token_id]
            else:
                ctx_enc, cont_enc = cont_enc[:1], cont_enc[1:]
        else:
            ctx_enc, cont_enc = tok.encode_pair(context, continuation)
        if not cont_enc:  # it would score log p = 0, the best any choice can get (lm-eval's hf asserts too)
            raise ValueError(f"continuation {continuation!r} of context ...{context[-60:]!r} encodes to no token: "
                             "a choice must not be empty (check the task's choices and target_delimiter)")
        whole, spans = self.expand(ctx_enc + cont_enc, keys)
        inp = whole[-(tok.max_length + 1):][:-1]
        cut = len(whole) - 1 - len(inp)
        if cut and spans and spans[0][0] < cut:
            raise AudioRequestError(f"sequence of {len(whole)} tokens exceeds max_length={tok.max_length} inside the "
                                    "audio; raise max_length or shorten the prompt")
        seq = Seq(index, inp, cont_enc, [(s - cut, k, n) for s, k, n in spans], request, cut=cut, transcript=transcript)
        if want_span and not keys and request is not None and context:
            span = self.text_span(context, continuation, ctx_enc, cont_enc, request)
            if span is not None:
                seq.span = (max(0, span[0] - cut), max(0, span[1] - cut))
        return seq

    def text_span(self, context, continuation, ctx_enc, cont_enc, request) -> tuple[int, int] | None:
        """Token positions of the text twin's spoken text: the tokens whose characters overlap the
        last occurrence of ``twins.text_counterpart`` in the context, by the tokenizer's offsets on
        the very string lm-eval's ``_encode_pair`` encoded as the context."""
        target = twins.text_counterpart(request.task_name, request.doc)
        if target is None:
            self._warn_once(f"{request.task_name}: {twins.no_spoken_text(request.task_name)}; until then its "
                            "text twin's states are not captured (no similarity, APS or oracle intervention)")
            return None
        n_spaces = len(context) - len(context.rstrip())
        stripped = context[: len(context) - n_spaces] if n_spaces else context  # as _encode_pair encodes it
        start = stripped.rfind(target)
        if start < 0:
            self._warn_once(f"{request.task_name}: the spoken text is not in its prompt (changed by a chat "
                            "template?); its text twin's states are not captured")
            return None
        end = start + len(target)
        try:
            enc = self.tok.tokenizer(stripped, return_offsets_mapping=True, **self.tok.special_token_kwargs(stripped))
        except (TypeError, NotImplementedError, ValueError) as err:  # e.g. Voxtral's mistral-common tokenizer
            raise ValueError(f"{type(self.tok.tokenizer).__name__} gives no character offsets, which capture and "
                             f"oracle interventions need to find the text twin's question tokens "
                             f"({type(err).__name__}: {err}); run this model without capture= / intervention=") from err
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if list(ctx_enc) == [self.tok.tokenizer.bos_token_id] + ids:  # a BOS the backend requires (Voxtral)
            ids, offsets = [ctx_enc[0]] + ids, [(0, 0)] + offsets
        if ids != list(ctx_enc):
            raise AudioRequestError(f"{request.task_name}: the tokenizer's offsets do not match the scored tokens")
        positions = [i for i, (a, b) in enumerate(offsets) if b > start and a < end and b > a]
        return (positions[0], positions[-1] + 1) if positions else None

    _warned: set = set()

    def _warn_once(self, message: str) -> None:
        if message.split(":")[0] not in Planner._warned:
            Planner._warned.add(message.split(":")[0])
            log.warning(message)


def check_voice_language(tts_override: dict, allow_any: bool, requests, per_request) -> None:
    """A ``tts_voice`` must speak the language of the tasks whose synthesized audio it re-voices
    (``metadata.language``, English by default) unless ``voice_language=any``."""
    from lmeval_speech.audio import TTSSpec
    from lmeval_speech.audio.tts import get_engine
    from lmeval_speech.own_tasks import check_voice_language as check

    voice = tts_override.get("voice")
    voiced = {r.task_name for r, keys in zip(requests, per_request) if any("tts:" in k for k in keys)}
    if not voice or not voiced:
        return
    try:  # a voice the engine lacks, or a rate it cannot speak, stops the run in resolve() with its own error
        get_engine(TTSSpec().with_overrides(**tts_override).engine).check_voice(voice)
    except Exception:  # noqa: BLE001
        return
    check(voice, voiced, allow_any)
