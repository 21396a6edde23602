"""Owns the across-run regression of the modality gap on hidden-state closeness (the paper's checkpoint
regression, Xiang et al. 2025): for each closeness value, the least-squares line of gap on value across
runs, its R² with a bootstrap CI over items, and the figure ``gap_vs_similarity.png``.

The runs must have scored the same items (the checkpoints of one model on one task): a bootstrap
replicate resamples those items once and recomputes every run's gap and value on the same resample,
so the CI says how much R² depends on which items were asked. Values (means over hidden states per
item, then over items): ``S_cos``, ``S_euc``, ``aps`` (token-captured items only), ``S_cos_centered``
(the run's mean state removed) and ``S_cos_vs_mismatched`` (own cosine minus a mismatched item's).
"""

from __future__ import annotations

import numpy as np

from lmeval_speech.metrics import linear_fit

#: fit name -> the item row's key
VALUES = {"S_cos": "cosine", "S_euc": "euclidean", "aps": "aps", "S_cos_centered": "centered_cosine",
          "S_cos_vs_mismatched": "cosine_minus_mismatched"}
MIN_RUNS = 3


def _r2(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope, R²) of the least-squares line; NaN when x or y does not vary."""
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy = float(dx @ dx), float(dy @ dy)
    if sxx <= 1e-24 or syy <= 1e-24:
        return float("nan"), float("nan")
    sxy = float(dx @ dy)
    return sxy / sxx, sxy * sxy / (sxx * syy)


def regression(reports: list[dict], labels: list[str], n_boot: int = 2000, seed: int = 0) -> dict | None:
    """{value: fit} over the runs' common items, or None with fewer than ``MIN_RUNS`` runs or no item
    that every run scored."""
    if len(reports) < MIN_RUNS:
        return None
    tables = [{(r["pair"], r["doc_id"]): r for r in rep["items"]} for rep in reports]
    common = sorted(set.intersection(*(set(t) for t in tables)), key=str)
    if not common:
        return None
    correct = np.array([[float(t[k]["text_correct"]) - float(t[k]["speech_correct"]) for k in common]
                        for t in tables])  # [runs, items]: per-item gap
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(common), size=(n_boot, len(common)))
    y = correct.mean(axis=1)
    out = {}
    for name, key in VALUES.items():
        vals = np.array([[np.nan if t[k].get(key) is None else float(t[k][key]) for k in common] for t in tables])
        has = np.isfinite(vals).all(axis=0)  # items every run has the value for
        if has.sum() < 2:
            continue
        x = np.nanmean(np.where(has, vals, np.nan), axis=1)
        fit = linear_fit(x, y)
        boot_r2, boot_slope = [], []
        for idx in draws:
            sel = idx[has[idx]]
            if sel.size == 0:
                continue
            slope, r2 = _r2(vals[:, sel].mean(axis=1), correct[:, idx].mean(axis=1))
            boot_r2.append(r2)
            boot_slope.append(slope)
        r2s, slopes = np.array(boot_r2), np.array(boot_slope)
        ok = np.isfinite(r2s)
        out[name] = {**fit, "x_key": key, "x": x.tolist(), "y": y.tolist(), "labels": list(labels),
                     "n_items_gap": len(common), "n_items_value": int(has.sum()),
                     "r2_ci": [float(v) for v in np.quantile(r2s[ok], [0.025, 0.975])] if ok.any() else None,
                     "slope_ci": [float(v) for v in np.quantile(slopes[ok], [0.025, 0.975])] if ok.any() else None,
                     "n_boot": int(ok.sum())}
    return {"fits": out, "n_runs": len(reports), "n_items": len(common), "seed": seed} if out else None


def regression_plot(reg: dict, path) -> str:
    """One panel per value: a numbered point per run, the fitted line, R² with its item-bootstrap CI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fits = reg["fits"]
    fig = Figure(figsize=(3.6 * len(fits), 3.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(fits)))
    for ax, (name, fit) in zip(axes, fits.items()):
        x, y = np.array(fit["x"]), np.array(fit["y"])
        ax.plot(x, y, "o", color="#4c72b0")
        for i, (xi, yi) in enumerate(zip(x, y), 1):
            ax.annotate(str(i), (xi, yi), textcoords="offset points", xytext=(4, 3), fontsize="x-small")
        if fit["note"] is None:
            xs = np.linspace(x.min(), x.max(), 2)
            ax.plot(xs, fit["slope"] * xs + fit["intercept"], "-", color="#c44e52")
        ci = fit["r2_ci"]
        ax.set_title(f"{name}: R² {fit['r2']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""), fontsize="medium")
        ax.set_xlabel(name + (" (lower = closer)" if name == "S_euc" else ""))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gap = text acc - speech acc")
    fig.suptitle("Gap vs closeness across runs: " + ", ".join(f"{i} {lab}" for i, lab in
                                                               enumerate(next(iter(fits.values()))["labels"], 1)),
                 fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return str(path)
