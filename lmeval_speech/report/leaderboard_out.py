"""Owns writing a leaderboard (``report/compare.py`` builds it): ``leaderboard.md``, ``.csv``, ``.json``, the
gap-vs-APS plot and the stdout summary."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmeval_speech.fileio import atomic_write
from lmeval_speech.report.regression import regression_plot
from lmeval_speech.report.render import fmt, fmt_p
from lmeval_speech.report.schema import jsonable

#: the per-run columns read against the baselines (``report.reference``, ``logit_lens``, ``decomposition``)
BASELINE_COLUMNS = ("S_cos_vs_mismatched", "S_cos_centered", "aps_vs_mismatched", "lens_speech_top10",
                    "speech_cascade_kappa")
METRICS = ("n", "text_acc", "speech_acc", "gap", "ci_low", "ci_high", "mcnemar_p", "S_cos", "S_euc", "aps")


# -------------------------------------------------------------------------------------- output

def gap_vs_aps_plot(board: dict, path) -> str:
    """One numbered point per run (hollow when flagged), the least-squares line and its R².

    Points carry numbers and the legend below names them: run labels are long (checkpoint paths,
    TTS specs) and written next to the points they push the axes into a corner.
    """
    runs = [(i, r) for i, r in enumerate(board["runs"], 1) if r["aps"] is not None]
    fit = board["fits"]["gap_vs_aps"]
    fig = Figure(figsize=(6.4, 4.4 + 0.22 * (len(runs) + 1)), layout="constrained")
    ax = fig.subplots()
    for i, r in runs:
        flagged = f" (flags: {', '.join(r['flags'])})" if r["flags"] else ""
        ax.plot(r["aps"], r["gap"], "o", ms=7, color="#4c72b0", mfc="none" if r["flags"] else "#4c72b0",
                label=f"{i}: {r['label']}{flagged}")
        ax.annotate(str(i), (r["aps"], r["gap"]), textcoords="offset points", xytext=(5, 4), fontsize="small")
    if fit["note"] is None:
        xs = np.linspace(min(r["aps"] for _, r in runs), max(r["aps"] for _, r in runs), 2)
        ax.plot(xs, fit["slope"] * xs + fit["intercept"], "-", color="#c44e52",
                label=f"fit: R² = {fit['r2']:.3f}, p = {fit['p']:.2g}, n = {fit['n']}")
    fig.legend(loc="outside lower center", fontsize="small", frameon=False)
    measures = {r["aps_measure"] for _, r in runs}
    ax.set_xlabel("APS" + (" (negative distance)" if measures == {"euclidean"} else ""))
    ax.set_ylabel("gap = text acc - speech acc")
    ax.grid(alpha=0.3)
    ax.set_title("Modality gap vs Alignment Path Score" + ("" if fit["note"] is None else f"\n(no fit: {fit['note']})"),
                 fontsize="medium")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return str(path)


CSV_COLUMNS = ("scope", "label", *METRICS, *BASELINE_COLUMNS, "n_pairs", "tts", "pretrained", "revision", "aps_measure", "aps_path",
               "flags", "report")


def to_csv(board: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in board["runs"]:
        writer.writerow({**row, "scope": "overall", "flags": ";".join(row["flags"])})
    for row in board["pairs"]:
        writer.writerow({**row, "scope": row["pair"], "flags": ";".join(row["flags"])})
    return buf.getvalue()


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _row(names: list[str], r: dict) -> str:
    f, p = fmt, fmt_p
    return (f"| {' | '.join(map(_cell, names))} | {r['n']} | {f(r['text_acc'])} | {f(r['speech_acc'])} | "
            f"{f(r['gap'])} | "
            f"[{f(r['ci_low'])}, {f(r['ci_high'])}] | {p(r['mcnemar_p'])} | {f(r['S_cos'])} | {f(r['S_euc'])} | "
            f"{f(r['aps'])} | {', '.join(r['flags']) or ''} |")


HEADER = ["| {first} | n | text acc | speech acc | gap | 95% CI | McNemar p | S_cos | S_euc | APS | flags |",
          "|---|{extra}---:|---:|---:|---:|---|---:|---:|---:|---:|---|"]


def markdown(board: dict) -> str:
    """leaderboard.md: the JSON's numbers as tables, the fits, and every comparability problem."""
    lines = ["# Modality gap leaderboard", "", HEADER[0].format(first="run"), HEADER[1].format(extra="")]
    lines += [_row([r["label"]], r) for r in board["runs"]]
    lines += ["", "Gap = text accuracy - speech accuracy on the same items (95% paired bootstrap CI); "
              "S_cos / S_euc: mean pooled cosine / distance over layers; APS: Alignment Path Score.", ""]
    lines += baseline_lines(board["runs"])
    lines += ["## Per pair", "", HEADER[0].format(first="run | pair"), HEADER[1].format(extra="---|")]
    lines += [_row([r["label"], r["pair"]], r) for r in board["pairs"]]
    lines += ["", "## Gap vs hidden-state closeness across runs", ""]
    if board["files"]["plot"]:
        lines += [f"![gap vs APS]({board['files']['plot']})", ""]
    lines += ["| fit | n | slope | R² | p | runs | note |", "|---|---:|---:|---:|---:|---|---|"]
    for name, fit in board["fits"].items():
        lines.append(f"| {name} | {fit['n']} | {fmt(fit['slope'])} | {fmt(fit['r2'])} | "
                     f"{fmt_p(fit['p'])} | {_cell(', '.join(fit['runs']))} | {fit['note'] or ''} |")
    lines += regression_lines(board.get("regression"), board["files"].get("regression_plot"))
    lines += ["", "## Comparability", ""]
    diffs = board["comparability"]["differences"]
    if not diffs:
        lines.append("All runs used the same tasks, limit, noise, intervention, prompts, TTS specs, items and "
                     "APS method.")
    for d in diffs:
        where = f" ({', '.join(d['pairs'])})" if d["pairs"] else ""
        lines.append(f"- **{d['aspect']}**{where}: {', '.join(d['runs'])} differ from {', '.join(d['reference'])}")
        lines += [f"  - `{line}`" for line in d["detail"]]
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in board["notes"]] or ["- none"]
    return "\n".join(lines) + "\n"


