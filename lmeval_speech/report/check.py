"""``lmeval-speech check``: fail a CI job when a run's modality-gap metrics regress past a baseline.

    lmeval-speech check RUN_OR_REPORT --baseline baseline.json [--tolerance 0.02] [--ci] [--update]

RUN_OR_REPORT is read as by ``compare`` (a report.json, a folder with one, or a run dir whose
report is built if missing). Checked metrics, overall (pooled over pairs):

==========  ===============  ==================================================================
metric      worse when       baseline CI
==========  ===============  ==================================================================
gap         higher           the report's paired bootstrap CI
text_acc    lower            percentile bootstrap of the mean over items (binomial draws)
speech_acc  lower            same
aps         lower            percentile bootstrap of the mean item APS (skipped if the baseline
                             has no APS)
S_cos_vs_mismatched  lower   own - mismatched S_cos (report ``reference``), its paired CI
aps_vs_mismatched    lower   own - mismatched APS, its paired CI
speech_cascade_kappa lower   the decomposition's kappa (pooled row, or the only pair), its CI
lens_speech_top10    lower   the logit lens's best speech top-10 share (no CI)
==========  ===============  ==================================================================

The four figures read against a baseline are skipped when the baseline has none (an older baseline,
or a run without capture or cascade); one the baseline has and the run lacks is a regression.
``--tolerance-for METRIC=VALUE`` (repeatable) sets one metric's tolerance (e.g. a kappa on few items
moves more than an accuracy).

A metric regresses when it moves in its bad direction by more than ``--tolerance`` (absolute), or,
with ``--ci``, when it falls outside the baseline's CI on the bad side. Exit codes: 0 all passed
(or ``--update`` wrote the baseline), 1 a regression (the table names it), 2 refused: the run's
settings differ from the baseline's (the same comparison as ``compare``: tasks, limit, noise and
intervention, APS method, per pair prompt, TTS spec and doc ids), or an input is missing or
unreadable. A different ``model_args`` is shown but not refused: the model is what a check is for.

Baseline file (schema_version 1), written atomically by ``--update``::

    {"schema_version": 1, "kind": "lmeval-speech baseline", "created": ISO time (UTC),
     "source": {"report", "results_file"},
     "settings": {"model", "model_args", "tasks", "limit", "conditions", "aps_method",
                  "pairs": {pair: {"prompt", "tts", "items"}}},
     "metrics": {name: {"value", "ci_low", "ci_high", "n"} or null},
     "bootstrap": {"n_boot", "seed", "alpha"}}
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from lmeval_speech.fileio import atomic_write
from lmeval_speech.report.schema import jsonable
from lmeval_speech.report import compare

SCHEMA_VERSION = 1
KIND = "lmeval-speech baseline"
#: metric -> True when a higher value is worse
HIGHER_IS_WORSE = {"gap": True, "text_acc": False, "speech_acc": False, "aps": False,
                   "S_cos_vs_mismatched": False, "aps_vs_mismatched": False, "speech_cascade_kappa": False,
                   "lens_speech_top10": False}
REFUSED_ASPECTS = ("tasks", "limit", "conditions", "aps_method", "pairs")
_EPS = 1e-12  # a delta exactly at the tolerance passes despite float rounding
_CHUNK = 500


class BaselineError(ValueError):
    """The baseline file is missing, unreadable or of another schema (a ValueError: exit 2)."""


def _tolerance(value: str) -> float:
    try:
        tolerance = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not tolerance >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return tolerance


def add_arguments(parser) -> None:
    parser.add_argument("run", metavar="RUN_OR_REPORT", help="report.json, a folder with one, or an lm-eval run dir")
    parser.add_argument("--baseline", required=True, help="baseline JSON (written by --update)")
    parser.add_argument("--tolerance", type=_tolerance, default=0.02,
                        help="allowed absolute move in the bad direction (default 0.02)")
    parser.add_argument("--tolerance-for", action="append", default=[], metavar="METRIC=VALUE",
                        help=f"one metric's tolerance, repeatable (metrics: {', '.join(HIGHER_IS_WORSE)})")
    parser.add_argument("--ci", action="store_true",
                        help="also fail when a metric leaves the baseline's bootstrap CI on the bad side")
    parser.add_argument("--update", action="store_true", help="write this run as the new baseline and exit 0")


def main(args) -> int:
    try:
        rep, path = compare.load_report(args.run)
        notes: list[str] = []
        current = make_baseline(rep, path, notes)
        if args.update:
            Path(args.baseline).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(Path(args.baseline), json.dumps(jsonable(current), indent=2,
                                                                      allow_nan=False) + "\n")
            print(f"wrote baseline {args.baseline} from {path}")
            print(_values_line(current["metrics"]))
            return 0
        baseline = read_baseline(args.baseline)
    except compare.ERRORS as err:
        print(f"lmeval-speech check: error: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"note: {note}")
    refused = settings_differences(baseline["settings"], current["settings"])
    model_change = compare.diff({k: baseline["settings"].get(k) for k in ("model", "model_args")},
                                {k: current["settings"][k] for k in ("model", "model_args")})
    for line in model_change:
        print(f"model differs from the baseline (allowed): {line}")
    if refused:
        print(f"lmeval-speech check: refused: {path} was made with other settings than the baseline "
              f"{args.baseline}, so its numbers are not comparable:", file=sys.stderr)
        for line in refused:
            print(f"  - {line}", file=sys.stderr)
        print("  (run with --update to make this run the baseline)", file=sys.stderr)
        return 2
    try:
        tolerances = per_metric_tolerances(args.tolerance_for)
    except ValueError as err:
        print(f"lmeval-speech check: error: {err}", file=sys.stderr)
        return 2
    rows = compare_metrics(baseline["metrics"], current["metrics"], args.tolerance, args.ci, tolerances)
    print(table(rows, args.tolerance, args.ci))
    regressed = [r["metric"] for r in rows if r["status"].startswith("REGRESSED")]
    passed = [r["metric"] for r in rows if r["status"].startswith("ok")]
    print(f"\npassed: {', '.join(passed) or 'none'}")
    if regressed:
        print(f"regressed: {', '.join(regressed)}")
        return 1
    return 0


# ------------------------------------------------------------------------------------ baseline

def _bootstrap_mean_ci(values, n_boot: int, seed: int, alpha: float) -> tuple[float, float]:
    """Percentile CI of a mean by resampling items, in chunks so memory stays O(chunk * n)."""
    values = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = np.concatenate([values[rng.integers(0, values.size, (min(_CHUNK, n_boot - start), values.size))].mean(1)
                            for start in range(0, n_boot, _CHUNK)])
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _accuracy_ci(n: int, acc: float, n_boot: int, seed: int, alpha: float) -> tuple[float, float]:
    """Bootstrap of a 0/1 mean: the resampled count of ones is Binomial(n, acc), drawn directly."""
    draws = np.random.default_rng(seed).binomial(n, acc, size=n_boot) / n
    low, high = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def make_baseline(rep: dict, path, notes: list | None = None) -> dict:
    """The baseline dict (schema above) for one report: settings, metrics and their CIs."""
    ov = rep["overall"]
    n_boot, seed, alpha = ov["n_boot"], ov["seed"], ov["alpha"]
    metrics = {"gap": {"value": ov["gap"], "ci_low": ov["ci_low"], "ci_high": ov["ci_high"], "n": ov["n"]}}
    for key in ("text_acc", "speech_acc"):
        low, high = _accuracy_ci(ov["n"], ov[key], n_boot, seed, alpha)
        metrics[key] = {"value": ov[key], "ci_low": low, "ci_high": high, "n": ov["n"]}
    aps_items = [r["aps"] for r in rep["items"] if r["aps"] is not None]
    metrics["aps"] = None
    if rep.get("alignment") and aps_items:
        low, high = _bootstrap_mean_ci(aps_items, n_boot, seed, alpha)
        metrics["aps"] = {"value": rep["alignment"]["aps"], "ci_low": low, "ci_high": high, "n": len(aps_items)}
    metrics.update({k: v for k, v in compare.baseline_figures(rep).items() if k in HIGHER_IS_WORSE})
    run = rep["run"]
    return {"schema_version": SCHEMA_VERSION, "kind": KIND,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"report": str(path), "results_file": run["results_file"]},
            "settings": {"model": run.get("model"), "model_args": run.get("model_args_parsed"),
                         **compare.settings(rep, notes)},
            "metrics": metrics, "bootstrap": {"n_boot": n_boot, "seed": seed, "alpha": alpha}}


def read_baseline(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BaselineError(f"baseline {path} not found: create it from a trusted run with --update")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BaselineError(f"baseline {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise BaselineError(f"{path} is not an lmeval-speech baseline (write one with --update)")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise BaselineError(f"baseline {path} has schema_version {data.get('schema_version')!r}; this version "
                            f"reads {SCHEMA_VERSION} (rewrite it with --update)")
    return data


def settings_differences(baseline: dict, current: dict) -> list[str]:
    """What makes the run incomparable to the baseline (APS method only when the baseline has APS;
    conditions only when the baseline records them: one written before they were compared does not)."""
    keys = [k for k in REFUSED_ASPECTS if (k != "aps_method" or baseline.get("aps_method") is not None)
            and (k != "conditions" or k in baseline)]
    return compare.diff({k: baseline.get(k) for k in keys}, {k: current.get(k) for k in keys})


# --------------------------------------------------------------------------------------- check

def per_metric_tolerances(items: list[str]) -> dict[str, float]:
    """``["kappa=0.1", ...]`` -> {metric: tolerance}; an unknown metric or a bad number is an error."""
    out = {}
    for item in items:
        metric, _, value = item.partition("=")
        if metric not in HIGHER_IS_WORSE:
            raise ValueError(f"--tolerance-for {item!r}: no metric {metric!r} (metrics: {', '.join(HIGHER_IS_WORSE)})")
        try:
            out[metric] = _tolerance(value)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--tolerance-for {item!r}: {err}") from None
    return out


def compare_metrics(baseline: dict, current: dict, tolerance: float, use_ci: bool,
                    tolerances: dict | None = None) -> list[dict]:
    rows = []
    for metric, higher_is_worse in HIGHER_IS_WORSE.items():
        base, new = baseline.get(metric), current.get(metric)
        row = {"metric": metric, "worse": "higher" if higher_is_worse else "lower", "baseline": base, "run": new}
        if base is None:
            rows.append({**row, "delta": None, "status": "skipped (not in baseline)"})
            continue
        if new is None or new.get("value") is None:
            rows.append({**row, "delta": None, "status": "REGRESSED (not in this run)"})
            continue
        tol = (tolerances or {}).get(metric, tolerance)
        delta = new["value"] - base["value"]
        worse_by = delta if higher_is_worse else -delta
        reasons = []
        if worse_by > tol + _EPS:
            reasons.append("tolerance")
        bound = base.get("ci_high") if higher_is_worse else base.get("ci_low")
        outside = bound is not None and (new["value"] > bound if higher_is_worse else new["value"] < bound)
        if use_ci and outside:
            reasons.append("CI")
        if reasons:
            status = f"REGRESSED ({', '.join(reasons)})"
        else:
            status = "ok (improved)" if -worse_by > tol + _EPS else "ok"
        rows.append({**row, "delta": delta, "status": status})
    return rows


def _num(x, sign: bool = False) -> str:
    return "–" if x is None else (f"{x:+.4f}" if sign else f"{x:.4f}")


def table(rows: list[dict], tolerance: float, use_ci: bool) -> str:
    """The diff table: baseline value and CI, this run's value, the move and the verdict."""
    head = (f"{'metric':<20}  {'worse if':<8}  {'baseline':>8}  {'baseline 95% CI':>18}  {'run':>8}  "
            f"{'delta':>8}  status")
    lines = [f"tolerance {tolerance:g} (absolute){', CI check on' if use_ci else ''}", head, "-" * len(head)]
    for r in rows:
        base = r["baseline"] or {}
        ci = f"[{_num(base.get('ci_low'))}, {_num(base.get('ci_high'))}]" if base else "–"
        lines.append(f"{r['metric']:<20}  {r['worse']:<8}  {_num(base.get('value')):>8}  {ci:>18}  "
                     f"{_num((r['run'] or {}).get('value')):>8}  {_num(r['delta'], sign=True):>8}  {r['status']}")
    return "\n".join(lines)


def _values_line(metrics: dict) -> str:
    return "  ".join(f"{k} {_num(m['value'])} [{_num(m['ci_low'])}, {_num(m['ci_high'])}]"
                     for k, m in metrics.items() if m is not None)
