"""Owns the references a speech/text hidden-state similarity is read against: the mismatched pair (an
item's speech against *another* item's text), anisotropy-corrected (centered) cosine, and linear CKA.

A decoder's hidden states share a large common direction, so any two inputs have a high raw cosine.
A similarity is only a finding beside what the same measure gives for a speech state and the text of a
different item (:func:`derangement` picks it, seeded, never the item itself), and beside the same
measure after the common direction is removed (:func:`center`: subtract the mean state per layer over
both modalities). Linear CKA (Kornblith et al., 2019) compares the *geometry* of the speech and text
representations across items, per layer and across layers, and is invariant to that common offset.
"""

from __future__ import annotations

import numpy as np


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (Sattolo's algorithm: one random cycle).

    ``n`` < 2 has none: an error, so that no item is ever compared with itself under the name
    "mismatched".
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: Sattolo (j <= i would be Fisher-Yates)
        perm[i], perm[j] = perm[j], perm[i]
    assert not np.any(perm == np.arange(n))
    return perm


def center(speech: np.ndarray, text: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Subtract the mean state per layer, taken over every item of *both* modalities.

    ``speech``/``text`` [N, L, D]; returns the centered arrays and the mean [L, D].
    """
    s, t = np.asarray(speech, dtype=np.float64), np.asarray(text, dtype=np.float64)
    if s.ndim != 3 or s.shape != t.shape:
        raise ValueError(f"expected two [N, L, D] arrays of equal shape, got {s.shape} and {t.shape}")
    mean = np.concatenate([s, t]).mean(axis=0)
    return s - mean, t - mean, mean


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine over the last axis; 0 where a vector is zero."""
    num = np.sum(a * b, axis=-1)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(np.where(norms > 0, num / np.where(norms > 0, norms, 1.0), 0.0), -1.0, 1.0)


def _centered_gram(x: np.ndarray) -> np.ndarray:
    """[N, D] -> the item-by-item Gram matrix of the column-centered features, Frobenius-normalized."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    gram = x @ x.T
    norm = np.linalg.norm(gram)
    return gram / norm if norm > 0 else gram


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same N items, [N, D1] and [N, D2]: 1 = the same
    geometry up to rotation and isotropic scale, 0 = unrelated. Needs N >= 2."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"expected [N, D] arrays of the same N >= 2, got {x.shape} and {y.shape}")
    return float(np.sum(_centered_gram(x) * _centered_gram(y)))


def cross_layer_cka(speech: np.ndarray, text: np.ndarray) -> np.ndarray:
    """[N, L, D] speech and [N, L', D'] text -> [L, L'] linear CKA of every speech layer with every text layer."""
    s, t = np.asarray(speech), np.asarray(text)
    if s.ndim != 3 or t.ndim != 3 or s.shape[0] != t.shape[0]:
        raise ValueError(f"expected [N, L, D] arrays over the same items, got {s.shape} and {t.shape}")
    gs = np.stack([_centered_gram(s[:, i]).ravel() for i in range(s.shape[1])])
    gt = np.stack([_centered_gram(t[:, j]).ravel() for j in range(t.shape[1])])
    return gs @ gt.T


def paired_difference(own: np.ndarray, other: np.ndarray, n_boot: int = 2000, seed: int = 0,
                      alpha: float = 0.05) -> dict:
    """Mean of ``own - other`` over items with a percentile bootstrap CI (items resampled with
    replacement, the pair kept together)."""
    d = np.asarray(own, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    if d.ndim != 1 or d.size == 0:
        raise ValueError(f"expected two equal-length 1-D arrays, got {np.shape(own)} and {np.shape(other)}")
    rng = np.random.default_rng(seed)
    boots = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"own": float(np.mean(own)), "mismatched": float(np.mean(other)), "difference": float(d.mean()),
            "ci_low": float(low), "ci_high": float(high), "n": int(d.size)}