def baseline_lines(runs: list[dict]) -> list[str]:
    """The runs' figures against their baselines (``compare.baseline_columns``), where any run has one."""
    if not any(r.get(c) is not None for r in runs for c in BASELINE_COLUMNS):
        return []
    lines = ["## Against the baselines", "",
             "S_cos and APS own - mismatched (a mismatched item's text: > 0 means the speech states are closer to "
             "their own question than to another's); centered S_cos (the common direction removed; 0 = no "
             "closer than any pair); the logit lens's best speech top-10 share; speech-cascade kappa (1 = the "
             "model answers as its ASR cascade).", "",
             "| run | S_cos own - mismatched | centered S_cos | APS own - mismatched | lens speech top-10 | "
             "speech-cascade kappa |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {_cell(r['label'])} | " + " | ".join(fmt(r.get(c)) for c in BASELINE_COLUMNS) + " |" for r in runs]
    return lines + [""]


def regression_lines(reg: dict | None, plot: str | None) -> list[str]:
    """The across-run regression (report/regression.py): R² with its item-bootstrap CI per value."""
    if not reg:
        return []
    lines = ["", "## Gap regressed on closeness, with item-bootstrap CIs", "",
             f"Least-squares line of gap on each value across the {reg['n_runs']} runs, over the "
             f"{reg['n_items']} items every run scored; the 95% CIs resample those items (the same resample in "
             "every run).", ""]
    if plot:
        lines += [f"![gap vs similarity]({plot})", ""]
    lines += ["| value | runs | items (value) | slope | 95% CI | R² | 95% CI | p |", "|---|---:|---:|---:|---|---:|---|---:|"]
    for name, f in reg["fits"].items():
        ci = f["r2_ci"] or [None, None]
        sci = f["slope_ci"] or [None, None]
        lines.append(f"| {name} | {f['n']} | {f['n_items_value']} | {fmt(f['slope'])} | [{fmt(sci[0])}, {fmt(sci[1])}] | "
                     f"{fmt(f['r2'])} | [{fmt(ci[0])}, {fmt(ci[1])}] | {fmt_p(f['p'])} |")
    return lines


def write_outputs(board: dict, out) -> None:
    """The plot first (its name goes into the JSON), then md, csv and json, each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(r["aps"] is not None for r in board["runs"]):
        board["files"]["plot"] = Path(gap_vs_aps_plot(board, out / "gap_vs_aps.png")).name
    else:
        board["notes"].append("no run has token-level states (capture=tokens): no APS, no gap_vs_aps.png")
    if board.get("regression"):
        board["files"]["regression_plot"] = Path(regression_plot(board["regression"], out / "gap_vs_similarity.png")).name
    clean = jsonable(board)
    atomic_write(out / "leaderboard.json", json.dumps(clean, indent=2, allow_nan=False) + "\n")
    atomic_write(out / "leaderboard.csv", to_csv(clean))
    atomic_write(out / "leaderboard.md", markdown(clean))


def summary(board: dict) -> str:
    """The stdout view: one line per run, the fits, and each comparability problem."""
    f = fmt
    width = max(len(r["label"]) for r in board["runs"])
    lines = [f"{'run':<{width}}  {'n':>6}  {'text':>6}  {'speech':>6}  {'gap':>7}  {'95% CI':>17}  {'S_cos':>6}  "
             f"{'APS':>6}  flags"]
    for r in board["runs"]:
        ci = f"[{f(r['ci_low'])}, {f(r['ci_high'])}]"
        lines.append(f"{r['label']:<{width}}  {r['n']:>6}  {f(r['text_acc']):>6}  {f(r['speech_acc']):>6}  "
                     f"{f(r['gap']):>7}  {ci:>17}  {f(r['S_cos']):>6}  {f(r['aps']):>6}  {','.join(r['flags'])}")
    for name, fit in board["fits"].items():
        lines.append(f"{name}: R² {f(fit['r2'])} over {fit['n']} runs" + (f" ({fit['note']})" if fit["note"] else ""))
    for d in board["comparability"]["differences"]:
        where = f" [{', '.join(d['pairs'])}]" if d["pairs"] else ""
        lines.append(f"NOT COMPARABLE {d['aspect']}{where}: {', '.join(d['runs'])} vs {', '.join(d['reference'])}: "
                     + "; ".join(d["detail"]))
    lines += [f"note: {n}" for n in board["notes"]]
    return "\n".join(lines)
