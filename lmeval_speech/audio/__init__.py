"""Speech side of the paired tasks: TTS engines, the on-disk audio cache, input normalization.

Tasks return ``spoken(text)`` references instead of waveforms; the model adapter calls
``resolve_audio`` (synthesizing through the cache) and ``prepare_audio`` to get model input.
"""

from .cache import AudioCache, cache_stats, default_cache_dir, get_audio, recorded, resolve_audio, synthesize_many
from .prepare import AudioError, prepare_audio
from .tts import ENGINES, TTSEngineMissing, TTSSpec, spoken

__all__ = [
    "ENGINES", "AudioCache", "AudioError", "TTSEngineMissing", "TTSSpec", "cache_stats", "default_cache_dir",
    "get_audio", "prepare_audio", "recorded", "resolve_audio", "spoken", "synthesize_many",
]
