"""Layer-wise similarity of mean-pooled speech and text hidden states (Xiang et al., 2025).

Pooling over time removes the length mismatch between a spoken question (hundreds of audio
frames) and its transcript (tens of tokens), so the two can be compared layer by layer.
"""

from __future__ import annotations

import numpy as np



def mean_pool(states, mask=None) -> np.ndarray:
    """Mean over the time axis of ``states`` [T, D] or [L, T, D] -> [D] or [L, D].

    ``mask`` [T] (bool or 0/1) selects the positions to average, e.g. to drop padding or the
    prompt template around the question.
    """
    x = np.asarray(states, dtype=np.float64)
    if x.ndim not in (2, 3):
        raise ValueError(f"states must be [T, D] or [L, T, D], got shape {x.shape}")
    if mask is None:
        return x.mean(axis=-2)
    m = np.asarray(mask)
    if m.shape != (x.shape[-2],):
        raise ValueError(f"mask has shape {m.shape}, expected ({x.shape[-2]},) to match T")
    m = m.astype(bool)
    if not m.any():
        raise ValueError("mask selects no positions")
    return x[..., m, :].mean(axis=-2)


def _rowwise(speech: np.ndarray, text: np.ndarray) -> dict:
    """A zero vector's cosine is 0 (as in :func:`~lmeval_speech.metrics.alignment.similarity_matrix`);
    a row holding NaN or inf has cosine NaN, like its Euclidean distance, never a number."""
    cos_num = np.sum(speech * text, axis=-1)
    norms = np.linalg.norm(speech, axis=-1) * np.linalg.norm(text, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, cos_num / np.where(norms > 0, norms, 1.0), 0.0)
    finite = np.isfinite(speech).all(axis=-1) & np.isfinite(text).all(axis=-1)
    cosine = np.where(finite, cosine, np.nan)
    return {"cosine": np.clip(cosine, -1.0, 1.0),
            "euclidean": np.linalg.norm(speech - text, axis=-1)}


def layer_similarity(speech_pooled, text_pooled) -> dict:
    """Per-layer cosine similarity and Euclidean *distance* of one item's pooled states.

    Inputs are [L, D]; returns ``cosine`` [L] (higher = closer) and ``euclidean`` [L]
    (lower = closer; unlike the alignment matrix, this is not negated).
    """
    s = np.asarray(speech_pooled, dtype=np.float64)
    t = np.asarray(text_pooled, dtype=np.float64)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"expected two [L, D] arrays of equal shape, got {s.shape} and {t.shape}")
    return _rowwise(s, t)


def layer_similarity_batch(speech_pooled, text_pooled) -> dict:
    """:func:`layer_similarity` over items: [N, L, D] inputs -> ``cosine``/``euclidean`` [N, L]."""
    s = np.asarray(speech_pooled, dtype=np.float64)
    t = np.asarray(text_pooled, dtype=np.float64)
    if s.ndim != 3 or s.shape != t.shape:
        raise ValueError(f"expected two [N, L, D] arrays of equal shape, got {s.shape} and {t.shape}")
    return _rowwise(s, t)
