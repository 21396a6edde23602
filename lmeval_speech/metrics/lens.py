"""Owns the logit-lens summary: how often a question's tokens are read out of the states that stand
for them (top-k shares and ranks), speech positions through an alignment path, text positions as
the reference."""

from __future__ import annotations

import numpy as np

KS = (1, 10)


def aligned_ranks(ranks: np.ndarray, path: np.ndarray) -> np.ndarray:
    """``ranks`` [P, Q] (rank of text token q at speech position p), ``path`` [Q] (the speech position
    aligned to each text token) -> [Q]: each token's rank at its aligned position."""
    path = np.asarray(path, dtype=np.int64)
    return np.asarray(ranks)[path, np.arange(len(path))]


def summarize(ranks: list[np.ndarray], ks=KS) -> dict:
    """Per-token ranks of many items (each [Q]) -> {top1, top10, mean_rank, median_rank, n_tokens}."""
    flat = np.concatenate([np.asarray(r).ravel() for r in ranks]) if ranks else np.zeros(0)
    if flat.size == 0:
        return {**{f"top{k}": None for k in ks}, "mean_rank": None, "median_rank": None, "n_tokens": 0}
    return {**{f"top{k}": float(np.mean(flat < k)) for k in ks}, "mean_rank": float(flat.mean()),
            "median_rank": float(np.median(flat)), "n_tokens": int(flat.size)}
