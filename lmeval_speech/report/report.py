"""``lmeval-speech report RUN_DIR``: the modality gap of one lm-eval run, explained from hidden states.

    lmeval-speech report RUN_DIR [--capture DIR] [--out DIR] [--measure cosine|euclidean]
                         [--path argmax|dtw] [--item PAIR:DOC_ID] [--layer L] [--n-boot N] [--seed S]

RUN_DIR is lm-eval's ``--output_path`` (or its model folder, or one ``results_*.json``) of a run
with ``--log_samples``. The capture dir is read from ``capture_dir=`` in the run's ``model_args``
unless ``--capture`` is given. Writes ``report.json``, ``report.md`` and PNGs to ``--out``
(default ``RUN_DIR/gap_report``) and prints a summary. A section whose inputs are missing (no
capture, no token-level states) is left out with a line in ``notes``.

``report.json`` schema (version 1). Keys are only ever added within a version; ``null`` stands for
a value that is undefined (nan: a constant input, fewer than 3 items, ...) or a section left out.

==================  ===========================================================================
key                 content
==================  ===========================================================================
schema_version      1
run                 ``results_file``, ``samples_files`` {task: path}, ``timestamp`` (lm-eval's
                    date id), ``date`` (unix start time), ``capture_dir``, ``model``,
                    ``model_args`` (as recorded), ``model_args_parsed``, ``limit``,
                    ``lm_eval_version``, ``tasks`` {task: {pair, modality, doc_to_text,
                    n_samples, and for speech twins prompt, tts / spoken or recorded_audio}},
                    ``unpaired_tasks`` (tasks without a twin, not scored). ``compare`` diffs
                    ``model_args``/``tasks`` to flag runs that are not comparable.
overall             ``paired_gap`` over all paired items pooled: n, text_acc, speech_acc,
                    text_stderr, speech_stderr, gap, gap_stderr, ci_low, ci_high (paired
                    bootstrap, percentile), n_boot, alpha, seed, mcnemar {method, statistic, p,
                    discordant}, table {both_right, text_only, speech_only, both_wrong}; plus
                    n_pairs, ``weighted_mean`` {text_acc, speech_acc, gap} (pairs weighted by
                    size: lm-eval's ``weight_by_size`` group score, equal to the pooled values by
                    construction) and ``macro_mean`` {text_acc, speech_acc, gap} (each pair once).
pairs               {pair: paired_gap fields as in ``overall`` plus text_task, speech_task,
                    metric (per-item score used, e.g. acc), filter, ``similarity`` {S_cos, S_euc,
                    n_items} and ``alignment`` {aps, monotonicity, n_items} (null when absent)}
similarity          pooled states, all captured items: layers (hidden-state indices, 0 =
                    embeddings), cosine_mean, cosine_std, euclidean_mean, euclidean_std (per
                    layer, mean and population std over items), S_cos, S_euc (means over
                    layers), n_items. null without a capture.
alignment           token states: measure, path, aps (mean over items of the item APS), aps_per_layer,
                    layers (token-level hidden-state indices), monotonicity (mean over items of
                    the Spearman rho of the path, averaged over layers), n_items, and ``item``
                    {pair, doc_id, chosen_by, layer, aps, n_speech, n_text, critical_tokens
                    [{layer, positions (Bottom-3 speech positions, worst first), scores,
                    text_tokens (text indices aligned to each)}], plot}. With --measure
                    euclidean, A and so APS are *negative* distances. null without token states.
correlation         does closeness predict a speech-only error (text right, speech wrong)? target,
                    n_items, n_speech_only_errors, and per available value (cosine = item mean
                    over layers, euclidean = item mean distance, aps) {point_biserial {r, p, n,
                    note}, logistic {coef, intercept, se, z, p, n, note}}. null without capture.
items               one row per paired item: pair, doc_id, target, text_correct, speech_correct,
                    speech_only_error, cosine, euclidean, aps, monotonicity (null if not captured)
files               report_md and plots {gap, layers, alignment} (file names in --out)
notes               list of strings: sections left out and why, data problems found
==================  ===========================================================================
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from lmeval_speech.fileio import atomic_write
from lmeval_speech.manifest import build_manifest, manifest_path, write_manifest
from lmeval_speech.outcomes import FLAG_METRICS
from lmeval_speech.capture.store import CaptureCorruptError, CaptureReader
from lmeval_speech.metrics import (
    alignment_path_score,
    argmax_path,
    critical_tokens,
    dtw_path,
    layer_similarity,
    logistic_fit,
    paired_gap,
    path_scores,
    point_biserial,
    similarity_matrix,
)
from lmeval_speech.metrics.alignment import MEASURES, PATHS
from lmeval_speech.report import plots
from lmeval_speech import twins
from lmeval_speech.report.runs import UnpairedError, control_items, load_run, pair_items, run_settings

SCHEMA_VERSION = 1
N_CRITICAL = 3
GAP_FIELDS = ("text_acc", "speech_acc", "gap")

HOW_TO_READ = """\
**Gap** is text accuracy minus speech accuracy on the *same* items, so a positive gap is what the
model loses by hearing the question instead of reading it. The 95% CI comes from a paired bootstrap
over items and McNemar's p from the items only one modality got right (`text-only` vs
`speech-only`); both respect the pairing, which is why a few points of gap can be significant.
**Layer similarity** compares, at every depth, the speech positions' mean hidden state with the
mean state of the text twin's question tokens: a cosine that rises (distance that falls) with depth
means the model maps speech onto its text representation as it goes; the layer where it stays low
is where the modality gap lives. **APS** (Alignment Path Score) matches every text token to its most
similar speech position and averages that similarity: 1 means each word has a speech frame
represented like it; monotonicity near 1 means those matches follow word order. The **Bottom-3
speech positions** of an item are the frames that align worst, candidates for interventions.
**Correlation** asks whether items whose speech states sit further from text are the ones lost to
speech (point-biserial r; for cosine and APS a negative r means lower similarity goes with more
speech-only errors)."""


# ----------------------------------------------------------------------------------------- CLI

def _item_arg(value: str) -> tuple[str, int]:
    pair, _, doc = value.rpartition(":")
    if not pair or not doc.strip().lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"expected PAIR:DOC_ID (e.g. speech_arc_easy:12), got {value!r}")
    return pair, int(doc)


def _positive_int(value: str) -> int:
    if int(value) < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return int(value)


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", help="lm-eval --output_path of a --log_samples run (or its model "
                        "folder, or a results_*.json)")
    parser.add_argument("--capture", default=None, help="capture dir (default: capture_dir= in the "
                        "run's model_args)")
    parser.add_argument("--out", default=None, help="output dir (default RUN_DIR/gap_report)")
    parser.add_argument("--measure", choices=MEASURES, default="cosine", help="similarity for APS")
    parser.add_argument("--path", choices=PATHS, default="argmax", help="alignment path for APS")
    parser.add_argument("--item", type=_item_arg, default=None, metavar="PAIR:DOC_ID",
                        help="item for the alignment heat map and Bottom-3 tokens (default: lowest APS)")
    parser.add_argument("--layer", type=int, default=None,
                        help="hidden-state index of the heat map (default: deepest token layer)")
    parser.add_argument("--n-boot", type=_positive_int, default=10000, help="bootstrap resamples for the gap CI")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--include-truncated", action="store_true",
                        help="keep items whose audio was cut to the model's limit in the gap (left out by default)")


def main(args) -> int:
    try:
        run = load_run(args.run_dir)
        out = Path(args.out) if args.out else _default_out(args.run_dir)
        report, heatmap = build_report(run, capture=args.capture, measure=args.measure, path=args.path,
                                       item=args.item, layer=args.layer, n_boot=args.n_boot, seed=args.seed,
                                       include_truncated=args.include_truncated)
    except (UnpairedError, ValueError, FileNotFoundError, CaptureCorruptError) as err:
        print(f"lmeval-speech report: error: {err}", file=sys.stderr)
        return 2
    write_manifest(run)  # next to lm-eval's results: the record of what was measured
    write_outputs(report, heatmap, out)
    print(summary(report))
    print(f"\nwrote {out / 'report.json'}, {out / 'report.md'} and "
          f"{', '.join(report['files']['plots'].values())}")
    return 0


def _default_out(run_dir) -> Path:
    run_dir = Path(run_dir)
    return (run_dir.parent if run_dir.is_file() else run_dir) / "gap_report"


# ------------------------------------------------------------------------------------- compute

def build_report(run: dict, *, capture=None, measure="cosine", path="argmax", item=None, layer=None,
                 n_boot=10000, seed=0, include_truncated=False) -> tuple[dict, dict | None]:
    """The report dict (schema above) and the chosen item's heat-map data (or None)."""
    if not run["pairs"]:
        raise ValueError(f"{run['results_file']} has no text/speech task pair "
                         f"(tasks: {sorted(run['tasks']) or 'none with a pair'})")
    notes = []
    if run["unpaired"]:
        notes.append(f"tasks without a twin in this run, not scored: {run['unpaired']}")
    manifest = {**build_manifest(run), "path": str(manifest_path(run))}
    items_by_pair = {p: pair_items(run, p, include_truncated=include_truncated) for p in run["pairs"]}
    for p, it in items_by_pair.items():
        if it["excluded"]:
            notes.append(f"{p}: left out of the gap, by reason: {it['excluded']} (doc ids {it['excluded_doc_ids']}); "
                         "n counts only items valid in both twins")
    if item is not None and (item[0] not in items_by_pair or item[1] not in items_by_pair[item[0]]["doc_ids"]):
        raise ValueError(f"--item {item[0]}:{item[1]} is not a paired item of this run "
                         f"(pairs: {sorted(items_by_pair)})")

    pairs, overall = _gap_sections(items_by_pair, n_boot, seed)
    controls = _control_sections(run, include_truncated, n_boot, seed, notes)
    rows = _item_rows(items_by_pair)
    settings = run_settings(run)
    reader, capture_dir = _open_capture(settings, capture, notes)
    similarity = alignment = correlation = heatmap = None
    if reader is not None:
        similarity, alignment, per_pair = _hidden_state_sections(reader, rows, items_by_pair, measure, path, notes)
        for pair, sections in per_pair.items():
            pairs[pair].update(sections)
        if alignment is not None:
            alignment["item"], heatmap = _item_detail(reader, rows, items_by_pair, item, layer, measure, path, notes)
        elif item is not None:
            notes.append(f"--item {item[0]}:{item[1]} ignored: no token-level states to align")
        correlation = _correlation(rows, notes) if similarity is not None else None
    elif item is not None:
        notes.append(f"--item {item[0]}:{item[1]} ignored: no capture")

    results = run["results"]
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": {"results_file": run["results_file"],
                "samples_files": {t: info["samples_file"] for t, info in run["tasks"].items()},
                "timestamp": run["timestamp"], "date": results.get("date"), "capture_dir": capture_dir,
                "manifest": manifest["path"], "include_truncated": include_truncated,
                **settings, "unpaired_tasks": run["unpaired"]},
        "overall": overall,
        "pairs": pairs,
        "controls": controls,
        "similarity": similarity,
        "alignment": alignment,
        "correlation": correlation,
        "items": rows,
        "files": {"report_md": "report.md", "plots": {}},
        "notes": notes,
    }
    return report, heatmap


