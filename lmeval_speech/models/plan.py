"""Owns turning lm-eval requests into sequences to score.

Each distinct audio is resolved once and keyed by its *content* (the TTS reference, a recording's
SHA-256, or a hash of an array's samples, never an object id); an audio that cannot be used is
recorded with its reason and its requests are not scored; a cut audio is recorded with a note. A
sequence carries its tokens, each audio's positions, and for a text twin the positions of its
spoken text, found with the tokenizer's character offsets on the exact string that was encoded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from lmeval_speech import AUDIO_MARKER, twins

log = logging.getLogger(__name__)


class AudioRequestError(ValueError):
    """A request's audio cannot be used (missing, unreadable, too long, marker mismatch)."""


def audio_key(item) -> str:
    """A stable identity for one audio, from its content."""
    from lmeval_speech.audio.cache import audio_source

    if not isinstance(item, dict):
        raise AudioRequestError(f"an audio item must be a dict, got {type(item).__name__}")
    source = audio_source(item)  # resolve_audio's order: an item is keyed by the audio it is resolved to
    if source == "silence":
        return "silence:" + audio_key(item["silence_like"])
    if item.get("transcribe") is not None:
        return "asr:" + json.dumps([audio_key(item["transcribe"]), item.get("asr")], sort_keys=True)
    if source == "array":
        a = np.ascontiguousarray(item["array"])
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}{item.get('sampling_rate')}".encode())
        h.update(a.tobytes())
        return f"array:{h.hexdigest()}"
    if source == "tts":
        return "tts:" + json.dumps({"t": item["tts_text"], "s": item.get("tts")}, sort_keys=True)
    if source == "file":
        try:
            with open(item["path"], "rb") as f:
                return f"file:{hashlib.file_digest(f, 'sha256').hexdigest()}"
        except OSError:
            return f"path:{item['path']}"  # unreadable: it fails (with its path) when resolved
    if source == "recorded":
        return f"recorded:{item['recorded']}"
    raise AudioRequestError(f"audio item has none of 'array', 'path', 'recorded', 'tts_text': keys {sorted(item)}")


def audio_items(args) -> list[dict]:
    extra = args[2] if len(args) > 2 else None
    items = extra.get("audio") if isinstance(extra, dict) else None
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


@dataclass
class AudioStatus:
    """What became of one distinct audio: its token count, or why it is not scored."""

    n_tokens: int | None = None
    error: str = ""
    truncated: str = ""
    notes: dict = field(default_factory=dict)
    transcript: str | None = None  # a cascade item: what the ASR heard (read as text, not as audio)


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


