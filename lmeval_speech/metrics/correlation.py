"""Does a similarity metric predict the gap? Per-item and per-model correlations.

These run on small, messy samples (a handful of checkpoints, items with a nan similarity), so
degenerate inputs give nan results with a ``note`` saying why instead of raising: a report
built over many models should not die on one. Every result carries ``note`` (None when fine).
Pairs with a non-finite value are dropped first; ``n`` counts the pairs actually used.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import optimize, special, stats


def _paired(x, y, x_name: str, y_name: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"{x_name} has {x.size} values but {y_name} has {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _check_binary(name: str, b: np.ndarray) -> None:
    if not np.isin(b, (0.0, 1.0)).all():
        raise ValueError(f"{name} must hold only 0/1 (or bool) values")


def _degenerate(n: int, **columns: np.ndarray) -> str | None:
    if n < 3:
        return f"n={n} < 3 usable pairs"
    for name, col in columns.items():
        # constant up to rounding: a spread of 1e-15 on values near 1 gave r = 0.48 and slopes of 1e12
        if np.ptp(col) <= CONSTANT_RTOL * np.max(np.abs(col)):
            return f"{name} is constant (spread {np.ptp(col):.2g})"
    return None


#: Values whose spread is at most this fraction of their magnitude count as constant (no correlation).
CONSTANT_RTOL = 1e-9


def point_biserial(binary, values) -> dict:
    """Point-biserial r between a 0/1 outcome (e.g. speech-only error) and a continuous value."""
    b, v = _paired(binary, values, "binary", "values")
    _check_binary("binary", b)
    note = _degenerate(b.size, binary=b, values=v)
    if note:
        return {"r": math.nan, "p": math.nan, "n": b.size, "note": note}
    res = stats.pointbiserialr(b, v)
    return {"r": float(res.statistic), "p": float(res.pvalue), "n": b.size, "note": None}


def linear_fit(x, y) -> dict:
    """Least-squares line y = slope * x + intercept (e.g. similarity vs gap across checkpoints)."""
    x, y = _paired(x, y, "x", "y")
    note = _degenerate(x.size, x=x, y=y)
    if note:
        return {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "p": math.nan,
                "n": x.size, "note": note}
    res = stats.linregress(x, y)
    return {"slope": float(res.slope), "intercept": float(res.intercept),
            "r2": float(res.rvalue**2), "p": float(res.pvalue), "n": x.size, "note": None}


def _neg_log_lik(beta, X, y):
    eta = X @ beta
    return np.sum(np.logaddexp(0.0, eta) - y * eta)


def _grad(beta, X, y):
    return X.T @ (special.expit(X @ beta) - y)


def _hess(beta, X, y):
    p = special.expit(X @ beta)
    return (X * (p * (1 - p))[:, None]).T @ X


def logistic_fit(x, binary) -> dict:
    """Logistic regression P(binary = 1) = sigmoid(intercept + coef * x) by maximum likelihood.

    ``se`` is the Wald standard error from the inverse Fisher information, ``p`` its two-sided
    Wald p-value. x is standardised for the optimiser (similarities often sit in a narrow range
    like 0.90-0.99) and the estimates are mapped back to x's own units. When the classes are
    (quasi-)separated by x the MLE is infinite, so that case returns nan with a note.
    """
    x, y = _paired(x, binary, "x", "binary")
    _check_binary("binary", y)
    nan = {"coef": math.nan, "intercept": math.nan, "se": math.nan, "z": math.nan,
           "p": math.nan, "n": x.size}
    note = _degenerate(x.size, x=x, binary=y)
    if note:
        return {**nan, "note": note}
    x0, x1 = x[y == 0], x[y == 1]
    if x0.max() <= x1.min() or x1.max() <= x0.min():
        return {**nan, "note": "x separates the classes: the MLE does not exist"}

    mu, sd = x.mean(), x.std()
    X = np.column_stack([np.ones_like(x), (x - mu) / sd])
    res = optimize.minimize(_neg_log_lik, np.zeros(2), args=(X, y), jac=_grad, hess=_hess,
                            method="trust-exact")
    g0, g1 = res.x
    se_g1 = math.sqrt(np.linalg.inv(_hess(res.x, X, y))[1, 1])
    coef, se = g1 / sd, se_g1 / sd
    z = coef / se
    return {"coef": float(coef), "intercept": float(g0 - g1 * mu / sd), "se": float(se),
            "z": float(z), "p": float(2 * stats.norm.sf(abs(z))), "n": x.size,
            "note": None if res.success else f"optimiser did not converge: {res.message}"}