def _gap_sections(items_by_pair: dict, n_boot: int, seed: int) -> tuple[dict, dict]:
    pairs = {}
    for pair, it in items_by_pair.items():
        pairs[pair] = {"text_task": it["text_task"], "speech_task": it["speech_task"], "metric": it["metric"],
                       "filter": it["filter"], "excluded": it["excluded"],
                       **paired_gap(it["text_correct"], it["speech_correct"], n_boot=n_boot, seed=seed),
                       "similarity": None, "alignment": None}
    text = np.concatenate([it["text_correct"] for it in items_by_pair.values()])
    speech = np.concatenate([it["speech_correct"] for it in items_by_pair.values()])
    sizes = np.array([pairs[p]["n"] for p in pairs], dtype=float)
    excluded: dict[str, int] = {}
    for it in items_by_pair.values():
        for reason, k in it["excluded"].items():
            excluded[reason] = excluded.get(reason, 0) + k
    overall = {**paired_gap(text, speech, n_boot=n_boot, seed=seed), "n_pairs": len(pairs), "excluded": excluded,
               "weighted_mean": {k: float(np.average([pairs[p][k] for p in pairs], weights=sizes)) for k in GAP_FIELDS},
               "macro_mean": {k: float(np.mean([pairs[p][k] for p in pairs])) for k in GAP_FIELDS}}
    return pairs, overall


