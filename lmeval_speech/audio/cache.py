"""Content-addressed on-disk TTS cache, and the entry points that go through it.

Layout: ``<cache_dir>/ab/abcdef....pcm``, the name being the sha256 of a canonical JSON of
(text, engine, engine version, voice, rate, sample_rate); nothing derived from the text reaches a
path, so no text can escape the cache dir. Each file is a one-line JSON header (format, key,
sample rate, frame count, CRC-32 of the samples) followed by the raw 16-bit little-endian PCM
(ample for speech, and the exact samples a miss returns, so hits and misses are bit-identical).
A hit is one read and a CRC-32, no decoding: ~0.1 ms for a 6 s clip, where FLAC decoding cost
~1.6 ms (``benchmarks/bench_tts.py``). A truncated or overwritten file is detected (header or
length or checksum mismatch), logged, deleted and re-synthesized, never used. Caches written by
earlier versions (``.flac`` files holding a sha256 in their Vorbis comment) are still read,
checked the same way, and rewritten in the new format on first use.

Writes go to a temp file in the target directory, then ``os.replace``: readers never see a partial
file, and two processes rendering the same key both succeed (the last replace wins; both are valid).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from lmeval_speech.fileio import atomic_write

from .prepare import AudioError, prepare_audio
from .spoken_form import VERSION as SPOKEN_FORM_VERSION
from .tts import TTSSpec, check_text, get_engine, render

log = logging.getLogger(__name__)

_STATS = {"hits": 0, "misses": 0, "corrupt": 0}  # process-wide, for the model adapter to log


def cache_stats() -> dict:
    """Counters since process start: {"hits", "misses", "corrupt"} (corrupt files are also misses)."""
    return dict(_STATS)


def default_cache_dir() -> Path:
    """``$LMEVAL_SPEECH_CACHE``, else ``$XDG_CACHE_HOME/lmeval_speech/audio``, else ``~/.cache/...``."""
    if os.environ.get("LMEVAL_SPEECH_CACHE"):
        return Path(os.environ["LMEVAL_SPEECH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lmeval_speech" / "audio"


def cache_key(text: str, spec: TTSSpec) -> str:
    """Hex sha256 naming the audio; the engine's and the spoken-form rules' versions are in it, so
    an upgrade of either re-renders."""
    payload = {"text": text, "engine": spec.engine, "engine_version": get_engine(spec.engine).version(),
               "voice": spec.voice, "rate": spec.rate, "sample_rate": spec.sample_rate,
               "spoken_form": SPOKEN_FORM_VERSION}
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _digest(pcm: np.ndarray) -> str:
    return hashlib.sha256(pcm.astype("<i2", copy=False).tobytes()).hexdigest()


class AudioCache:
    """The TTS cache under one directory (``None``: :func:`default_cache_dir`)."""

    def __init__(self, root=None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    MAGIC = "lmeval-speech-pcm16"

    def path_for(self, text: str, spec: TTSSpec) -> Path:
        key = cache_key(text, spec)
        return self.root / key[:2] / f"{key}.pcm"

    def get(self, text: str, spec: TTSSpec) -> tuple[np.ndarray, bool]:
        """(float32 mono at spec.sample_rate, whether it was a cache hit)."""
        get_engine(spec.engine).check_voice(spec.voice)  # before the cache: a hit is refused too
        path = self.path_for(check_text(text), spec)
        pcm = self._load(path, spec)
        if pcm is None:  # a cache written by an earlier version: FLAC, migrated on first use
            pcm = self._load_flac(path.with_suffix(".flac"), spec)
            if pcm is not None:
                self._store(path, pcm, spec.sample_rate)
                path.with_suffix(".flac").unlink(missing_ok=True)
        if pcm is not None:
            _STATS["hits"] += 1
            return pcm.astype(np.float32) / np.float32(32768), True
        audio = render(text, spec)
        pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
        self._store(path, pcm, spec.sample_rate)
        _STATS["misses"] += 1
        return pcm.astype(np.float32) / np.float32(32768), False

    @staticmethod
    def _corrupt(path: Path, err) -> None:
        log.warning("corrupt audio cache file %s (%s): deleting it and re-synthesizing", path, err)
        path.unlink(missing_ok=True)
        _STATS["corrupt"] += 1

    @classmethod
    def _load(cls, path: Path, spec: TTSSpec) -> np.ndarray | None:
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            head, sep, body = blob.partition(b"\n")
            if not sep:
                raise ValueError("no header")
            meta = json.loads(head)
            if meta.get("format") != cls.MAGIC or meta["key"] != path.stem:
                raise ValueError("not this key's audio")
            if meta["sample_rate"] != spec.sample_rate:
                raise ValueError(f"{meta['sample_rate']} Hz, expected {spec.sample_rate}")
            if len(body) != 2 * meta["frames"] or zlib.crc32(body) != meta["crc32"]:
                raise ValueError("length or checksum mismatch")
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # json errors are ValueErrors;
            cls._corrupt(path, err)  # a header that is JSON but not an object has no .get
            return None
        return np.frombuffer(body, dtype="<i2").astype(np.int16)

    @classmethod
    def _load_flac(cls, path: Path, spec: TTSSpec) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            with sf.SoundFile(path) as f:
                meta = json.loads(f.comment)
                if (f.samplerate, f.channels) != (spec.sample_rate, 1):
                    raise ValueError(f"{f.channels} channels at {f.samplerate} Hz, expected mono {spec.sample_rate}")
                pcm = f.read(dtype="int16")
            if meta["key"] != path.stem or meta["frames"] != len(pcm) or meta["sha256"] != _digest(pcm):
                raise ValueError("checksum mismatch")
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # soundfile errors are RuntimeErrors
            cls._corrupt(path, err)
            return None
        return pcm

    @classmethod
    def _store(cls, path: Path, pcm: np.ndarray, sample_rate: int) -> None:
        body = np.ascontiguousarray(pcm, dtype="<i2").tobytes()
        meta = json.dumps({"format": cls.MAGIC, "key": path.stem, "sample_rate": int(sample_rate),
                           "frames": len(pcm), "crc32": zlib.crc32(body)})
        atomic_write(path, meta.encode() + b"\n" + body)


def get_audio(text: str, spec: TTSSpec | None = None, cache_dir=None) -> np.ndarray:
    """float32 mono at ``spec.sample_rate``, synthesized on a cache miss."""
    return AudioCache(cache_dir).get(text, spec or TTSSpec())[0]


def synthesize_many(texts: Iterable[str], spec: TTSSpec | None = None, cache_dir=None, progress=True) -> dict:
    """Pre-render a task's audio before a run, so the run itself only reads the cache."""
    cache, spec = AudioCache(cache_dir), spec or TTSSpec()
    n = hits = 0
    start = time.perf_counter()
    for text in tqdm(texts, desc=f"TTS ({spec.engine})", unit="item", disable=not progress):
        hits += cache.get(text, spec)[1]
        n += 1
    return {"items": n, "hits": hits, "misses": n - hits, "seconds": round(time.perf_counter() - start, 3)}


