"""PNG figures of a gap report, drawn with matplotlib's Agg canvas.

Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, not through ``pyplot``, so
the report never touches the global backend or pyplot's figure registry of the caller's process.
Every function takes plain report sections (see ``report.py``) and writes one file.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

TEXT_COLOR, SPEECH_COLOR, GAP_COLOR, DTW_COLOR = "#4c72b0", "#dd8452", "#55a868", "#c44e52"


def short_labels(names: list[str]) -> list[str]:
    """Pair names without the prefix they all share (``speech_mmlu_continuation_`` ...); the pooled
    row's name is kept as it is and does not count."""
    from lmeval_speech.report.schema import POOLED

    pairs = [n for n in names if n != POOLED]
    if len(pairs) < 2:
        return list(names)
    prefix = os.path.commonprefix(pairs)
    prefix = prefix[: prefix.rfind("_") + 1]
    return [n if n == POOLED else (n[len(prefix):] or n) for n in names]


def _save(fig: Figure, path) -> str:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return str(path)


def _nan(x) -> float:
    return np.nan if x is None else float(x)


def gap_plot(pairs: dict, overall: dict, path, controls: dict | None = None) -> str:
    """Left: text and speech accuracy per pair, with each pair's prior controls (another item's audio,
    silence) marked on its speech bar where the run has them; right: the gap with its bootstrap 95% CI."""
    names = list(pairs)
    rows = [pairs[n] for n in names] + [overall]
    metric = overall.get("metric", "acc")
    labels = short_labels(names) + ["overall (pooled)" if metric == "acc" else f"overall (pooled, {metric})"]
    y = np.arange(len(rows))[::-1]
    fig = Figure(figsize=(10, 1.6 + 0.42 * len(rows)), layout="constrained")
    ax_acc, ax_gap = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 2]})

    ax_acc.barh(y + 0.2, [r["text_acc"] for r in rows], height=0.4, color=TEXT_COLOR, label="text")
    ax_acc.barh(y - 0.2, [r["speech_acc"] for r in rows], height=0.4, color=SPEECH_COLOR, label="speech")
    for control, marker in (("shuffled", "|"), ("silence", "x")):
        at = [(yy, (controls or {}).get(n, {}).get(control, {}).get("control_acc"))
              for yy, n in zip(y, names)]
        at = [(yy, v) for yy, v in at if v is not None]
        if at:
            ax_acc.scatter([v for _, v in at], [yy - 0.2 for yy, _ in at], marker=marker, s=220, color="black",
                           lw=2, zorder=3, label={"shuffled": "another item's audio", "silence": "silence"}[control])
    ax_acc.set_yticks(y, labels)
    ax_acc.set_xlim(0, 1)
    ax_acc.set_xlabel("accuracy")
    ax_acc.legend(loc="lower right", fontsize="small")
    ax_acc.grid(axis="x", alpha=0.3)

    gap = np.array([r["gap"] for r in rows])
    err = np.array([[r["gap"] - r["ci_low"], r["ci_high"] - r["gap"]] for r in rows]).T
    significant = np.array([_nan(r["mcnemar"]["p"]) < 0.05 for r in rows])
    ax_gap.barh(y, gap, height=0.5, color=np.where(significant, GAP_COLOR, "#bbbbbb"))
    ax_gap.errorbar(gap, y, xerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
    ax_gap.axvline(0, color="black", lw=0.8)
    ax_gap.set_xlabel("gap = text - speech, 95% CI")
    ax_gap.set_title("green: McNemar p < 0.05", fontsize="small")
    ax_gap.grid(axis="x", alpha=0.3)
    fig.suptitle("Modality gap per pair")
    return _save(fig, path)


def layers_plot(similarity: dict, alignment: dict | None, path, reference: dict | None = None) -> str:
    """Pooled cosine and Euclidean distance over depth (mean ± std over items), and APS per layer; with
    a reference section, the mismatched pair's values dashed beside them (and the centered cosine)."""
    panels = 3 if alignment else 2
    fig = Figure(figsize=(4.2 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels)
    layers = np.asarray(similarity["layers"])
    for ax, key, color, title in ((axes[0], "cosine", TEXT_COLOR, "cosine similarity (higher = closer)"),
                                  (axes[1], "euclidean", SPEECH_COLOR, "Euclidean distance (lower = closer)")):
        mean = np.array([_nan(v) for v in similarity[f"{key}_mean"]])
        std = np.array([_nan(v) for v in similarity[f"{key}_std"]])
        ax.plot(layers, mean, color=color, marker="o", ms=3, label="own text")
        ax.fill_between(layers, mean - std, mean + std, color=color, alpha=0.25, lw=0)
        if reference:
            pl = reference["per_layer"]
            ax.plot(pl["layers"], [_nan(v) for v in pl[f"{key}_mismatched"]], color=color, ls="--",
                    label="mismatched item's text")
            if key == "cosine":
                ax.plot(pl["layers"], [_nan(v) for v in pl["centered_cosine_own"]], color=GAP_COLOR, marker=".",
                        label="centered, own")
                ax.plot(pl["layers"], [_nan(v) for v in pl["centered_cosine_mismatched"]], color=GAP_COLOR, ls="--",
                        label="centered, mismatched")
            ax.legend(fontsize="x-small")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("hidden-state index (0 = embeddings)")
        ax.grid(alpha=0.3)
    if alignment:
        ax = axes[2]
        ax.plot(alignment["layers"], [_nan(v) for v in alignment["aps_per_layer"]], color=GAP_COLOR, marker="o",
                label="own text")
        if reference and reference.get("aps"):
            ax.plot(reference["aps"]["layers"], [_nan(v) for v in reference["aps"]["per_layer_mismatched"]],
                    color=GAP_COLOR, ls="--", label="mismatched item's text")
            ax.legend(fontsize="x-small")
        ax.set_title(f"APS per layer ({alignment['measure']}, {alignment['path']})", fontsize="medium")
        ax.set_xlabel("hidden-state index (0 = embeddings)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Speech vs text hidden states over depth (n = {similarity['n_items']} items)")
    return _save(fig, path)


def cka_plot(reference: dict, path) -> str:
    """Left: linear CKA of speech vs text states per hidden state, own and mismatched; right: the
    cross-layer CKA matrix (speech layer x text layer)."""
    pl = reference["per_layer"]
    fig = Figure(figsize=(9.5, 3.9), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    ax.plot(pl["layers"], pl["cka"], color=TEXT_COLOR, marker="o", ms=3, label="speech vs its own text")
    ax.plot(pl["layers"], pl["cka_mismatched"], color=TEXT_COLOR, ls="--", label="vs mismatched items' text")
    ax.set_ylim(0, 1)
    ax.set_xlabel("hidden-state index (0 = embeddings)")
    ax.set_title("linear CKA per hidden state", fontsize="medium")
    ax.legend(fontsize="x-small")
    ax.grid(alpha=0.3)
    image = ax2.imshow(np.asarray(reference["cross_layer_cka"], dtype=float), origin="lower", vmin=0, vmax=1,
                       cmap="viridis", aspect="auto")
    ax2.set_xlabel("text hidden state")
    ax2.set_ylabel("speech hidden state")
    ax2.set_title("cross-layer CKA", fontsize="medium")
    fig.colorbar(image, ax=ax2, shrink=0.85)
    fig.suptitle(f"Speech vs text representation geometry (n = {reference['cka_items']} items)")
    return _save(fig, path)


def alignment_plot(A, argmax_path, path, *, title: str, measure: str, dtw=None, critical=()) -> str:
    """Heat map of A_l (speech position x text token) with the argmax path, and the DTW path if given.

    The Bottom-k critical speech positions are marked by dashed lines across the map.
    """
    A = np.asarray(A)
    ts, tt = A.shape
    fig = Figure(figsize=(min(14, 6.5 + 0.08 * tt), min(10, 4.5 + 0.02 * ts)), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(A, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="cosine" if measure == "cosine" else "- Euclidean distance")
    ax.plot(np.arange(tt), argmax_path, "o", mfc="white", mec="black", ms=4, label="argmax path")
    if dtw is not None:
        ax.plot(dtw[1], dtw[0], "-", color=DTW_COLOR, lw=1.5, label="DTW path")
    for k, pos in enumerate(critical):
        ax.axhline(pos, color="#ff4fd8", ls="--", lw=1.2, label="Bottom-3 speech positions" if k == 0 else None)
    ax.set_xlabel("text token j (question tokens of the text twin)")
    ax.set_ylabel("speech position i")
    ax.set_title(title, fontsize="medium")
    ax.legend(loc="upper left", fontsize="small", framealpha=0.7)
    return _save(fig, path)


def decomposition_plot(decomposition: dict, path) -> str:
    """A waterfall per pair: text accuracy, minus recognition (ASR errors), is the cascade's; minus
    misalignment is speech accuracy; the shuffled-audio control below it shows what hearing adds."""
    names = list(decomposition)
    fig = Figure(figsize=(max(5.0, 3.2 * len(names)), 3.8), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name, label in zip(axes, names, short_labels(names)):
        d = decomposition[name]
        text, casc, speech = _nan(d["text_acc"]), _nan(d["cascade_acc"]), _nan(d["speech_acc"])
        hearing = d.get("hearing")
        bars = []
        if d.get("forgetting"):
            base = _nan(d["base_text_acc"])
            bars += [("base LLM text", 0.0, base, "#937860"), ("forgetting", text, base - text, GAP_COLOR)]
        bars += [("text", 0.0, text, TEXT_COLOR), ("recognition", casc, text - casc, GAP_COLOR),
                ("cascade", 0.0, casc, "#8172b3"), ("misalignment", speech, casc - speech, GAP_COLOR),
                ("speech", 0.0, speech, SPEECH_COLOR)]
        if hearing is not None:
            bars.append(("hearing", speech - _nan(hearing["hearing"]), _nan(hearing["hearing"]), DTW_COLOR))
        for i, (what, bottom, height, color) in enumerate(bars):
            ax.bar(i, height, bottom=bottom, color=color, edgecolor="black", linewidth=0.5)
            ax.annotate(f"{height:+.2f}" if what in ("forgetting", "recognition", "misalignment", "hearing") else f"{height:.2f}",
                        (i, bottom + max(height, 0)), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(bars)), [b[0] for b in bars], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{label} (n={d['n']})", fontsize=9)
    axes[0].set_ylabel("accuracy")
    return _save(fig, path)


SWEEP_AXES = ("voice", "rate", "snr_db")


def _axis_label(axis: str, value) -> str:
    return "clean" if (axis == "snr_db" and value is None) else str(value)


def sweep_figure(rows: list[dict]) -> Figure:
    """One panel row per swept axis, one column per measure (speech accuracy, gap, S_cos, APS).

    Every condition is its own point, never averaged with another: x is the condition's value on the
    row's axis, and conditions that share the other axes' values form one series (legend). The gap
    carries its paired-bootstrap 95% CI (``ci_low``/``ci_high`` of the condition's report), speech
    accuracy a Wilson 95% interval from its n items; S_cos and APS have no interval in the report and
    are drawn without one (titled so), so a reader can tell a trend from noise."""
    from scipy.stats import binomtest

    axes_names = [a for a in SWEEP_AXES if len({str(r.get(a)) for r in rows}) > 1] or ["snr_db"]
    metrics = [m for m in ("speech_acc", "gap", "S_cos", "aps") if any(r.get(m) is not None for r in rows)]
    titles = {"speech_acc": "speech acc (Wilson 95% CI)", "gap": "gap text - speech (95% CI)",
              "S_cos": "S_cos (no CI)", "aps": "APS (no CI)"}
    fig = Figure(figsize=(3.4 * len(metrics), 2.9 * len(axes_names)), layout="constrained")
    grid = fig.subplots(len(axes_names), len(metrics), squeeze=False)
    for i, axis in enumerate(axes_names):
        keys = list(dict.fromkeys(r.get(axis) for r in rows))
        others = [a for a in axes_names if a != axis]
        series = list(dict.fromkeys(tuple(r.get(a) for a in others) for r in rows))
        width = 0.25 / max(1, len(series) - 1) if len(series) > 1 else 0.0
        for j, metric in enumerate(metrics):
            ax = grid[i][j]
            for k, other in enumerate(series):
                members = [r for r in rows if tuple(r.get(a) for a in others) == other and r.get(metric) is not None]
                if not members:
                    continue
                xs = [keys.index(r.get(axis)) + (k - (len(series) - 1) / 2) * width for r in members]
                ys = [float(r[metric]) for r in members]
                label = ", ".join(f"{a}={_axis_label(a, v)}" for a, v in zip(others, other)) or None
                err = None
                if metric == "gap" and all(r.get("ci_low") is not None and r.get("ci_high") is not None for r in members):
                    err = np.array([[y - r["ci_low"] for y, r in zip(ys, members)],
                                    [r["ci_high"] - y for y, r in zip(ys, members)]])
                elif metric == "speech_acc" and all(r.get("n") for r in members):
                    cis = [binomtest(round(r["speech_acc"] * r["n"]), r["n"]).proportion_ci(method="wilson")
                           for r in members]
                    err = np.array([[y - c.low for y, c in zip(ys, cis)], [c.high - y for y, c in zip(ys, cis)]])
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, linestyle="-", label=label,  # series k: C{k} in
                            color=f"C{k}" if len(series) > 1 else  # every panel, as the legend says
                            (SPEECH_COLOR if metric == "speech_acc" else GAP_COLOR))
            if metric == "gap":
                ax.axhline(0.0, color="grey", lw=0.8, ls=":")
            ax.set_xticks(range(len(keys)), [_axis_label(axis, k) for k in keys], fontsize=8)
            ax.set_xlabel("SNR (dB)" if axis == "snr_db" else axis, fontsize=8)
            ax.set_title(titles[metric], fontsize=9)
            if j == 0 and len(series) > 1:
                ax.legend(fontsize=7)
    return fig


def sweep_plot(rows: list[dict], path) -> str:
    """:func:`sweep_figure`, written to ``path``."""
    return _save(sweep_figure(rows), path)