def _control_sections(run: dict, include_truncated: bool, n_boot: int, seed: int, notes: list) -> dict | None:
    """Hearing = speech accuracy minus a prior control's (another item's audio, or silence), paired
    item by item; ``None`` when the run has no control twin."""
    out = {}
    for pair, names in run["pairs"].items():
        for control in twins.CONTROLS:
            if control not in names:
                continue
            it = control_items(run, pair, control, include_truncated)
            g = paired_gap(it["speech_correct"], it["control_correct"], n_boot=n_boot, seed=seed)
            out.setdefault(pair, {})[control] = {
                "control_task": it["control_task"], "n": g["n"], "speech_acc": g["text_acc"],
                "control_acc": g["speech_acc"], "hearing": g["gap"], "ci_low": g["ci_low"], "ci_high": g["ci_high"],
                "mcnemar_p": g["mcnemar"]["p"], "excluded": it["excluded"]}
    if not out:
        return None
    notes.append("controls: hearing = speech accuracy - control accuracy on the same items (paired bootstrap CI)")
    return out


def _item_rows(items_by_pair: dict) -> list[dict]:
    rows = []
    for pair, it in items_by_pair.items():
        for doc_id, target, t, s in zip(it["doc_ids"], it["targets"], it["text_correct"], it["speech_correct"]):
            rows.append({"pair": pair, "doc_id": doc_id, "target": target, "text_correct": bool(t),
                         "speech_correct": bool(s), "speech_only_error": bool(t and not s),
                         "cosine": None, "euclidean": None, "aps": None, "monotonicity": None})
    return rows


