"""``lmeval-speech compare``: a leaderboard of several runs' modality gaps, with comparability checks.

    lmeval-speech compare RUN_OR_REPORT... [--out DIR] [--labels a,b,...] [--html]

Each argument is a ``report.json``, a folder holding one, or an lm-eval run dir (``--output_path``,
its model folder or a ``results_*.json``). For a run dir the report in ``gap_report/`` is used when
it was built from the run's latest results file; otherwise it is built there (as ``lmeval-speech
report`` would, default options). Writes ``leaderboard.md``, ``leaderboard.csv``,
``leaderboard.json`` and ``gap_vs_aps.png`` to ``--out`` (default ``./leaderboard``); with ``--html`` also
``leaderboard.html`` (sortable tables, flagged rows; ``report/html.py``).

A gap only compares across runs that asked the same questions the same way, so the runs' settings
are diffed and every difference is listed in a "comparability" section; rows stay in the tables
but carry a flag naming what differs. The reference value of a setting is the one most runs share
(ties: the earlier run on the command line); runs with another value are flagged.

==========  =======================================================================================
aspect      what is compared (run level, or per pair ``p``)
==========  =======================================================================================
tasks       the paired task names scored (overall numbers pool different tasks)
limit       lm-eval's ``--limit``
conditions  the noise mixed into the audio (kind, SNR, seed) and the intervention (its spec, less its
            hook sites and where its calibration was saved), from the run manifest
aps_method  APS ``measure`` and ``path`` (only among runs with token-level states)
prompt      per pair: each twin's ``doc_to_text``, the speech ``prompt``/``spoken`` template and,
            from the results file, ``description``, delimiters, ``doc_to_choice``, n-shot,
            ``system_instruction``, ``chat_template``, ``fewshot_as_multiturn``
tts         per pair: the effective TTS spec (task ``tts`` with model_args ``tts_engine``/
            ``tts_voice``/``tts_rate`` applied) or the ``recorded_audio`` source
items       per pair: the doc ids scored (as ``[first, last]`` ranges)
==========  =======================================================================================

``leaderboard.json`` (schema_version 1): ``runs`` (one row per run: label, report, results_file,
model, model_args, pretrained, revision, tts, n, n_pairs, text_acc, speech_acc, gap, ci_low,
ci_high, mcnemar_p, S_cos, S_euc, aps, aps_measure, aps_path, the figures against their baselines
S_cos_vs_mismatched, S_cos_centered, aps_vs_mismatched, lens_speech_top10, speech_cascade_kappa
(``baseline_columns``), flags), ``pairs`` (the same per run
and pair, with ``pair``), ``fits`` {gap_vs_aps, gap_vs_S_cos, gap_vs_S_euc: ``linear_fit`` of gap
on the value across runs, plus ``runs`` used and ``flagged`` among them}, ``comparability``
{comparable, differences [{aspect, pairs (null: run level), reference, runs, detail}]}, ``files``, ``notes``.
``regression`` (report/regression.py; null with fewer than 3 runs): {fits {value: linear_fit fields plus
x, y, labels, n_items_gap, n_items_value, r2_ci, slope_ci, n_boot}, n_runs, n_items, seed}, plotted in
``gap_vs_similarity.png``.
``leaderboard.csv`` holds the run rows (``scope`` = overall) followed by the pair rows (``scope`` =
the pair).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lmeval_speech.capture.store import CaptureCorruptError
from lmeval_speech.conditions import across_models
from lmeval_speech.manifest import PROMPT_KEYS
from lmeval_speech.metrics import linear_fit
from lmeval_speech.report.leaderboard_out import (  # noqa: F401 (the leaderboard's writers, re-exported)
    BASELINE_COLUMNS,
    CSV_COLUMNS,
    METRICS,
    markdown,
    summary,
    to_csv,
    write_outputs,
)
from lmeval_speech.report.inputs import load_report
from lmeval_speech.report.regression import regression
from lmeval_speech.report.schema import POOLED, jsonable

SCHEMA_VERSION = 1
FIT_VALUES = {"gap_vs_aps": "aps", "gap_vs_S_cos": "S_cos", "gap_vs_S_euc": "S_euc"}
#: What a bad input raises (ValueError covers UnpairedError and invalid JSON): exit 2 with the message.
ERRORS = (ValueError, OSError, CaptureCorruptError)


# ----------------------------------------------------------------------------------------- CLI

#: Differences that make a ranking meaningless unless the user asks for it (``--allow-mismatch``).
MISMATCH_ASPECTS = ("tts", "prompt")


def add_arguments(parser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_OR_REPORT",
                        help="report.json, a folder with one, or an lm-eval run dir (report built if missing)")
    parser.add_argument("--out", default="leaderboard", help="output dir (default ./leaderboard)")
    parser.add_argument("--labels", default=None, help="comma-separated row labels, one per run "
                        "(default: model_args pretrained [@revision] + TTS)")
    parser.add_argument("--allow-mismatch", action="store_true",
                        help="rank runs whose TTS spec or prompt (incl. chat template) differ; the tables mark them")
    parser.add_argument("--html", action="store_true",
                        help="also write leaderboard.html: sortable tables with the comparability flags")


def main(args) -> int:
    try:
        loaded = [load_report(r) for r in args.runs]
        labels = _labels(args.labels, [rep for rep, _ in loaded])
        board = build_leaderboard([rep for rep, _ in loaded], labels, [str(p) for _, p in loaded])
        blocking = [d for d in board["comparability"]["differences"] if d["aspect"] in MISMATCH_ASPECTS]
        if blocking and not args.allow_mismatch:
            raise ValueError("the runs differ in what was measured, so their numbers cannot be ranked "
                             "(pass --allow-mismatch to rank them anyway, marked):\n  "
                             + "\n  ".join(f"{d['aspect']} ({', '.join(d['runs'])}): {'; '.join(d['detail'])}"
                                            for d in blocking))
    except ERRORS as err:
        print(f"lmeval-speech compare: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_outputs(board, out)
    if getattr(args, "html", False):
        from lmeval_speech.report.html import write_leaderboard_html

        board["files"]["html"] = Path(write_leaderboard_html(jsonable(board), out)).name
    print(summary(board))
    print(f"\nwrote {', '.join(str(out / f) for f in board['files'].values() if f)}")
    return 0


# ----------------------------------------------------------------------------------- settings

def _ranges(ids) -> list[list[int]]:
    """Sorted doc ids as inclusive ``[first, last]`` runs: exact, and short for ``--limit`` prefixes."""
    out = []
    for d in sorted(set(ids)):
        if out and d == out[-1][1] + 1:
            out[-1][1] = d
        else:
            out.append([d, d])
    return out


def _expand(ranges) -> set[int]:
    return {d for lo, hi in ranges for d in range(lo, hi + 1)}


def _tts_specs(rep: dict) -> dict:
    """{pair: effective audio spec of its speech twin, from the run manifest} (None when none)."""
    tasks = rep["manifest"]["tasks"]
    out = {}
    for pair, p in rep["pairs"].items():
        audio = (tasks.get(p["speech_task"]) or {}).get("audio") or {}
        out[pair] = audio.get("tts") or ({"recorded_audio": audio["recorded"]} if "recorded" in audio else None)
    return out


def settings(rep: dict, notes: list | None = None) -> dict:
    """What must match for two runs' numbers to be compared (the aspects in the module docstring),
    read from the run manifest the report embeds: a pure function of ``report.json``."""
    if "manifest" not in rep:
        raise ValueError(f"{rep['run'].get('results_file')}: this report has no run manifest (made by an older "
                         "lmeval-speech); rebuild it with lmeval-speech report")
    man = rep["manifest"]
    ids = {}
    for row in rep["items"]:
        ids.setdefault(row["pair"], []).append(row["doc_id"])
    tts = _tts_specs(rep)
    pairs = {}
    for pair, p in rep["pairs"].items():
        prompt = {}
        for modality in ("text", "speech"):
            task = man["tasks"].get(p[f"{modality}_task"], {})
            prompt[modality] = {"doc_to_text": task.get("prompt"), **{k: task.get(k) for k in PROMPT_KEYS},
                                "n_shot": task.get("n_shot")}
            if modality == "speech":
                prompt[modality] |= {"prompt": task.get("speech_prompt"), "spoken": (task.get("audio") or {}).get("spoken")}
        pairs[pair] = {"prompt": {**prompt, "chat": man.get("chat")}, "tts": tts[pair], "items": _ranges(ids.get(pair, []))}
    al = rep.get("alignment")
    return {"tasks": sorted(t for p in rep["pairs"].values() for t in (p["text_task"], p["speech_task"])),
            "limit": rep["run"].get("limit"), "conditions": _conditions(man),
            "aps_method": [al["measure"], al["path"]] if al else None, "pairs": pairs}


def _conditions(man: dict) -> dict:
    """The run conditions that change what the model hears or computes besides the TTS spec: the noise
    ``lslm`` mixed into the audio, the rules that rewrote its TTS texts, and its intervention (the spec, less the hook sites and where its
    calibration was saved, which change no number)."""
    if man.get("conditions") is not None:  # the one record, and the one list of what compare compares
        return across_models(man["conditions"])
    intervention = (man.get("hooks") or {}).get("intervention")
    return {"noise": (man.get("settings") or {}).get("noise"),
            "spoken_form": (man.get("settings") or {}).get("spoken_form"),
            "intervention": None if intervention is None else
            {k: v for k, v in intervention.items() if k not in ("hooks", "save_calibration")}}


def _key(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value, width: int = 60) -> str:
    if value is None:
        return "(absent)"
    text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def diff(reference, value, path: str = "") -> list[str]:
    """Human-readable differences ``path: reference -> value`` (items as counts and doc ids)."""
    if path.endswith("items") and isinstance(reference, list) and isinstance(value, list):
        ref, new = _expand(reference), _expand(value)
        if ref == new:
            return []
        out = [f"{path}: {len(ref)} -> {len(new)} items"]
        for what, ids in (("only in reference", ref - new), ("only here", new - ref)):
            if ids:
                listed = sorted(ids)
                out.append(f"{path}: doc ids {what} {listed[:10]}{' ...' if len(listed) > 10 else ''}")
        return out
    if isinstance(reference, dict) and isinstance(value, dict):
        return [line for k in dict.fromkeys([*reference, *value])
                for line in diff(reference.get(k), value.get(k), f"{path}.{k}" if path else str(k))]
    return [] if _key(reference) == _key(value) else [f"{path}: {_short(reference)} -> {_short(value)}"]


def _groups(values: dict) -> list[list[str]]:
    """Labels grouped by equal value, the reference group (largest, ties: first seen) first."""
    groups: dict[str, list[str]] = {}
    for label, value in values.items():
        groups.setdefault(_key(value), []).append(label)
    return sorted(groups.values(), key=len, reverse=True)  # stable: equal sizes keep first-seen order


def comparability(run_settings: dict[str, dict]) -> list[dict]:
    """Every setting on which the runs disagree: the reference runs, the others and what differs.

    Per-pair differences that are the same for several pairs (one TTS voice for all 57 MMLU
    subjects) are listed once with all those ``pairs``; run-level ones have ``pairs`` null.
    """
    checks = [(aspect, None, {lab: s[aspect] for lab, s in run_settings.items()
                              if aspect != "aps_method" or s[aspect] is not None})
              for aspect in ("tasks", "limit", "conditions", "aps_method")]
    all_pairs = dict.fromkeys(p for s in run_settings.values() for p in s["pairs"])
    checks += [(aspect, pair, {lab: s["pairs"][pair][aspect] for lab, s in run_settings.items() if pair in s["pairs"]})
               for aspect in ("prompt", "tts", "items") for pair in all_pairs]
    merged: dict[str, dict] = {}
    for aspect, pair, values in checks:
        if not values:
            continue
        groups = _groups(values)
        ref = values[groups[0][0]]
        for group in groups[1:]:
            entry = {"aspect": aspect, "pairs": None, "reference": groups[0], "runs": group,
                     "detail": diff(ref, values[group[0]], aspect)}
            same = merged.setdefault(_key({**entry, "pairs": pair is None}), entry)
            if pair is not None:
                same["pairs"] = (same["pairs"] or []) + [pair]
    return list(merged.values())


# ---------------------------------------------------------------------------------- leaderboard

def _short_model(pretrained: str) -> str:
    """The last two path parts of a checkpoint path (``run1/checkpoint-500``), a hub id as is."""
    parts = [p for p in str(pretrained).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) or str(pretrained)


def _tts_name(rep: dict) -> str:
    specs = {_key(spec): spec for spec in _tts_specs(rep).values() if spec}
    if not specs:
        return "no audio spec"
    if len(specs) > 1:
        return "mixed TTS"
    (spec,) = specs.values()
    if "recorded_audio" in spec:
        return "recorded"
    return f"{spec.get('engine')}:{spec.get('voice')}@{spec.get('rate')}"


def default_label(rep: dict) -> str:
    args = rep["run"].get("model_args_parsed") or {}
    model = _short_model(args.get("pretrained") or rep["run"].get("model") or "?")
    if args.get("revision"):
        model += f"@{args['revision']}"
    return f"{model} [{_tts_name(rep)}]"


def _labels(given: str | None, reports: list[dict]) -> list[str]:
    if given is not None:
        labels = [s.strip() for s in given.split(",")]
        if len(labels) != len(reports) or not all(labels):
            raise ValueError(f"--labels has {len(labels)} labels for {len(reports)} runs")
        if len(set(labels)) != len(labels):
            raise ValueError(f"--labels must be unique, got {labels}")
        return labels
    labels = [default_label(r) for r in reports]
    return [f"{lab} ({labels[:i].count(lab) + 1})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]


def _metrics(gap: dict, similarity: dict | None, alignment: dict | None) -> dict:
    return {"n": gap["n"], "text_acc": gap["text_acc"], "speech_acc": gap["speech_acc"], "gap": gap["gap"],
            "ci_low": gap["ci_low"], "ci_high": gap["ci_high"], "mcnemar_p": gap["mcnemar"]["p"],
            "S_cos": similarity["S_cos"] if similarity else None,
            "S_euc": similarity["S_euc"] if similarity else None,
            "aps": alignment["aps"] if alignment else None}


def _pooled_states(rep: dict) -> tuple[dict | None, dict | None, list[str]]:
    """S_cos / S_euc / APS of a run row over the pairs its gap pools (``overall.pairs_pooled``: the
    headline metric's), each pair weighted by its captured items, as the report pools them; and the
    captured pairs left out (scored by another metric). A fit of gap against S_cos or APS is then over
    the same pairs on both axes."""
    pooled = rep["overall"].get("pairs_pooled") or list(rep["pairs"])
    out = []
    for key, fields in (("similarity", ("S_cos", "S_euc")), ("alignment", ("aps",))):
        rows = [rep["pairs"][p][key] for p in pooled if (rep["pairs"].get(p) or {}).get(key)]
        rows = [r for r in rows if all(r.get(f) is not None for f in fields) and r.get("n_items")]
        weights = [r["n_items"] for r in rows]
        out.append({f: float(np.average([r[f] for r in rows], weights=weights)) for f in fields} if rows else None)
    left_out = [p for p in rep["pairs"] if p not in pooled and (rep["pairs"][p].get("similarity") or
                                                                rep["pairs"][p].get("alignment"))]
    return out[0], out[1], left_out


def baseline_figures(rep: dict) -> dict:
    """A run's figures read against their baselines, each {value, ci_low, ci_high, n} or None: own - mismatched
    S_cos and APS (with their paired CIs) and the centered S_cos (report/reference.py), the logit lens's best
    speech top-10 share (report/lens.py; no CI), the speech-cascade kappa of the decomposition's pooled row or
    its only pair (report/decomposition.py). ``compare``'s columns and ``check``'s metrics both read these."""
    ref, lens, dec = rep.get("reference") or {}, rep.get("logit_lens") or {}, rep.get("decomposition") or {}
    row = dec.get(POOLED) or (next(iter(dec.values())) if len(dec) == 1 else {})
    best = lens.get("best_speech_layer") or {}

    def figure(d: dict | None, key: str, ci: bool = True, n=None) -> dict | None:
        if not d or d.get(key) is None:
            return None
        return {"value": d[key], "ci_low": d.get("ci_low") if ci else None,
                "ci_high": d.get("ci_high") if ci else None, "n": d.get("n") if n is None else n}

    return {"S_cos_vs_mismatched": figure(ref.get("S_cos"), "difference"),
            "S_cos_centered": figure(ref.get("S_cos_centered"), "own", ci=False),  # its CI is the difference's
            "aps_vs_mismatched": figure(ref.get("aps"), "difference"),
            "lens_speech_top10": figure(best, "top10", ci=False, n=best.get("n_tokens")),
            "speech_cascade_kappa": figure(row.get("speech_cascade_kappa"), "kappa")}


def baseline_columns(rep: dict) -> dict:
    """The leaderboard's columns: each of ``baseline_figures``' values (None where absent)."""
    return {k: None if f is None else f["value"] for k, f in baseline_figures(rep).items()}


def _fit(runs: list[dict], key: str) -> dict:
    used = [r for r in runs if r[key] is not None and r["gap"] is not None]
    fit = linear_fit([r[key] for r in used], [r["gap"] for r in used])
    return {**fit, "x": key, "y": "gap", "runs": [r["label"] for r in used],
            "flagged": [r["label"] for r in used if r["flags"]]}


def build_leaderboard(reports: list[dict], labels: list[str], paths: list[str]) -> dict:
    """The leaderboard dict (schema in the module docstring) from loaded reports."""
    notes: list[str] = []
    run_settings = {lab: settings(rep, notes) for lab, rep in zip(labels, reports)}
    differences = comparability(run_settings)
    flags = {lab: set() for lab in labels}
    pair_flags: dict[tuple[str, str], set] = {}
    for d in differences:
        for lab in d["runs"]:
            flags[lab].add(d["aspect"])
            for pair in d["pairs"] or ():
                pair_flags.setdefault((lab, pair), set()).add(d["aspect"])
    runs, pairs = [], []
    for lab, rep, path in zip(labels, reports, paths):
        run, args = rep["run"], rep["run"].get("model_args_parsed") or {}
        al = rep.get("alignment")
        similarity, alignment, left_out = _pooled_states(rep)
        if left_out:
            notes.append(f"{lab}: S_cos, S_euc and APS of the run row (and the fits) are over the pairs its gap "
                         f"pools ({rep['overall'].get('metric')}); {left_out}, scored by other metrics, are left out")
        runs.append({"label": lab, "report": path, "results_file": run["results_file"], "model": run.get("model"),
                     "model_args": run.get("model_args"), "pretrained": args.get("pretrained"),
                     "revision": args.get("revision"), "tts": _tts_name(rep), "n_pairs": rep["overall"]["n_pairs"],
                     **_metrics(rep["overall"], similarity, alignment),
                     "aps_measure": al["measure"] if al else None, "aps_path": al["path"] if al else None,
                     **baseline_columns(rep), "flags": sorted(flags[lab])})
        aps_flag = {"aps_method"} & flags[lab]
        for pair, p in rep["pairs"].items():
            pairs.append({"label": lab, "pair": pair, **_metrics(p, p.get("similarity"), p.get("alignment")),
                          "flags": sorted(pair_flags.get((lab, pair), set()) | aps_flag)})
    fits = {name: _fit(runs, key) for name, key in FIT_VALUES.items()}
    for name, fit in fits.items():
        if fit["flagged"] and fit["note"] is None:
            notes.append(f"{name} pools runs that are not comparable to the reference: {fit['flagged']}")
    return {"schema_version": SCHEMA_VERSION, "runs": runs, "pairs": pairs, "fits": fits,
            "regression": regression(reports, labels),
            "comparability": {"comparable": not differences, "differences": differences},
            "files": {"markdown": "leaderboard.md", "csv": "leaderboard.csv", "json": "leaderboard.json",
                      "plot": None, "regression_plot": None},
            "notes": notes}
