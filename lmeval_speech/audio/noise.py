"""Owns additive noise for perturbation sweeps: white or babble noise mixed into an item's audio at a
given SNR, deterministically (the same item, spec and seed always give the same samples).

* ``white``: Gaussian samples from a generator seeded by the seed and the item's audio key.
* ``babble``: the sum of ``BABBLE_TALKERS`` other items' TTS audio from the same run (chosen by the
  same seeded generator, each looped to the item's length), so nothing is downloaded.

The noise is scaled so that ``10 log10(P_signal / P_noise) = snr_db`` exactly on the mixed clip.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from .prepare import AudioError

BABBLE_TALKERS = 4
KINDS = ("white", "babble")


@dataclass(frozen=True)
class NoiseSpec:
    kind: str
    snr_db: float
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"noise must be one of {KINDS}, got {self.kind!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _rng(spec: NoiseSpec, key: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{spec.seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _loop(x: np.ndarray, n: int) -> np.ndarray:
    return np.resize(x, n) if len(x) else np.zeros(n, dtype=np.float32)


def mix(signal: np.ndarray, spec: NoiseSpec, key: str, others=()) -> np.ndarray:
    """``signal`` plus noise at ``spec.snr_db`` (``others``: candidate babble clips at the same rate)."""
    signal = np.asarray(signal, dtype=np.float64)
    p_signal = float(np.mean(signal ** 2))
    if p_signal == 0.0:
        raise AudioError("cannot add noise at an SNR to a silent clip")
    rng = _rng(spec, key)
    if spec.kind == "white":
        noise = rng.standard_normal(len(signal))
    else:
        pool = [np.asarray(o, dtype=np.float64) for o in others if len(o)]
        if len(pool) < 1:
            raise AudioError("babble noise needs other items' audio in the same run")
        picks = rng.choice(len(pool), size=min(BABBLE_TALKERS, len(pool)), replace=False)
        noise = sum(np.roll(_loop(pool[i], len(signal)), int(rng.integers(0, len(signal)))) for i in picks)
    p_noise = float(np.mean(noise ** 2))
    if p_noise == 0.0:
        raise AudioError("babble noise from silent clips")
    noise *= np.sqrt(p_signal / (p_noise * 10 ** (spec.snr_db / 10)))
    return (signal + noise).astype(np.float32)


def snr_db(signal: np.ndarray, mixed: np.ndarray) -> float:
    """The SNR of ``mixed`` against the clean ``signal`` (for tests and the manifest)."""
    signal = np.asarray(signal, dtype=np.float64)
    noise = np.asarray(mixed, dtype=np.float64) - signal
    return float(10 * np.log10(np.mean(signal ** 2) / np.mean(noise ** 2)))