def _open_capture(settings: dict, capture, notes: list) -> tuple[CaptureReader | None, str | None]:
    """The capture reader: ``--capture`` must exist; a dir found in model_args may have moved."""
    model_args = settings["model_args_parsed"]
    if capture is None:
        capture = model_args.get("capture_dir")
        if not capture:
            notes.append("no capture: similarity, alignment and correlation omitted (run with "
                         "model_args capture=pooled|tokens,capture_dir=DIR, or pass --capture DIR)")
            return None, None
        if not Path(capture).is_dir():
            notes.append(f"capture dir {capture} from model_args not found: similarity, alignment and "
                         "correlation omitted (pass --capture DIR)")
            return None, str(capture)
    elif not Path(capture).is_dir():
        raise FileNotFoundError(f"--capture {capture} is not a directory")
    reader = CaptureReader(capture)
    captured_by = reader.meta.get("pretrained")
    if captured_by and model_args.get("pretrained") and str(captured_by) != str(model_args["pretrained"]):
        notes.append(f"the capture was written by pretrained={captured_by} but this run used "
                     f"pretrained={model_args['pretrained']}: states may not belong to these scores")
    return reader, str(capture)


def _common_layers(rec_s: dict, rec_t: dict) -> list[int]:
    return [layer for layer in rec_s.get("token_layers") or [] if layer in (rec_t.get("token_layers") or [])]


def _token_states(arrays: dict, record: dict, layers: list[int]) -> list[np.ndarray]:
    return [arrays["tokens"][record["token_layers"].index(layer)] for layer in layers]


