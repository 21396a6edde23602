"""Owns what a run's model hears: each audio item's content key, the run's audio settings (TTS override,
noise, length limit, ASR), each distinct clip loaded once per run (its samples kept until the encoder has
them), the ASR transcript that replaces a cascade item's audio, and each distinct audio's outcome (token
count, failure with its reason, cut).

The model side (``models/plan.py``) receives an :class:`AudioResolver` and deals with tokens and spans
only; the HTML report (``report/clips.py``) rebuilds the samples a model heard with :meth:`AudioResolver.load`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from lmeval_speech import AUDIO_MARKER

from .cache import audio_source, get_audio, resolve_audio
from .noise import BABBLE_SENTENCES, NoiseSpec, mix, noise_for
from .prepare import prepare_audio
from .tts import TTSSpec

log = logging.getLogger(__name__)

#: Prepared clips kept between resolving (where each is loaded to count its tokens) and encoding; past it
#: the oldest are dropped and loaded again when the encoder needs them (counted in ``AudioResolver.loads``).
CLIP_BUDGET_BYTES = 1 << 30


class AudioRequestError(ValueError):
    """A request's audio cannot be used (missing, unreadable, too long, marker mismatch)."""


def audio_key(item) -> str:
    """A stable identity for one audio, from its content (never an object id)."""
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
    """The audio items of one lm-eval request ``(context, continuation[, {"audio": ...}])``."""
    extra = args[2] if len(args) > 2 else None
    items = extra.get("audio") if isinstance(extra, dict) else None
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


@dataclass(frozen=True)
class AudioSettings:
    """The audio part of a run's specification (``lslm``'s model args, or a finished run's recorded settings)."""

    tts_override: dict = field(default_factory=dict)  # engine / voice / rate replacing every task's TTS spec
    noise: NoiseSpec | None = None
    max_audio_seconds: float | None = None  # None: no limit
    audio_overflow: str = "truncate"  # or "error"
    asr: str | None = None  # the run's ASR for every cascade item (audio/asr.effective_spec)
    fail_fast: bool = False

    def to_record(self) -> dict:
        """As a results file records it (``lmeval_speech.settings``; the ASR is recorded per item)."""
        return {"audio_overflow": self.audio_overflow, "max_audio_seconds": self.max_audio_seconds,
                "tts_override": self.tts_override or None, "fail_fast": self.fail_fast,
                "noise": None if self.noise is None else self.noise.to_dict()}

    @classmethod
    def from_record(cls, settings: dict) -> AudioSettings:
        """From a results file's ``lmeval_speech.settings``."""
        noise = settings.get("noise")
        return cls(tts_override=dict(settings.get("tts_override") or {}), noise=NoiseSpec(**noise) if noise else None,
                   max_audio_seconds=settings.get("max_audio_seconds"),
                   audio_overflow=settings.get("audio_overflow") or "truncate", fail_fast=bool(settings.get("fail_fast")))


@dataclass
class AudioStatus:
    """What became of one distinct audio: its token count, or why it is not scored."""

    n_tokens: int | None = None
    error: str = ""
    truncated: str = ""
    notes: dict = field(default_factory=dict)
    transcript: str | None = None  # a cascade item: what the ASR heard (read as text, not as audio)


@dataclass(frozen=True)
class Listener:
    """What the resolver needs of the model that hears: its rate, whether it takes audio, its token count
    for a clip (``count(key, samples)``) and how many encoder windows a clip of n samples takes."""

    sampling_rate: int = 16000
    supports_audio: bool = True
    count: Callable[[str, np.ndarray], int] = lambda key, a: len(a)
    windows: Callable[[int], int] = lambda n: 1
    name: str = "model"


