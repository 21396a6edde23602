"""Owns the clips the HTML item browser plays: the samples a speech twin's model heard, rebuilt from
the audio cache with the run's recorded settings and written beside the page as FLAC (soundfile).

The samples are ``audio/resolver.AudioResolver.load``'s, the function the run itself loaded them with,
under the run's recorded audio settings (``AudioSettings.from_record``: TTS override, noise, truncation
limit). The model's sampling rate is not recorded in a run: 16 kHz (``backends/base.py``'s default) is
assumed, and ``report/html.py`` checks each clip's length against the one the model's capture recorded,
where there is one. FLAC of 16-bit samples is lossless for the cache's PCM16 clips (tests/test_html.py
checks it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from lmeval_speech.audio.cache import AudioCache, audio_source
from lmeval_speech.audio.resolver import AudioResolver, AudioSettings, Listener
from lmeval_speech.audio.spoken_form import spoken_form
from lmeval_speech.audio.tts import TTSSpec
from lmeval_speech.fileio import atomic_write

MODEL_RATE = 16000


def heard(item: dict, settings: dict, rate: int = MODEL_RATE) -> tuple[np.ndarray, list[str]]:
    """(mono float32 samples at ``rate``, notes) the model heard for one audio item, given the run's
    ``lmeval_speech.settings`` (``tts_override``, ``noise``, ``audio_overflow``, ``max_audio_seconds``)."""
    audio = AudioSettings.from_record(settings)
    array, info = AudioResolver(audio, Listener(sampling_rate=rate), progress=False).load(item)
    notes = list(info["fixes"])
    if audio.noise is not None:
        n = audio.noise
        notes.append(f"{n.kind} noise at {n.snr_db} dB SNR (seed {n.seed}), as the model heard it")
    return array, notes


def cache_file(item: dict, settings: dict, cache_dir=None) -> str | None:
    """Where the audio cache holds a synthesized item's clip (None for other sources)."""
    if audio_source(item) != "tts":
        return None
    spec = TTSSpec.from_dict(item.get("tts")).with_overrides(**(settings.get("tts_override") or {}))
    return str(AudioCache(cache_dir).path_for(item["tts_text"], spec))


def synthesized_text(item: dict) -> str | None:
    """The text the TTS engine was given (after ``spoken_form``), for a synthesized item."""
    return spoken_form(item["tts_text"]) if audio_source(item) == "tts" else None


def write_flac(path, samples: np.ndarray, rate: int = MODEL_RATE) -> dict:
    """Write ``samples`` as 16-bit FLAC (atomically); returns {samples, seconds, bytes}. The samples are
    stored as round(x * 32768), which a decoder turns back into x / 32768: exact for the cache's PCM16
    clips, within half a step of 16 bits for resampled or noisy ones."""
    import io

    pcm = np.clip(np.round(np.asarray(samples, dtype=np.float64) * 32768), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, rate, format="FLAC", subtype="PCM_16")
    data = buf.getvalue()
    atomic_write(Path(path), data)
    return {"samples": len(pcm), "seconds": len(pcm) / rate, "bytes": len(data)}