def _mean_or_none(values) -> float | None:
    """Mean of the finite values (None counts as missing), None when there is none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _hidden_state_sections(reader, rows, items_by_pair, measure, path, notes):
    """One pass over the captured items: pooled similarity per layer and, with tokens, APS.

    Each item's arrays are loaded once and dropped, so memory stays at one item whatever the run size.
    """
    records = {(r["task"], r["doc_id"]): r for r in reader.records}
    cos, euc, sim_pairs = [], [], []
    aps_layers: dict[int, list[float]] = {}
    missing, no_tokens = 0, 0
    for row in rows:
        it = items_by_pair[row["pair"]]
        rec_s, rec_t = records.get((it["speech_task"], row["doc_id"])), records.get((it["text_task"], row["doc_id"]))
        if rec_s is None or rec_t is None:
            missing += 1
            continue
        speech, text = reader.load(rec_s), reader.load(rec_t)
        if cos and speech["pooled"].shape[0] != len(cos[0]):
            raise ValueError(f"{row['pair']} doc {row['doc_id']}: {speech['pooled'].shape[0]} hidden states, "
                             f"other items have {len(cos[0])}: the capture dir mixes models")
        sim = layer_similarity(speech["pooled"], text["pooled"])
        cos.append(sim["cosine"])
        euc.append(sim["euclidean"])
        sim_pairs.append(row["pair"])
        row["cosine"], row["euclidean"] = float(sim["cosine"].mean()), float(sim["euclidean"].mean())
        layers = _common_layers(rec_s, rec_t) if "tokens" in speech and "tokens" in text else []
        if not layers:
            no_tokens += 1
            continue
        res = alignment_path_score(_token_states(speech, rec_s, layers), _token_states(text, rec_t, layers),
                                   measure=measure, path=path)
        row["aps"], row["monotonicity"] = res["aps"], _mean_or_none(res["monotonicity"])
        for layer, value in zip(layers, res["per_layer"]):
            aps_layers.setdefault(layer, []).append(float(value))
    if missing:
        notes.append(f"{missing} of {len(rows)} paired items lack a captured state for one or both twins "
                     "(capture_limit, an interrupted run, or another task selection): left out of "
                     "similarity and alignment")
    if not cos:
        notes.append("the capture holds no item of this run's pairs: similarity, alignment and "
                     "correlation omitted")
        return None, None, {}
    cos, euc = np.array(cos), np.array(euc)
    similarity = {"layers": list(range(cos.shape[1])),
                  "cosine_mean": cos.mean(0), "cosine_std": cos.std(0),
                  "euclidean_mean": euc.mean(0), "euclidean_std": euc.std(0),
                  "S_cos": float(cos.mean()), "S_euc": float(euc.mean()), "n_items": len(cos)}
    per_pair = {}
    for pair in items_by_pair:
        mask = np.array([p == pair for p in sim_pairs])
        aligned = [r for r in rows if r["pair"] == pair and r["aps"] is not None]
        per_pair[pair] = {
            "similarity": {"S_cos": float(cos[mask].mean()), "S_euc": float(euc[mask].mean()),
                           "n_items": int(mask.sum())} if mask.any() else None,
            "alignment": {"aps": _mean_or_none([r["aps"] for r in aligned]),
                          "monotonicity": _mean_or_none([r["monotonicity"] for r in aligned]),
                          "n_items": len(aligned)} if aligned else None}
    alignment = None
    aligned = [r for r in rows if r["aps"] is not None]
    if aligned:
        token_layers = sorted(aps_layers)
        alignment = {"measure": measure, "path": path, "aps": _mean_or_none([r["aps"] for r in aligned]),
                     "aps_per_layer": [float(np.mean(aps_layers[layer])) for layer in token_layers],
                     "layers": token_layers,
                     "monotonicity": _mean_or_none([r["monotonicity"] for r in aligned]),
                     "n_items": len(aligned)}
        if no_tokens:
            notes.append(f"{no_tokens} captured items have no token-level states for both twins "
                         "(capture=pooled or capture_limit): left out of alignment")
    else:
        notes.append("no token-level states (capture=pooled, or capture_limit reached): alignment "
                     "(APS, monotonicity, critical tokens) omitted")
    return similarity, alignment, per_pair


def _item_detail(reader, rows, items_by_pair, item, layer, measure, path, notes):
    """Bottom-3 critical speech positions per layer and the heat map data for one item.

    Without ``--item`` the item with the lowest APS is shown: the worst-aligned one is the most
    informative picture of where speech fails to reach the text representation.
    """
    if item is None:
        worst = min((r for r in rows if r["aps"] is not None), key=lambda r: r["aps"])
        item, chosen_by = (worst["pair"], worst["doc_id"]), "lowest APS"
    else:
        chosen_by = "--item"
    pair, doc_id = item
    row = next(r for r in rows if r["pair"] == pair and r["doc_id"] == doc_id)
    if row["aps"] is None:
        notes.append(f"--item {pair}:{doc_id} has no token-level states for both twins: no heat map")
        return None, None
    it = items_by_pair[pair]
    records = {(r["task"], r["doc_id"]): r for r in reader.records}
    rec_s, rec_t = records[(it["speech_task"], doc_id)], records[(it["text_task"], doc_id)]
    speech, text = reader.load(rec_s), reader.load(rec_t)
    layers = _common_layers(rec_s, rec_t)
    if layer is None:
        layer = layers[-1]
    elif layer not in layers:
        notes.append(f"--layer {layer} was not captured at token level (token layers: {layers}): "
                     f"heat map drawn at layer {layers[-1]}")
        layer = layers[-1]
    s_layers, t_layers = _token_states(speech, rec_s, layers), _token_states(text, rec_t, layers)
    res = alignment_path_score(s_layers, t_layers, measure=measure, path=path)
    critical, heatmap = [], None
    for k, (lay, s, t) in enumerate(zip(layers, s_layers, t_layers)):
        A = similarity_matrix(s, t, measure)
        token_path = res["paths"][k]
        positions = critical_tokens(A, token_path, k=N_CRITICAL)
        scores = path_scores(A, token_path)
        critical.append({"layer": lay, "positions": positions,
                         "scores": [float(scores[token_path == p].min()) for p in positions],
                         "text_tokens": [np.flatnonzero(token_path == p) for p in positions]})
        if lay == layer:
            heatmap = {"A": A, "argmax_path": argmax_path(A), "dtw": dtw_path(A) if path == "dtw" else None,
                       "critical": positions, "pair": pair, "doc_id": doc_id, "layer": lay,
                       "aps_layer": float(res["per_layer"][k]), "measure": measure}
    detail = {"pair": pair, "doc_id": doc_id, "chosen_by": chosen_by, "layer": layer, "aps": res["aps"],
              "n_speech": int(s_layers[0].shape[0]), "n_text": int(t_layers[0].shape[0]),
              "critical_tokens": critical, "plot": f"alignment_{pair}_{doc_id}.png"}
    return detail, heatmap


def _correlation(rows: list[dict], notes: list) -> dict:
    """Point-biserial r and a logistic fit of speech-only error on each item's closeness."""
    out = {"target": "speech_only_error (text right, speech wrong)"}
    captured = [r for r in rows if r["cosine"] is not None]
    y = np.array([r["speech_only_error"] for r in captured], dtype=float)
    out["n_items"], out["n_speech_only_errors"] = len(captured), int(y.sum())
    for key in ("cosine", "euclidean", "aps"):
        x = np.array([np.nan if r[key] is None else r[key] for r in captured], dtype=float)
        if not np.isfinite(x).any():
            continue
        out[key] = {"point_biserial": point_biserial(y, x), "logistic": logistic_fit(x, y)}
    if out["n_speech_only_errors"] == 0:
        notes.append("no speech-only errors among captured items: correlations are undefined")
    return out