class AudioResolver:
    """Resolves a run's audio once: ``resolve`` loads every distinct clip (synthesizing cache misses), counts
    its tokens and keeps its samples for ``clip`` (the encoder's read), within ``CLIP_BUDGET_BYTES``."""

    def __init__(self, settings: AudioSettings, listener: Listener | None = None, *, progress: bool = True,
                 budget: int = CLIP_BUDGET_BYTES):
        self.settings, self.listener, self.progress, self.budget = settings, listener or Listener(), progress, budget
        self.status: dict[str, AudioStatus] = {}  # audio key -> outcome, for every audio seen
        self.loads: Counter = Counter()  # audio key -> times loaded (1 unless the clip budget was exceeded)
        self._clips: OrderedDict[str, np.ndarray] = OrderedDict()
        self._clip_bytes = 0
        self._babble: dict[str, list] = {}  # TTS spec -> the babble talkers' clips

    # ------------------------------------------------------------------ one clip
    def load(self, item: dict, target_rate: int | None = None, limited: bool = True):
        """(samples at the model's rate, notes) for one audio item after the documented fix-ups: what the
        speech twin hears, and what a cascade twin's ASR transcribes (``target_rate`` 16 kHz).
        ``limited=False``: no length limit (a text-only model's cascade has no speech twin to match)."""
        s = self.settings
        target_rate = target_rate or self.listener.sampling_rate
        array, sr, info = resolve_audio(item, override=s.tts_override or None)
        if s.noise is not None:  # a perturbation sweep: the clean clip plus seeded noise at an SNR
            if info["source"] == "silence":  # the prior control: the noise its speech twin heard, alone
                speech = item["silence_like"]
                clean, _, _ = resolve_audio(speech, override=s.tts_override or None)
                array = noise_for(clean, s.noise, audio_key(speech), self._babble_pool(speech, sr)).astype(np.float32)
            else:
                array = mix(array, s.noise, audio_key(item), self._babble_pool(item, sr))
            info = {**info, "noise": s.noise.to_dict()}
        limit = s.max_audio_seconds if s.audio_overflow == "truncate" and limited else None
        if limited and s.audio_overflow == "error" and s.max_audio_seconds is not None \
                and len(array) > s.max_audio_seconds * sr:
            raise AudioRequestError(f"audio of {len(array) / sr:.1f}s exceeds {s.max_audio_seconds}s "
                                    "(audio_overflow=error)")
        array, fixes = prepare_audio(array, sr, target_rate=target_rate, max_seconds=limit)
        return array, {**info, "fixes": list(info.get("fixes", [])) + fixes, "seconds": len(array) / target_rate}

    def _babble_pool(self, item: dict, rate: int) -> list:
        """The babble talkers: ``noise.BABBLE_SENTENCES`` in the item's TTS voice (after the run's overrides;
        the default voice for recorded audio) at ``rate``. Fixed, so an item's noise does not depend on which
        other items are in the run."""
        if self.settings.noise.kind != "babble":
            return []
        spec = TTSSpec.from_dict(item.get("tts") if "tts_text" in item else None)
        spec = spec.with_overrides(**self.settings.tts_override, sample_rate=rate)
        key = json.dumps(spec.to_dict(), sort_keys=True)
        if key not in self._babble:
            self._babble[key] = [get_audio(text, spec) for text in BABBLE_SENTENCES]
        return self._babble[key]

    def _loaded(self, key: str, item: dict):
        self.loads[key] += 1
        return self.load(item)

    def clip(self, key: str, item: dict) -> np.ndarray:
        """The samples of a resolved audio, for the encoder: the ones ``resolve`` loaded (handed over once:
        the encoder's embeddings are cached by key), loaded again only past the clip budget."""
        if key in self._clips:
            array = self._clips.pop(key)
            self._clip_bytes -= array.nbytes
            return array
        return self._loaded(key, item)[0]

    def _keep(self, key: str, array: np.ndarray) -> None:
        self._clips[key] = array
        self._clip_bytes += array.nbytes
        while self._clip_bytes > self.budget and self._clips:
            self._clip_bytes -= self._clips.popitem(last=False)[1].nbytes

    # ------------------------------------------------------------------ a run's audio
    def resolve(self, items: dict[str, dict]) -> dict[str, AudioStatus]:
        """Resolve every distinct audio once (synthesizing cache misses) and count its tokens.

        A setting of the whole run that cannot work (a missing TTS engine or ASR, an unknown voice, a rate
        the engine cannot speak), or a failure of every audio, stops the run here, before anything is
        scored; a single bad audio is recorded (``fail_fast=True`` stops at it instead).
        """
        from tqdm import tqdm

        from .asr import ASRMissing
        from .tts import TTSEngineMissing, TTSSpecError

        who = self.listener
        if not who.supports_audio and any(it.get("transcribe") is None for it in items.values()):
            raise AudioRequestError(f"{who.name} takes no audio; speech tasks need a speech LLM "
                                    "(see lmeval_speech.models.backends.SPEECH_BACKENDS)")
        todo = {k: v for k, v in items.items() if k not in self.status}
        self._prefetch(todo)
        for key, item in tqdm(todo.items(), desc="Preparing audio", disable=len(todo) < 2 or not self.progress):
            try:
                if item.get("transcribe") is not None:  # cascade twin: the model reads the ASR transcript
                    self.status[key] = self._transcribe(item)
                    continue
                array, notes = self._loaded(key, item)
                n = who.count(key, array)
            except (TTSEngineMissing, TTSSpecError, ASRMissing) as err:  # the same for every item that uses it
                raise type(err)(f"{err} (a setting of the whole run, not of this item; nothing was scored)") from err
            except Exception as err:  # one bad item must not end a long run
                if self.settings.fail_fast:
                    raise
                self.status[key] = AudioStatus(error=f"{type(err).__name__}: {err}")
                log.warning("audio not scored (recorded per item): %s", self.status[key].error)
                continue
            self._keep(key, array)
            truncated = next((f for f in notes["fixes"] if f.startswith("truncated")), "")
            windows = who.windows(len(array))
            if windows > 1:  # encoded as consecutive windows under one placeholder (Qwen2-Audio's card cuts at 30 s)
                notes = {**notes, "encoder_windows": windows}
            self.status[key] = AudioStatus(n_tokens=n, truncated=truncated, notes=notes)
        bad = [self.status[k].error for k in items if self.status[k].error]
        if items and len(bad) == len(items):
            raise AudioRequestError(f"every audio of this run failed ({len(bad)} of {len(items)}); nothing was "
                                    f"scored. First error: {bad[0]}")
        return {k: self.status[k] for k in items}

    def _prefetch(self, items: dict[str, dict]) -> None:
        """Render the synthesized clips the cache lacks, one TTS process per core, before ``resolve`` reads them
        in order (espeak-ng runs as a process: rendered one at a time, one core sat idle). A clip that fails here
        is rendered again in order, where its error is recorded for its item."""
        import os
        from concurrent.futures import ThreadPoolExecutor

        from .cache import AudioCache

        cache, jobs = AudioCache(), {}
        for item in items.values():
            while isinstance(item, dict) and (item.get("transcribe") is not None or item.get("silence_like") is not None):
                item = item["transcribe"] if item.get("transcribe") is not None else item["silence_like"]
            if not isinstance(item, dict) or audio_source(item) != "tts":
                continue
            try:
                spec = TTSSpec.from_dict(item.get("tts")).with_overrides(**self.settings.tts_override)
                path = cache.path_for(item["tts_text"], spec)
            except Exception:  # noqa: BLE001  (an invalid spec or text: its own error, in order)
                continue
            if not path.exists():
                jobs[path] = (item["tts_text"], spec)
        workers = min(len(jobs), os.cpu_count() or 1)
        if workers < 2:
            return

        def render(job):
            try:
                cache.get(*job)
            except Exception:  # noqa: BLE001  (rendered again in order, where the error is recorded)
                pass

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(render, jobs.values()))

    def _transcribe(self, item: dict) -> AudioStatus:
        """The ASR transcribes what the speech twin hears: the same voice override, noise and audio limit
        (``load``), at Whisper's 16 kHz; on a text-only model (an ASR + LLM baseline) the whole clip."""
        from .asr import effective_spec, transcribe

        array, notes = self.load(item["transcribe"], target_rate=16000, limited=self.listener.supports_audio)
        spec = effective_spec(item.get("asr"), self.settings.asr)
        text = transcribe(array, audio_key(item["transcribe"]), spec)
        truncated = next((f for f in notes["fixes"] if f.startswith("truncated")), "")
        return AudioStatus(truncated=truncated, notes={**notes, "asr": spec.to_dict()}, transcript=text)

    # ------------------------------------------------------------------ cascade
    def heard_as_text(self, context: str, keys: list[str]) -> tuple[str, list[str], str]:
        """A cascade request: (context with each ``<audio>`` marker replaced by its transcript, no audio keys
        left, the transcripts joined for the sample log). Other requests come back unchanged, with ""."""
        heard = [k for k in keys if self.status[k].transcript is not None]
        if not heard:
            return context, keys, ""
        if len(heard) != len(keys) or context.count(AUDIO_MARKER) != len(keys):
            raise AudioRequestError("a cascade prompt needs one <audio> marker per transcribed audio")
        for k in keys:
            context = context.replace(AUDIO_MARKER, self.status[k].transcript, 1)
        return context, [], " | ".join(self.status[k].transcript for k in heard)