def _recorded_path(digest: str, cache_dir=None) -> Path:
    return Path(cache_dir or default_cache_dir()) / "recorded" / digest[:2] / f"{digest}.audio"


#: The first bytes of a decoded recording's file: a JSON header (rate, dtype, shape), then the samples.
_SAMPLES_FORMAT = "lmeval-speech-samples"


def recorded(data, sampling_rate: int | None = None, cache_dir=None) -> dict:
    """A JSON-able, content-addressed reference to a dataset's own recording: ``{"recorded": sha256}``.

    ``data`` is the encoded file (bytes of a WAV/FLAC/... as hub datasets store it) or a decoded
    array with its ``sampling_rate`` (stored as one line of JSON, the rate, dtype and shape, then the
    raw little-endian samples: float32, or the int16/int32 PCM). The bytes go once into the audio
    cache under their SHA-256, so lm-eval's ``--use_cache`` can hash the request (a NumPy array
    cannot be), the same recording is the same key in every run, and resolving reads the file back.
    (A float WAV was not: libsndfile writes the time into its PEAK chunk, so its name changed every
    second; such files written by earlier versions are still read.)
    Nothing is decoded here: a broken recording fails when the model resolves it, for that item only.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        blob = bytes(data)
    else:
        if sampling_rate is None:
            raise AudioError("recorded(array) needs its sampling_rate")
        array = np.asarray(data)
        if array.dtype == np.uint8:  # 8-bit WAV is unsigned: the same scale as int16 << 8
            array = ((array.astype(np.int16) - 128) << 8).astype(np.int16)
        # integer PCM keeps its integer dtype, so reading it back scales it to [-1, 1]
        pcm = array.dtype in (np.dtype(np.int16), np.dtype(np.int32))
        if not pcm and not np.issubdtype(array.dtype, np.floating):
            raise AudioError(f"recorded(array) of dtype {array.dtype}: pass float samples in [-1, 1] or int16/int32/uint8 "
                             "PCM (a list of Python ints becomes int64: say its width, np.asarray(x, dtype=np.int16))")
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<") if pcm else "<f4")
        head = {"format": _SAMPLES_FORMAT, "sampling_rate": int(sampling_rate), "dtype": array.dtype.str,
                "shape": list(array.shape)}
        blob = json.dumps(head).encode() + b"\n" + array.tobytes()
    digest = hashlib.sha256(blob).hexdigest()
    path = _recorded_path(digest, cache_dir)
    if not path.exists() or path.stat().st_size != len(blob):
        atomic_write(path, blob)
    return {"recorded": digest}


def audio_source(item: Mapping) -> str | None:
    """Which of an audio item's sources is heard: ``silence``, ``array``, ``tts``, ``file`` or
    ``recorded`` (None: none of them). One order for :func:`resolve_audio` and the content key
    (``audio/resolver.audio_key``), so an item with several sources is keyed by the audio it resolves to."""
    if item.get("silence_like") is not None:
        return "silence"
    if item.get("array") is not None:
        return "array"
    if "tts_text" in item:
        return "tts"
    if item.get("path"):
        return "file"
    if item.get("recorded") is not None:
        return "recorded"
    return None


def resolve_audio(item: Mapping, override: TTSSpec | dict | None = None, cache_dir=None
                  ) -> tuple[np.ndarray, int, dict]:
    """Turn any supported audio item into (mono float32, sample_rate, info).

    Items: a datasets-style ``{"array", "sampling_rate"}``, a :func:`spoken` reference (``override``
    fields replace its spec: a model's ``tts_engine=piper`` re-voices every task), or ``{"path"}``.
    Arrays and files come out at the override's sample_rate, 16 kHz by default.
    """
    if isinstance(override, TTSSpec):
        override = override.to_dict()
    override = dict(override or {})
    if not isinstance(item, Mapping):
        raise AudioError(f"an audio item must be a dict with 'array', 'tts_text' or 'path', got {type(item).__name__}")
    source = audio_source(item)
    if source == "silence":  # a prior control
        audio, rate, info = resolve_audio(item["silence_like"], override, cache_dir)
        return np.zeros_like(audio), rate, {**info, "source": "silence", "fixes": []}
    if source == "array":
        if "sampling_rate" not in item:
            raise AudioError("audio dict has an 'array' but no 'sampling_rate'")
        array, rate = item["array"], item["sampling_rate"]
    elif source == "tts":
        spec = TTSSpec.from_dict(item.get("tts")).with_overrides(**override)
        audio, hit = AudioCache(cache_dir).get(item["tts_text"], spec)
        _check_level(audio, f"{spec.engine} ({spec.voice}) speaking {item['tts_text'][:60]!r}")
        return audio, spec.sample_rate, {"source": "tts", "cache": "hit" if hit else "miss",
                                         "tts": spec.to_dict(), "fixes": []}
    elif source in ("file", "recorded"):
        path = item["path"] if source == "file" else _recorded_path(item["recorded"], cache_dir)
        what = "audio file" if source == "file" else "recording"
        try:
            if source == "file":
                array, rate = sf.read(path, dtype="float32")
            else:  # content-addressed: the bytes must still be the ones the name promises
                blob = Path(path).read_bytes()
                if hashlib.sha256(blob).hexdigest() != item["recorded"]:
                    Path(path).unlink(missing_ok=True)  # so the next run's recorded() stores it again
                    raise AudioError(f"recording {path} does not match its SHA-256 (altered or truncated in the "
                                     "cache): deleted; a rerun stores it again from the dataset")
                array, rate = _read_recording(blob)
        except (RuntimeError, OSError, sf.LibsndfileError, ValueError, KeyError) as err:
            raise AudioError(f"cannot read {what} {path}: {err}") from err
    else:
        raise AudioError(f"audio dict has none of 'array', 'tts_text', 'path', 'recorded': keys {sorted(item)}")
    target = TTSSpec().with_overrides(**override).sample_rate
    audio, fixes = prepare_audio(array, rate, target_rate=target)
    _check_level(audio, f"the {source} audio")
    return audio, target, {"source": source, "cache": None, "tts": None, "fixes": fixes}


def _read_recording(blob: bytes) -> tuple[np.ndarray, int]:
    """(samples, rate) of a file :func:`recorded` stored: its samples, or an encoded file's decoding."""
    head, _, body = blob.partition(b"\n")
    if head.startswith(b'{"format": "%s"' % _SAMPLES_FORMAT.encode()):
        meta = json.loads(head)
        return np.frombuffer(body, dtype=meta["dtype"]).reshape(meta["shape"]).copy(), meta["sampling_rate"]
    return sf.read(io.BytesIO(blob), dtype="float32")


#: Float audio is in [-1, 1]; a peak above this is integer PCM stored as float (e.g. int16 values cast
#: to float32 without dividing by 32768), which a model hears ~90 dB too loud.
MAX_FLOAT_PEAK = 2.0


def _check_level(audio: np.ndarray, what: str) -> None:
    """Refuse audio a model must not be scored on as speech: all zeros (espeak-ng says nothing for
    "...", a dataset's blank recording) or far outside [-1, 1]. The item fails and is counted."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        raise AudioError(f"{what} is digital silence (every sample is 0): nothing to hear")
    if peak > MAX_FLOAT_PEAK:
        raise AudioError(f"{what} peaks at {peak:.6g}, outside [-1, 1]: integer PCM given as float? "
                         "Pass the integer array itself (int16/int32), or divide by its full scale")
