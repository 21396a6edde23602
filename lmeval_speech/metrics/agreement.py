"""Owns agreement between two twins' answers: Cohen's kappa of their chosen options and the modality
recovery rate (speech accuracy / text accuracy), each with a paired bootstrap CI.

Both statistics depend on a resample of items only through the counts in the cells of a small table
(the K x K confusion table of chosen options; the 2 x 2 table of right/wrong), so a bootstrap resample
is a Multinomial(n, cell shares) draw of those counts: exactly the distribution of index resampling
in O(n_boot * K^2) memory (the same device as ``gap.paired_gap``).
"""

from __future__ import annotations

import numpy as np


def kappa_from_tables(tables: np.ndarray) -> np.ndarray:
    """Cohen's kappa of confusion tables [..., K, K] (rows: one rater, columns: the other); nan where the
    expected agreement is 1 (both raters always give one and the same answer)."""
    t = np.asarray(tables, dtype=np.float64)
    n = t.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        observed = np.trace(t, axis1=-2, axis2=-1) / n
        expected = (t.sum(-1) * t.sum(-2)).sum(-1) / n**2
        return np.where(expected < 1.0, (observed - expected) / (1.0 - expected), np.nan)


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float | None, float | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None, None
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def cohen_kappa(a, b, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Cohen's kappa between two answer sequences over the same items (``a[i]`` and ``b[i]``: the options
    two twins chose for item i, any hashable labels), with the share of items where they agree and a
    percentile bootstrap CI over items."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"kappa needs the same items in both: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("no items")
    labels = {v: i for i, v in enumerate(dict.fromkeys(a + b))}
    k = len(labels)
    table = np.zeros((k, k), dtype=np.int64)
    np.add.at(table, ([labels[v] for v in a], [labels[v] for v in b]), 1)
    kappa = float(kappa_from_tables(table))
    draws = np.random.default_rng(seed).multinomial(n, table.ravel() / n, size=n_boot).reshape(n_boot, k, k)
    low, high = _percentile_ci(kappa_from_tables(draws), alpha)
    return {"kappa": None if np.isnan(kappa) else kappa, "ci_low": low, "ci_high": high,
            "agreement": float(np.trace(table) / n), "n": n, "n_boot": n_boot, "seed": seed, "alpha": alpha}


def recovery_rate(text_correct, speech_correct, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """speech accuracy / text accuracy over the same items, with a paired bootstrap CI (a resample whose
    text accuracy is 0 has no rate and is left out of the interval)."""
    t = np.asarray(text_correct, dtype=bool)
    s = np.asarray(speech_correct, dtype=bool)
    if t.shape != s.shape or t.ndim != 1:
        raise ValueError(f"recovery rate needs the same items in both: {t.shape} vs {s.shape}")
    n = t.size
    if n == 0:
        raise ValueError("no items")
    cells = np.array([np.sum(t & s), np.sum(t & ~s), np.sum(~t & s)])  # both right, text only, speech only
    draws = np.random.default_rng(seed).multinomial(n, np.append(cells, n - cells.sum()) / n, size=n_boot)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = (draws[:, 0] + draws[:, 2]) / (draws[:, 0] + draws[:, 1])
    low, high = _percentile_ci(rates, alpha)
    rate = float(s.mean() / t.mean()) if t.any() else None
    return {"rate": rate, "ci_low": low, "ci_high": high, "n": n, "n_boot": n_boot, "seed": seed, "alpha": alpha}