# -------------------------------------------------------------------------------------- output

def _jsonable(obj):
    """numpy -> Python, and nan/inf -> null so the file is strict JSON any parser reads."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_outputs(report: dict, heatmap: dict | None, out) -> None:
    """PNGs first (their names go into the report), then report.json and report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = report["files"]["plots"]
    files["gap"] = Path(plots.gap_plot(report["pairs"], report["overall"], out / "gap.png")).name
    if report["similarity"]:
        files["layers"] = Path(plots.layers_plot(report["similarity"], report["alignment"], out / "layers.png")).name
    if heatmap:
        title = (f"{heatmap['pair']} doc {heatmap['doc_id']}\nA_l at hidden state {heatmap['layer']} "
                 f"({heatmap['measure']}), APS at this layer {heatmap['aps_layer']:.3f}")
        files["alignment"] = Path(plots.alignment_plot(
            heatmap["A"], heatmap["argmax_path"], out / report["alignment"]["item"]["plot"], title=title,
            measure=heatmap["measure"], dtw=heatmap["dtw"], critical=heatmap["critical"])).name
    atomic_write(out / "report.json", json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n")
    atomic_write(out / "report.md", markdown(_jsonable(report)))


def _f(x, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _p(x) -> str:
    return "–" if x is None else (f"{x:.2g}" if x >= 1e-4 else "<1e-4")


def _gap_row(name: str, g: dict) -> str:
    t = g["table"]
    return (f"| {name} | {g['n']} | {_f(g['text_acc'])} | {_f(g['speech_acc'])} | {_f(g['gap'])} | "
            f"[{_f(g['ci_low'])}, {_f(g['ci_high'])}] | {_p(g['mcnemar']['p'])} | "
            f"{t['text_only']} / {t['speech_only']} |")


def markdown(report: dict) -> str:
    """report.md: the same numbers as report.json, as tables a person reads."""
    run, overall = report["run"], report["overall"]
    lines = ["# Modality gap report", "",
             f"- model: `{run['model']}` with model_args `{run['model_args']}`",
             f"- results: `{run['results_file']}` (run {run['timestamp']})",
             f"- capture: `{run['capture_dir'] or 'none'}`", "",
             "## How to read this", "", HOW_TO_READ, "",
             "## Modality gap", "", "![gap](gap.png)", "",
             "| pair | n | text acc | speech acc | gap | 95% CI | McNemar p | text-only / speech-only |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    lines += [_gap_row(pair, g) for pair, g in report["pairs"].items()]
    lines.append(_gap_row("**overall (pooled)**", overall))
    dropped = {p: g["excluded"] for p, g in report["pairs"].items() if g.get("excluded")}
    if dropped:
        lines += ["", "Items left out of the gap (not valid in both twins; `audio_failed` = the audio could not be "
                  "used, never scored; `audio_truncated` = cut to the model's limit, kept with --include-truncated):", "",
                  "| pair | " + " | ".join(FLAG_METRICS) + " |", "|---|" + "---:|" * len(FLAG_METRICS)]
        lines += [f"| {p} | " + " | ".join(str(d.get(m, 0)) for m in FLAG_METRICS) + " |" for p, d in dropped.items()]
    macro = overall["macro_mean"]
    lines += ["", f"Mean over the {overall['n_pairs']} pairs, each counted once: text {_f(macro['text_acc'])}, "
              f"speech {_f(macro['speech_acc'])}, gap {_f(macro['gap'])} (weighted by size it is the pooled row).", ""]

    if report.get("controls"):
        lines += ["## Does the model hear? Prior controls", "",
                  "The speech twin against the same prompt with another item's audio (`shuffled`) or silence "
                  "of the same length (`silence`): their accuracy is what answer priors alone give, and "
                  "**hearing** = speech accuracy - control accuracy (paired, same items).", "",
                  "| pair | control | n | speech acc | control acc | hearing | 95% CI | McNemar p |",
                  "|---|---|---:|---:|---:|---:|---|---:|"]
        lines += [f"| {pair} | {c} | {v['n']} | {_f(v['speech_acc'])} | {_f(v['control_acc'])} | {_f(v['hearing'])} | "
                  f"[{_f(v['ci_low'])}, {_f(v['ci_high'])}] | {_p(v['mcnemar_p'])} |"
                  for pair, cs in report["controls"].items() for c, v in cs.items()]
        lines.append("")

    sim = report["similarity"]
    lines += ["## Layer similarity (pooled states)", ""]
    if sim:
        lines += ["![layers](layers.png)", "",
                  f"S_cos = {_f(sim['S_cos'])}, S_euc = {_f(sim['S_euc'])} over {sim['n_items']} items "
                  "(means over layers).", "",
                  "| hidden state | cosine mean | cosine std | Euclidean mean | Euclidean std |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {layer} | {_f(cm)} | {_f(cs)} | {_f(em)} | {_f(es)} |" for layer, cm, cs, em, es in
                  zip(sim["layers"], sim["cosine_mean"], sim["cosine_std"], sim["euclidean_mean"],
                      sim["euclidean_std"])]
        lines += ["", "| pair | S_cos | S_euc | n |", "|---|---:|---:|---:|"]
        lines += [f"| {pair} | {_f(p['similarity']['S_cos'])} | {_f(p['similarity']['S_euc'])} | "
                  f"{p['similarity']['n_items']} |" for pair, p in report["pairs"].items() if p["similarity"]]
    else:
        lines.append("Omitted: no captured hidden states (see notes).")
    lines.append("")

    al = report["alignment"]
    lines += ["## Alignment Path Score", ""]
    if al:
        lines += [f"APS = {_f(al['aps'])} ({al['measure']}, {al['path']} path) over {al['n_items']} items; "
                  f"path monotonicity (Spearman) = {_f(al['monotonicity'])}.", "",
                  "| hidden state | APS |", "|---:|---:|"]
        lines += [f"| {layer} | {_f(v)} |" for layer, v in zip(al["layers"], al["aps_per_layer"])]
        lines += ["", "| pair | APS | monotonicity | n |", "|---|---:|---:|---:|"]
        lines += [f"| {pair} | {_f(p['alignment']['aps'])} | {_f(p['alignment']['monotonicity'])} | "
                  f"{p['alignment']['n_items']} |" for pair, p in report["pairs"].items() if p["alignment"]]
        item = al.get("item")
        if item:
            lines += ["", f"### Item {item['pair']}:{item['doc_id']} ({item['chosen_by']})", "",
                      f"![alignment]({item['plot']})", "",
                      f"APS {_f(item['aps'])}; {item['n_speech']} speech positions, {item['n_text']} text tokens. "
                      f"Bottom-{N_CRITICAL} speech positions (worst first):", "",
                      "| hidden state | speech positions | scores | aligned text tokens |", "|---:|---|---|---|"]
            lines += [f"| {c['layer']} | {c['positions']} | {[round(s, 3) for s in c['scores']]} | {c['text_tokens']} |"
                      for c in item["critical_tokens"]]
    else:
        lines.append("Omitted: no token-level hidden states (see notes).")
    lines.append("")

    corr = report["correlation"]
    lines += ["## Closeness vs speech-only errors", ""]
    if corr:
        lines += [f"{corr['n_speech_only_errors']} speech-only errors among {corr['n_items']} captured items.", "",
                  "| value | n | point-biserial r | p | logistic coef | p | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for key in ("cosine", "euclidean", "aps"):
            if key in corr:
                pb, lg = corr[key]["point_biserial"], corr[key]["logistic"]
                lines.append(f"| {key} | {pb['n']} | {_f(pb['r'])} | {_p(pb['p'])} | {_f(lg['coef'])} | "
                             f"{_p(lg['p'])} | {pb['note'] or lg['note'] or ''} |")
    else:
        lines.append("Omitted: no captured hidden states (see notes).")
    lines += ["", "## Notes", ""]
    lines += [f"- {n}" for n in report["notes"]] or ["- none"]
    return "\n".join(lines) + "\n"


def summary(report: dict) -> str:
    """The stdout table: gap per pair and overall, then the hidden-state headline numbers."""
    names = list(report["pairs"])
    labels = plots.short_labels(names) + ["overall"]
    width = max(len(s) for s in labels)
    lines = [f"{'pair':<{width}}  {'n':>5}  {'text':>6}  {'speech':>6}  {'gap':>7}  {'95% CI':>17}  {'p':>7}"]
    for label, g in zip(labels, [report["pairs"][n] for n in names] + [report["overall"]]):
        lines.append(f"{label:<{width}}  {g['n']:>5}  {g['text_acc']:>6.3f}  {g['speech_acc']:>6.3f}  "
                     f"{g['gap']:>+7.3f}  [{g['ci_low']:>+6.3f}, {g['ci_high']:>+6.3f}]  {_p(g['mcnemar']['p']):>7}")
    sim, al = report["similarity"], report["alignment"]
    if sim:
        lines.append(f"\nS_cos {_f(sim['S_cos'])}  S_euc {_f(sim['S_euc'])}  (n = {sim['n_items']})")
    if al:
        lines.append(f"APS {_f(al['aps'])} ({al['measure']}, {al['path']})  monotonicity "
                     f"{_f(al['monotonicity'])}  (n = {al['n_items']})")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
