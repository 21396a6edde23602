"""Owns additive noise for perturbation sweeps: white or babble noise mixed into an item's audio at a
given SNR, deterministically (the same item, spec and seed always give the same samples).

* ``white``: Gaussian samples from a generator seeded by the seed and the item's audio key.
* ``babble``: the sum of ``BABBLE_TALKERS`` of the ``BABBLE_SENTENCES`` spoken in the item's TTS voice
  (chosen by the same seeded generator, each looped to the item's length and shifted), so nothing is
  downloaded and an item's noise does not depend on the other items of the run.

The noise is scaled so that ``10 log10(P_signal / P_noise) = snr_db`` exactly on the mixed clip. The
silence control hears its speech twin's noise alone (:func:`noise_for`), not a mix of noise and zeros.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from .prepare import AudioError

BABBLE_TALKERS = 4
#: What the babble talkers say: plain sentences written for this purpose (no benchmark's questions, so
#: the background never speaks another item's question or answer).
BABBLE_SENTENCES = (
    "The train to the coast leaves every morning at half past seven.",
    "She painted the kitchen a pale shade of green last summer.",
    "Our neighbours keep three noisy geese in the garden behind the house.",
    "He forgot his umbrella on the bus again this week.",
    "The bakery on the corner sells bread until the early afternoon.",
    "We walked along the river until the lights came on in town.",
    "The meeting was moved to Thursday because the room was booked.",
    "A small boat drifted slowly past the old stone bridge.",
    "They planted tomatoes, beans and a row of sunflowers in spring.",
    "The children built a tall tower out of wooden blocks.",
    "Please remember to close the window before you leave tonight.",
    "The library will be closed for repairs until the end of the month.",
    "My brother drives a blue van with a dent in the door.",
    "The soup needed more salt, so she added a pinch at the end.",
    "Rain is expected later, with clearer skies by the weekend.",
    "The old clock in the hall stopped at a quarter to four.",
)
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
    return (signal + noise_for(signal, spec, key, others)).astype(np.float32)


def noise_for(signal: np.ndarray, spec: NoiseSpec, key: str, others=()) -> np.ndarray:
    """The noise (float64) :func:`mix` adds to ``signal``: alone, what the silence control hears under
    noise (its speech twin's noise, at the level the speech twin got)."""
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
            raise AudioError("babble noise needs talkers' audio (noise.BABBLE_SENTENCES)")
        picks = rng.choice(len(pool), size=min(BABBLE_TALKERS, len(pool)), replace=False)
        noise = sum(np.roll(_loop(pool[i], len(signal)), int(rng.integers(0, len(signal)))) for i in picks)
    p_noise = float(np.mean(noise ** 2))
    if p_noise == 0.0:
        raise AudioError("babble noise from silent clips")
    return noise * np.sqrt(p_signal / (p_noise * 10 ** (spec.snr_db / 10)))


def snr_db(signal: np.ndarray, mixed: np.ndarray) -> float:
    """The SNR of ``mixed`` against the clean ``signal`` (for tests and the manifest)."""
    signal = np.asarray(signal, dtype=np.float64)
    noise = np.asarray(mixed, dtype=np.float64) - signal
    return float(10 * np.log10(np.mean(signal ** 2) / np.mean(noise ** 2)))