class Planner:
    """Resolves audio and builds sequences for one ``lslm`` instance (its backend and settings)."""

    def __init__(self, lm):
        self.lm = lm
        self.status: dict[str, AudioStatus] = {}  # audio key -> outcome, for every audio seen
        self._babble: dict[str, list] = {}  # TTS spec -> the babble talkers' clips

    # ------------------------------------------------------------------ audio
    def load(self, item: dict, target_rate: int | None = None, limited: bool = True):
        """(array at the backend's rate, notes) for one audio item, after the documented fix-ups: what
        the speech twin hears, and what a cascade twin's ASR transcribes (``target_rate`` 16 kHz).
        ``limited=False``: no audio limit (a text-only model's cascade has no speech twin to match)."""
        from lmeval_speech.audio import prepare_audio, resolve_audio

        lm, b = self.lm, self.lm.backend_impl
        target_rate = target_rate or b.sampling_rate
        array, sr, info = resolve_audio(item, override=lm.tts_override or None)
        if lm.noise is not None:  # a perturbation sweep: the clean clip plus seeded noise at an SNR
            from lmeval_speech.audio.noise import mix, noise_for

            if info["source"] == "silence":  # the prior control: the noise its speech twin heard, alone
                speech = item["silence_like"]
                clean, _, _ = resolve_audio(speech, override=lm.tts_override or None)
                array = noise_for(clean, lm.noise, audio_key(speech), self._babble_pool(speech, sr)).astype(np.float32)
            else:
                array = mix(array, lm.noise, audio_key(item), self._babble_pool(item, sr))
            info = {**info, "noise": lm.noise.to_dict()}
        limit = lm.max_audio_seconds if lm.audio_overflow == "truncate" and limited else None
        if limited and lm.audio_overflow == "error" and len(array) > lm.max_audio_seconds * sr:
            raise AudioRequestError(f"audio of {len(array) / sr:.1f}s exceeds {lm.max_audio_seconds}s "
                                    "(audio_overflow=error)")
        array, fixes = prepare_audio(array, sr, target_rate=target_rate, max_seconds=limit)
        return array, {**info, "fixes": list(info.get("fixes", [])) + fixes, "seconds": len(array) / target_rate}

    def _babble_pool(self, item: dict, rate: int) -> list:
        """The babble talkers: ``noise.BABBLE_SENTENCES`` in the item's TTS voice (after the model's
        overrides; the default voice for recorded audio) at ``rate``. Fixed, so an item's noise does
        not depend on which other items are in the run."""
        if self.lm.noise.kind != "babble":
            return []
        from lmeval_speech.audio import TTSSpec, get_audio
        from lmeval_speech.audio.noise import BABBLE_SENTENCES

        spec = TTSSpec.from_dict(item.get("tts") if "tts_text" in item else None)
        spec = spec.with_overrides(**(self.lm.tts_override or {}), sample_rate=rate)
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self._babble:
            self._babble[key] = [get_audio(text, spec) for text in BABBLE_SENTENCES]
        return self._babble[key]

    def check_voice_language(self, requests, per_request) -> None:
        """A ``tts_voice`` must speak the language of the tasks whose synthesized audio it re-voices
        (``metadata.language``, English by default) unless ``voice_language=any``."""
        from lmeval_speech.audio import TTSSpec
        from lmeval_speech.audio.tts import get_engine
        from lmeval_speech.own_tasks import check_voice_language

        voice = self.lm.tts_override.get("voice")
        voiced = {r.task_name for r, keys in zip(requests, per_request) if any("tts:" in k for k in keys)}
        if not voice or not voiced:
            return
        try:  # a voice the engine lacks, or a rate it cannot speak, stops the run in resolve() with its own error
            get_engine(TTSSpec().with_overrides(**self.lm.tts_override).engine).check_voice(voice)
        except Exception:  # noqa: BLE001
            return
        check_voice_language(voice, voiced, self.lm.voice_language == "any")

    def resolve(self, items: dict[str, dict]) -> dict[str, AudioStatus]:
        """Resolve every distinct audio once (synthesizing cache misses) and count its tokens.

        A setting of the whole run that cannot work (a missing TTS engine or ASR, an unknown voice, a
        rate the engine cannot speak), or a failure of every audio, stops the run here, before anything
        is scored; a single bad audio is recorded (``fail_fast=True`` stops at it instead).
        """
        from tqdm import tqdm

        from lmeval_speech.audio import TTSEngineMissing
        from lmeval_speech.audio.asr import ASRMissing
        from lmeval_speech.audio.tts import TTSSpecError

        lm, b = self.lm, self.lm.backend_impl
        if not b.supports_audio and any(it.get("transcribe") is None for it in items.values()):
            raise AudioRequestError(
                f"{type(b).__name__} ({lm.pretrained}) takes no audio; speech tasks need a speech LLM "
                "(see lmeval_speech.models.backends.SPEECH_BACKENDS)")
        todo = {k: v for k, v in items.items() if k not in self.status}
        content_dependent = getattr(b, "content_dependent_audio_tokens", False)
        for key, item in tqdm(todo.items(), desc="Preparing audio", disable=len(todo) < 2 or lm.rank != 0):
            try:
                if item.get("transcribe") is not None:  # cascade twin: the model reads the ASR transcript
                    self.status[key] = self._transcribe(item)
                    continue
                array, notes = self.load(item)
                n = lm.embeddings.count(key, array) if content_dependent else b.count_tokens(len(array))
            except (TTSEngineMissing, TTSSpecError, ASRMissing) as err:  # the same for every item that uses it
                raise type(err)(f"{err} (a setting of the whole run, not of this item; nothing was scored)") from err
            except Exception as err:  # one bad item must not end a long run
                if lm.fail_fast:
                    raise
                self.status[key] = AudioStatus(error=f"{type(err).__name__}: {err}")
                log.warning("audio not scored (recorded per item): %s", self.status[key].error)
                continue
            truncated = next((f for f in notes["fixes"] if f.startswith("truncated")), "")
            windows = len(b._segments(len(array)))
            if windows > 1:  # encoded as consecutive windows under one placeholder (Qwen2-Audio's card cuts at 30 s)
                notes = {**notes, "encoder_windows": windows}
            self.status[key] = AudioStatus(n_tokens=n, truncated=truncated, notes=notes)
        bad = [self.status[k].error for k in items if self.status[k].error]
        if items and len(bad) == len(items):
            raise AudioRequestError(f"every audio of this run failed ({len(bad)} of {len(items)}); nothing was "
                                    f"scored. First error: {bad[0]}")
        return {k: self.status[k] for k in items}

    def _transcribe(self, item: dict) -> AudioStatus:
        """The ASR transcribes what the speech twin hears: the same voice override, noise and audio
        limit (``load``), at Whisper's 16 kHz; on a text-only model (an ASR + LLM baseline) the
        whole clip."""
        from lmeval_speech.audio.asr import effective_spec, transcribe

        array, notes = self.load(item["transcribe"], target_rate=16000, limited=self.lm.backend_impl.supports_audio)
        spec = effective_spec(item.get("asr"), getattr(self.lm, "asr", None))  # the run's asr= model arg, if any
        text = transcribe(array, audio_key(item["transcribe"]), spec)
        truncated = next((f for f in notes["fixes"] if f.startswith("truncated")), "")
        return AudioStatus(truncated=truncated, notes={**notes, "asr": spec.to_dict()}, transcript=text)

    # ------------------------------------------------------------------ sequences
    def place_audio(self, context: str, n_audio: int) -> str:
        """Swap each ``<audio>`` marker for the backend's placeholder (audio first if none)."""
        b = self.lm.backend_impl
        found = context.count(AUDIO_MARKER)
        if found == 0:
            if self.lm._chat_applied:
                raise ValueError("a speech prompt without an <audio> marker under --apply_chat_template: the audio "
                                 "would go before the template's first turn; put <audio> in the task's doc_to_text")
            return b.audio_placeholder * n_audio + context
        if found != n_audio:
            raise AudioRequestError(f"prompt has {found} {AUDIO_MARKER} markers but the request carries {n_audio} "
                                    "audios (few-shot exemplars have no audio: use --num_fewshot 0 for speech twins)")
        return context.replace(AUDIO_MARKER, b.audio_placeholder)

    def expand(self, tokens: list[int], keys: list[str]):
        """Replace the k-th audio token with n_tokens[keys[k]] copies; return tokens and audio spans."""
        audio_id = self.lm.backend_impl.audio_token_id
        if keys and tokens.count(audio_id) != len(keys):  # the prompt's own text holds the placeholder
            raise AudioRequestError(f"tokenized prompt holds {tokens.count(audio_id)} audio placeholders for "
                                    f"{len(keys)} audios: its text contains the model's audio placeholder "
                                    f"{self.lm.backend_impl.audio_placeholder!r}, which would receive the audio")
        out, spans, k = [], [], 0
        for t in tokens:
            if t == audio_id and k < len(keys):
                n = self.status[keys[k]].n_tokens
                spans.append((len(out), keys[k], n))
                out.extend([audio_id] * n)
                k += 1
            else:
                out.append(t)
        if k != len(keys):
            raise AudioRequestError(f"tokenized prompt holds {k} audio placeholders for {len(keys)} audios")
        return out, spans

    def build(self, index, context, continuation, keys, request=None, want_span=False) -> Seq:
        lm = self.lm
        heard = [k for k in keys if self.status[k].transcript is not None]
        if heard:  # cascade: each marker becomes its transcript, and the sequence is text only
            if len(heard) != len(keys) or context.count(AUDIO_MARKER) != len(keys):
                raise AudioRequestError("a cascade prompt needs one <audio> marker per transcribed audio")
            for k in keys:
                context = context.replace(AUDIO_MARKER, self.status[k].transcript, 1)
            keys = []
        if keys:
            # lm-eval's rule moves the context's trailing whitespace into the continuation; it applies to
            # the prompt's own text, never to the placeholder's (Gemma 3n's ends in "\n\n": every choice
            # would be scored with those tokens in front)
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            context = self.place_audio(context, len(keys))
            ctx_enc, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
            # whole-then-split, as lm-eval; where the context's last token merges with the continuation
            # (whitespace on both sides of the cut), the continuation is encoded on its own instead
            cont_enc = whole[len(ctx_enc):] if whole[: len(ctx_enc)] == ctx_enc \
                else lm.tok_encode(continuation, add_special_tokens=False)
        elif context == "":
            cont_enc = lm.tok_encode(continuation, add_special_tokens=False)
            if not cont_enc or lm.prefix_token_id != cont_enc[0]:
                ctx_enc = [lm.prefix_token_id]
            else:
                ctx_enc, cont_enc = cont_enc[:1], cont_enc[1:]
        else:
            ctx_enc, cont_enc = lm._encode_pair(context, continuation)
        if not cont_enc:  # it would score log p = 0, the best any choice can get (lm-eval's hf asserts too)
            raise ValueError(f"continuation {continuation!r} of context ...{context[-60:]!r} encodes to no token: "
                             "a choice must not be empty (check the task's choices and target_delimiter)")
        whole, spans = self.expand(ctx_enc + cont_enc, keys)
        inp = whole[-(lm.max_length + 1):][:-1]
        cut = len(whole) - 1 - len(inp)
        if cut and spans and spans[0][0] < cut:
            raise AudioRequestError(f"sequence of {len(whole)} tokens exceeds max_length={lm.max_length} inside the "
                                    "audio; raise max_length or shorten the prompt")
        seq = Seq(index, inp, cont_enc, [(s - cut, k, n) for s, k, n in spans], request, cut=cut)
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
            enc = self.lm.tokenizer(stripped, return_offsets_mapping=True, **self.lm.special_token_kwargs(stripped))
        except (TypeError, NotImplementedError, ValueError) as err:  # e.g. Voxtral's mistral-common tokenizer
            raise ValueError(f"{type(self.lm.tokenizer).__name__} gives no character offsets, which capture and "
                             f"oracle interventions need to find the text twin's question tokens "
                             f"({type(err).__name__}: {err}); run this model without capture= / intervention=") from err
        ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
        if list(ctx_enc) == [self.lm.tokenizer.bos_token_id] + ids:  # a BOS the backend requires (Voxtral)
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
