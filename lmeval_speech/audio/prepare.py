"""Normalize any audio array into what a speech model takes: mono float32 at its sampling rate.

Every fix is reported as a short human-readable note, so a run's log says what was done to each
item instead of silently feeding a model resampled, downmixed or truncated audio.
"""

from __future__ import annotations

from math import gcd

import numpy as np
from scipy.signal import resample_poly


class AudioError(Exception):
    """An audio input or a synthesis cannot be used (empty, non-finite, unreadable, engine failure)."""


# Integer PCM dtypes with an unambiguous full scale; int64 and friends are refused rather than guessed.
_PCM_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


def _to_float(x: np.ndarray, fixes: list[str]) -> np.ndarray:
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32, copy=False)
    if x.dtype in _PCM_SCALE:
        fixes.append(f"converted {x.dtype} PCM to float")
        return (x.astype(np.float32) / np.float32(_PCM_SCALE[x.dtype])).astype(np.float32)
    if x.dtype == np.uint8:
        fixes.append("converted uint8 PCM to float")
        return (x.astype(np.float32) - 128.0) / 128.0
    raise AudioError(f"unsupported audio dtype {x.dtype}: pass float in [-1, 1] or int16/int32 PCM")


def _to_mono(x: np.ndarray, fixes: list[str]) -> np.ndarray:
    if x.ndim == 1:
        return x
    if x.ndim != 2:
        raise AudioError(f"audio must be 1-D or 2-D (samples x channels), got shape {x.shape}")
    # soundfile gives (frames, channels), torch-style code (channels, frames): channels is the short axis.
    axis = 0 if x.shape[0] < x.shape[1] else 1
    if x.shape[axis] > 1:
        fixes.append(f"downmixed {x.shape[axis]} channels")
    return x.mean(axis=axis, dtype=np.float32)


def prepare_audio(array, sampling_rate, target_rate: int = 16000, max_seconds: float | None = None
                  ) -> tuple[np.ndarray, list[str]]:
    """Return (mono float32 at ``target_rate``, notes on the fixes applied).

    Raises AudioError for empty audio, a bad sampling rate, non-finite samples or an unusable dtype:
    a NaN reaching a model produces garbage scores rather than an error, so it is stopped here.
    Truncation to ``max_seconds`` happens before resampling, so an overlong clip costs no extra work.
    """
    fixes: list[str] = []
    x = np.asarray(array)
    if x.size == 0:
        raise AudioError("empty audio: the array has no samples")
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, (int, np.integer, float)) \
            or sampling_rate <= 0 or int(sampling_rate) != sampling_rate:
        raise AudioError(f"invalid sampling rate {sampling_rate!r}: need a positive integer number of Hz")
    sr = int(sampling_rate)
    x = _to_mono(_to_float(x, fixes), fixes)
    n_bad = int(np.count_nonzero(~np.isfinite(x)))
    if n_bad:
        raise AudioError(f"audio has {n_bad} non-finite samples (NaN/inf) out of {x.size}")
    if max_seconds is not None and x.size > round(max_seconds * sr):
        fixes.append(f"truncated {x.size / sr:.1f}s -> {max_seconds:.1f}s")
        x = x[: round(max_seconds * sr)]
    if sr != target_rate:
        g = gcd(sr, int(target_rate))
        x = resample_poly(x, int(target_rate) // g, sr // g)
        fixes.append(f"resampled {sr}->{target_rate} Hz")
    return np.ascontiguousarray(x, dtype=np.float32), fixes
