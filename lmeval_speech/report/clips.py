"""Owns the clips the HTML item browser plays: the samples a speech twin's model heard, rebuilt from
the audio cache with the run's recorded settings and written beside the page as FLAC (soundfile).

What ``models/plan.Planner.load`` does before the encoder, repeated with the ``audio`` functions it
calls (``resolve_audio`` with the run's TTS override, ``noise.mix`` with the run's noise spec, then
``prepare_audio`` at the model's rate with the run's truncation limit), so the clip has exactly the
samples the model heard; a test checks it against ``Planner.load``, with and without noise. The noise
generator is seeded by the audio's content key: :func:`content_key` repeats ``models.plan.audio_key``
for synthesized and recorded audio (the report does not import ``models``; the test holds them equal);
other sources under noise get the clean clip and say so. The model's sampling rate is not
recorded in a run: 16 kHz (``backends/base.py``'s default) is assumed, and ``report/html.py`` checks each
clip's length against the one the model's capture recorded, where there is one.
FLAC of 16-bit samples is lossless for the cache's PCM16 clips (tests/test_html.py checks it).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

from lmeval_speech.audio.cache import AudioCache, audio_source, resolve_audio
from lmeval_speech.audio.prepare import prepare_audio
from lmeval_speech.audio.spoken_form import spoken_form
from lmeval_speech.audio.tts import TTSSpec
from lmeval_speech.fileio import atomic_write

MODEL_RATE = 16000


def content_key(item: dict) -> str | None:
    """``models.plan.audio_key`` of a synthesized or recorded audio (it seeds the noise); None otherwise."""
    source = audio_source(item)
    if source == "tts":
        return "tts:" + json.dumps({"t": item["tts_text"], "s": item.get("tts")}, sort_keys=True)
    if source == "recorded":
        return f"recorded:{item['recorded']}"
    return None


def _babble_pool(item: dict, rate: int, override: dict) -> list:
    """``Planner._babble_pool``: the babble sentences in the item's TTS voice at ``rate``."""
    from lmeval_speech.audio.cache import get_audio
    from lmeval_speech.audio.noise import BABBLE_SENTENCES

    spec = TTSSpec.from_dict(item.get("tts") if "tts_text" in item else None).with_overrides(**override, sample_rate=rate)
    return [get_audio(text, spec) for text in BABBLE_SENTENCES]


def heard(item: dict, settings: dict, rate: int = MODEL_RATE, cache_dir=None) -> tuple[np.ndarray, list[str]]:
    """(mono float32 samples at ``rate``, notes) the model heard for one audio item, given the run's
    ``lmeval_speech.settings`` (``tts_override``, ``noise``, ``audio_overflow``, ``max_audio_seconds``)."""
    override = settings.get("tts_override") or {}
    array, sr, info = resolve_audio(item, override=override or None, cache_dir=cache_dir)
    notes = list(info.get("fixes", []))
    if settings.get("noise"):
        from lmeval_speech.audio.noise import NoiseSpec, mix

        spec, key = NoiseSpec(**settings["noise"]), content_key(item)
        if key is None:
            notes.append(f"clean clip: the model heard it with {spec.kind} noise at {spec.snr_db} dB SNR, "
                         "not reproduced for this audio source")
        else:
            array = mix(array, spec, key, _babble_pool(item, sr, override) if spec.kind == "babble" else [])
            notes.append(f"{spec.kind} noise at {spec.snr_db} dB SNR (seed {spec.seed}), as the model heard it")
    limit = settings.get("max_audio_seconds") if settings.get("audio_overflow", "truncate") == "truncate" else None
    array, fixes = prepare_audio(array, sr, target_rate=rate, max_seconds=limit)
    return array, notes + fixes


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
