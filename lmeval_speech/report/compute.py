"""Owns computing a report: one pass over a run's paired items (and its capture store) that
returns the ``report.json`` dict (``report.schema``) without writing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmeval_speech import twins
from lmeval_speech.capture.store import CaptureReader, common_token_layers, mismatch, token_states
from lmeval_speech.manifest import build_manifest, manifest_path
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
from lmeval_speech.report.reference import reference_section
from lmeval_speech.report.runs import PREFERRED_METRICS, control_items, logged_flags, pair_items, run_settings
from lmeval_speech.report.runs import relative_capture_dir
from lmeval_speech.report.runs import twin_rows as runs_twin_rows
from lmeval_speech.report.schema import GAP_FIELDS, N_CRITICAL, POOLED, SCHEMA_VERSION
from lmeval_speech.report.voicebench import paired_results, voicebench_overall


def build_report(run: dict, *, capture=None, measure="cosine", path="argmax", item=None, layer=None,
                 n_boot=10000, seed=0, include_truncated=False, base: dict | None = None) -> tuple[dict, dict | None]:
    """The report dict (schema above) and the chosen item's heat-map data (or None)."""
    if not run["pairs"]:
        raise ValueError(f"{run['results_file']} has no text/speech task pair "
                         f"(tasks: {sorted(run['tasks']) or 'none with a pair'})")
    notes = []
    if run["unpaired"]:
        notes.append(f"tasks without a twin in this run, not scored: {run['unpaired']}")
    manifest = {**build_manifest(run), "path": str(manifest_path(run))}
    items_by_pair = {p: pair_items(run, p, include_truncated=include_truncated) for p in run["pairs"]}
    # a pair none of whose items is valid in both twins has no gap: left out of every section, counted
    full_run, all_items = run, items_by_pair  # VoiceBench's MMSU counts an empty domain as empty
    empty = {p: it["excluded"] for p, it in items_by_pair.items() if not it["doc_ids"]}
    if empty and len(empty) == len(items_by_pair):
        raise ValueError("no item is valid in both twins of any pair, so there is no gap to report: "
                         + "; ".join(f"{p}: {reasons or 'no items'}" for p, reasons in empty.items()))
    if empty:
        notes.append("pairs left out, none of their items valid in both twins (by reason): "
                     + "; ".join(f"{p}: {reasons or 'no items'}" for p, reasons in empty.items()))
        run = {**run, "pairs": {p: t for p, t in run["pairs"].items() if p not in empty}}
        items_by_pair = {p: it for p, it in items_by_pair.items() if p not in empty}
    for p, it in items_by_pair.items():
        if it["excluded"]:
            notes.append(f"{p}: left out of the gap, by reason: {it['excluded']} (doc ids {it['excluded_doc_ids']}); "
                         "n counts only items valid in both twins")
    if item is not None and (item[0] not in items_by_pair or item[1] not in items_by_pair[item[0]]["doc_ids"]):
        raise ValueError(f"--item {item[0]}:{item[1]} is not a paired item of this run "
                         f"(pairs: {sorted(items_by_pair)})")

    pairs, overall = _gap_sections(items_by_pair, n_boot, seed, notes)
    controls = _control_sections(run, include_truncated, n_boot, seed, notes)
    decomposition = _decomposition(run, items_by_pair, controls, include_truncated, n_boot, seed, notes, base)
    rows = _item_rows(items_by_pair)
    settings = run_settings(run)
    reader, capture_dir = _open_capture(run, manifest, capture, notes)
    similarity = alignment = correlation = heatmap = reference = None
    if reader is not None:
        similarity, alignment, per_pair, per_item, compared = _hidden_state_sections(reader, rows, items_by_pair,
                                                                                    measure, path, notes)
        if similarity is not None:
            reference, ref_items = reference_section(reader, compared, measure, path, notes, seed=seed)
            rows = [{**r, **ref_items.get((r["pair"], r["doc_id"]), {})} for r in rows]
        rows = [{**r, **per_item.get((r["pair"], r["doc_id"]), {})} for r in rows]
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
                **settings, "unpaired_tasks": run["unpaired"], "pairs_without_items": empty},
        "overall": overall,
        "pairs": pairs,
        "controls": controls,
        "decomposition": decomposition,
        "voicebench": voicebench_overall(paired_results(full_run, all_items)),
        "manifest": manifest,
        "similarity": similarity,
        "reference": reference,
        "alignment": alignment,
        "correlation": correlation,
        "items": rows,
        "files": {"report_md": "report.md", "plots": {}},
        "notes": notes,
    }
    return report, heatmap


def _headline(metrics) -> str:
    """The metric a pooled row pools when pairs are scored differently: the first of
    ``PREFERRED_METRICS`` present (``acc`` first), else the first one met."""
    metrics = list(dict.fromkeys(metrics))
    return next((m for m in PREFERRED_METRICS if m in metrics), metrics[0])


def _gap_sections(items_by_pair: dict, n_boot: int, seed: int, notes: list | None = None) -> tuple[dict, dict]:
    """Each pair's paired gap, and the overall row: every item of the pairs scored by one metric,
    pooled. Pairs scored by different metrics (acc, refusal_rate, exact_match ...) are never pooled
    together: the overall row is the headline metric's (``acc`` first, see ``PREFERRED_METRICS``),
    and each other metric gets its own pooled row in ``overall["by_metric"]``."""
    pairs = {}
    for pair, it in items_by_pair.items():
        pairs[pair] = {"text_task": it["text_task"], "speech_task": it["speech_task"], "metric": it["metric"],
                       "filter": it["filter"], "excluded": it["excluded"],
                       **paired_gap(it["text_correct"], it["speech_correct"], n_boot=n_boot, seed=seed),
                       "similarity": None, "alignment": None}
    by_metric: dict[str, list[str]] = {}
    for pair, it in items_by_pair.items():
        by_metric.setdefault(it["metric"], []).append(pair)
    order = [m for m in PREFERRED_METRICS if m in by_metric] + [m for m in by_metric if m not in PREFERRED_METRICS]

    def pooled(names: list[str]) -> dict:
        text = np.concatenate([items_by_pair[p]["text_correct"] for p in names])
        speech = np.concatenate([items_by_pair[p]["speech_correct"] for p in names])
        sizes = np.array([pairs[p]["n"] for p in names], dtype=float)
        return {**paired_gap(text, speech, n_boot=n_boot, seed=seed), "n_pairs": len(names), "pairs_pooled": names,
                "excluded": _sum_excluded(items_by_pair[p]["excluded"] for p in names),
                "weighted_mean": {k: float(np.average([pairs[p][k] for p in names], weights=sizes)) for k in GAP_FIELDS},
                "macro_mean": {k: float(np.mean([pairs[p][k] for p in names])) for k in GAP_FIELDS}}

    overall = {**pooled(by_metric[order[0]]), "metric": order[0], "by_metric": None}
    if len(order) > 1:
        overall["by_metric"] = {m: {**pooled(by_metric[m]), "metric": m} for m in order[1:]}
        if notes is not None:
            notes.append(f"the pairs are scored by {len(order)} different metrics, never pooled together: the overall "
                         f"row pools the {len(by_metric[order[0]])} pairs scored by {order[0]}; "
                         + "; ".join(f"{m}: {by_metric[m]}" for m in order[1:]) + " are pooled per metric")
    return pairs, overall


def _sum_excluded(counts) -> dict[str, int]:
    """Pooled rows count the items left out of each of their pairs, summed by reason."""
    total: dict[str, int] = {}
    for by_reason in counts:
        for reason, k in by_reason.items():
            total[reason] = total.get(reason, 0) + k
    return total


def _control_sections(run: dict, include_truncated: bool, n_boot: int, seed: int, notes: list) -> dict | None:
    """Hearing = speech accuracy minus a prior control's (another item's audio, or silence), paired
    item by item; ``None`` when the run has no control twin."""
    out, pooled = {}, {}
    for pair, names in run["pairs"].items():
        for control in twins.CONTROLS:
            if control not in names:
                continue
            it = control_items(run, pair, control, include_truncated)
            if not it["doc_ids"]:
                notes.append(f"{pair}: no item valid in both the speech twin and the {control} control "
                             f"(by reason: {it['excluded'] or 'no items'}): no hearing row")
                continue
            g = paired_gap(it["speech_correct"], it["control_correct"], n_boot=n_boot, seed=seed)
            out.setdefault(pair, {})[control] = {
                "control_task": it["control_task"], "n": g["n"], "speech_acc": g["text_acc"],
                "control_acc": g["speech_acc"], "hearing": g["gap"], "ci_low": g["ci_low"], "ci_high": g["ci_high"],
                "mcnemar_p": g["mcnemar"]["p"], "excluded": it["excluded"], "metric": it["metric"]}
            pooled.setdefault(control, []).append((pair, it))
    if not out:
        return None
    for control, members in pooled.items():  # the pairs' items together, paired item by item as in each pair
        headline = _headline(it["metric"] for _, it in members)
        same = [(p, it) for p, it in members if it["metric"] == headline]
        if len(same) < len(members):
            notes.append(f"controls: the pooled {control} row pools the pairs scored by {headline} only (not "
                         f"{[p for p, it in members if it['metric'] != headline]})")
        if len(same) > 1:
            sp = np.concatenate([it["speech_correct"] for _, it in same])
            co = np.concatenate([it["control_correct"] for _, it in same])
            g = paired_gap(sp, co, n_boot=n_boot, seed=seed)
            out.setdefault(POOLED, {})[control] = {
                "control_task": None, "n": g["n"], "speech_acc": g["text_acc"], "control_acc": g["speech_acc"],
                "hearing": g["gap"], "ci_low": g["ci_low"], "ci_high": g["ci_high"], "mcnemar_p": g["mcnemar"]["p"],
                "excluded": _sum_excluded(it["excluded"] for _, it in same), "metric": headline}
    notes.append("controls: hearing = speech accuracy - control accuracy on the same items (paired bootstrap CI)")
    return out


def _base_text(base: dict | None, pair: str, metric: str, filt: str, doc_ids, targets: dict, notes: list
               ) -> dict[int, bool] | None:
    """{doc_id: correct} of the base LLM's run of this pair's text twin (``report --base``), read
    under the same filter and metric as this run's pair. A doc id whose target differs from this run's
    is another item: refused, as is a score that is not 0/1. Items the base run did not score are left
    out of the decomposition, and the note says how many."""
    task = f"{pair}_text"
    if base is None or task not in base["tasks"]:
        return None
    rows = {r["doc_id"]: r for r in base["tasks"][task]["samples"] if r.get("filter", "none") == filt}
    differ = [d for d in doc_ids if d in rows and str(rows[d].get("target")) != targets[d]]
    if differ:
        raise ValueError(f"--base run's {task} is not this run's items: doc {differ[0]} target "
                         f"{str(rows[differ[0]].get('target'))!r} there vs {targets[differ[0]]!r} here "
                         f"({len(differ)} docs differ)")
    out, cut = {}, []
    for d in doc_ids:
        if d in rows and any(logged_flags(rows[d])):  # a base run's failed or cut item compares nothing
            cut.append(d)
        elif d in rows and metric in rows[d]:
            value = float(rows[d][metric])
            if value not in (0.0, 1.0):
                raise ValueError(f"--base run's {task}: per-item {metric} of doc {d} is {value}, not 0/1")
            out[d] = value == 1.0
    if missing := [d for d in doc_ids if d not in out]:
        notes.append(f"{pair}: {len(missing)} items not scored in the --base run's {task} are left out of the "
                     f"decomposition (doc ids {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                     f"{f'; {len(cut)} of them failed or cut there' if cut else ''})")
    return out


def _decomposition(run, items_by_pair, controls, include_truncated, n_boot, seed, notes, base=None) -> dict | None:
    """Where the gap comes from, per pair with a cascade twin, on the items valid in every twin used:
    forgetting = base LLM text - LSLM text (with ``--base``), recognition = text - cascade (what ASR
    errors cost), misalignment = cascade - speech (what the end-to-end path loses beyond recognition);
    they add up to (base) text - speech on those items. hearing = speech - shuffled control (its own
    items), modality recovery rate = speech / text."""
    out, arrays = {}, {}
    for pair, names in run["pairs"].items():
        if twins.CASCADE not in names:
            continue
        it = items_by_pair[pair]
        metric = it["metric"]
        casc = control_items(run, pair, twins.CASCADE, include_truncated)  # speech vs cascade, valid in both
        valid = sorted(set(it["doc_ids"]) & set(casc["doc_ids"]))
        base_correct = _base_text(base, pair, metric, it["filter"], valid,
                                  dict(zip(it["doc_ids"], it["targets"], strict=True)), notes)
        if base is not None and base_correct is None:
            notes.append(f"--base run has no {pair}_text: forgetting left out for {pair}")
        if base_correct is not None:
            valid = [d for d in valid if d in base_correct]
        if not valid:
            notes.append(f"{pair}: no item valid in the text, speech and cascade twins"
                         f"{' and the --base run' if base_correct is not None else ''}: no decomposition row")
            continue
        pos_t, pos_c = {d: i for i, d in enumerate(it["doc_ids"])}, {d: i for i, d in enumerate(casc["doc_ids"])}
        text = np.array([it["text_correct"][pos_t[d]] for d in valid], dtype=bool)
        speech = np.array([it["speech_correct"][pos_t[d]] for d in valid], dtype=bool)
        cascade = np.array([casc["control_correct"][pos_c[d]] for d in valid], dtype=bool)
        rows = runs_twin_rows(run, pair, twins.CASCADE)
        wer = np.array([float(rows[d].get("asr_wer", np.nan)) for d in valid], dtype=float)
        base_text = np.array([base_correct[d] for d in valid], dtype=bool) if base_correct is not None else None
        arrays[pair] = (text, cascade, speech, base_text, wer)
        out[pair] = _decompose(*arrays[pair], metric, (controls or {}).get(pair, {}).get("shuffled"), n_boot, seed)
    headline = _headline(out[p]["metric"] for p in out) if out else None
    same = [p for p in out if out[p]["metric"] == headline]
    if len(same) < len(out):
        notes.append(f"decomposition: the pooled row pools the pairs scored by {headline} only (not "
                     f"{[p for p in out if p not in same]})")
    if len(same) > 1:  # those pairs' valid items together (forgetting only if every pair has its base)
        parts = list(zip(*(arrays[p] for p in same)))
        base_all = None if any(b is None for b in parts[3]) else np.concatenate(parts[3])
        hearing = _pooled_hearing(run, same, headline, controls, include_truncated, n_boot, seed, notes)
        out[POOLED] = _decompose(*(np.concatenate(x) for x in parts[:3]), base_all, np.concatenate(parts[4]),
                                 headline, hearing, n_boot, seed)
    if out:
        notes.append("decomposition: (forgetting +) recognition + misalignment = (base) text - speech exactly, on "
                     "the items valid in every twin used" + ("" if base else "; forgetting needs --base BASE_RUN"))
    return out or None



def _pooled_hearing(run, pairs, metric, controls, include_truncated, n_boot, seed, notes) -> dict | None:
    """The pooled decomposition row's hearing, over the shuffled control of exactly that row's pairs (the
    controls' pooled row pools every pair with a shuffled twin, which need not be these); None, with a
    note, when one of them has no shuffled row scored by the row's metric."""
    rows = {p: (controls or {}).get(p, {}).get("shuffled") for p in pairs}
    missing = [p for p, row in rows.items() if row is None or row["metric"] != metric]
    if missing:
        if len(missing) < len(pairs):
            notes.append(f"decomposition: the pooled row has no hearing: {missing} have no shuffled control "
                         f"scored by {metric} (hearing is in their own rows where they have one)")
        return None
    members = [control_items(run, p, "shuffled", include_truncated) for p in pairs]
    g = paired_gap(np.concatenate([it["speech_correct"] for it in members]),
                   np.concatenate([it["control_correct"] for it in members]), n_boot=n_boot, seed=seed)
    return {"hearing": g["gap"], "ci_low": g["ci_low"], "ci_high": g["ci_high"], "n": g["n"]}


def _decompose(text, cascade, speech, base_text, wer, metric, shuffled, n_boot, seed) -> dict:
    """One decomposition row from per-item correctness arrays over the same valid items."""
    valid = len(text)
    pairs_of = {"recognition": (text, cascade), "misalignment": (cascade, speech), "gap": (text, speech)}
    if base_text is not None:
        pairs_of |= {"forgetting": (base_text, text), "base_gap": (base_text, speech)}
    steps = {name: paired_gap(a, b, n_boot=n_boot, seed=seed) for name, (a, b) in pairs_of.items()}
    speech_only = text & ~speech
    d = {
        "n": valid, "metric": metric, "text_acc": float(text.mean()) if valid else None,
        "cascade_acc": float(cascade.mean()) if valid else None, "speech_acc": float(speech.mean()) if valid else None,
        "base_text_acc": float(base_text.mean()) if base_text is not None and valid else None,
        "forgetting": None, "base_gap": None,
        **{name: {k: g[k] for k in ("gap", "ci_low", "ci_high")} | {"p": g["mcnemar"]["p"]} for name, g in steps.items()},
        "hearing": None if shuffled is None else {k: shuffled[k] for k in ("hearing", "ci_low", "ci_high", "n")},
        "recovery_rate": float(speech.mean() / text.mean()) if valid and text.mean() > 0 else None,
        "asr_wer_mean": float(np.nanmean(wer)) if np.isfinite(wer).any() else None,
        "wer_vs_speech_only_error": point_biserial(speech_only.astype(float), wer) if valid > 2 else None,
    }
    assert abs(d["recognition"]["gap"] + d["misalignment"]["gap"] - d["gap"]["gap"]) < 1e-9
    if d["forgetting"] is not None:
        assert abs(d["forgetting"]["gap"] + d["gap"]["gap"] - d["base_gap"]["gap"]) < 1e-9
    return d

def _item_rows(items_by_pair: dict) -> list[dict]:
    rows = []
    for pair, it in items_by_pair.items():
        for doc_id, target, t, s in zip(it["doc_ids"], it["targets"], it["text_correct"], it["speech_correct"]):
            rows.append({"pair": pair, "doc_id": doc_id, "target": target, "text_correct": bool(t),
                         "speech_correct": bool(s), "speech_only_error": bool(t and not s),
                         "cosine": None, "euclidean": None, "aps": None, "monotonicity": None})
    return rows


def _open_capture(run: dict, manifest: dict, capture, notes: list) -> tuple[CaptureReader | None, str | None]:
    """The capture reader: ``--capture`` must exist; a dir found in model_args may have moved. A capture
    of another model or made under other conditions than this run is refused (``_check_capture``)."""
    model_args = manifest["model_args"]
    if capture is None:
        capture = model_args.get("capture_dir")
        if not capture:
            notes.append("no capture: similarity, alignment and correlation omitted (run with "
                         "model_args capture=pooled|tokens,capture_dir=DIR, or pass --capture DIR)")
            return None, None
        capture = relative_capture_dir(capture, run["dir"])  # lm_eval may have run in another folder
        if not Path(capture).is_dir():
            notes.append(f"capture dir {capture} from model_args not found: similarity, alignment and "
                         "correlation omitted (pass --capture DIR)")
            return None, str(capture)
    elif not Path(capture).is_dir():
        raise FileNotFoundError(f"--capture {capture} is not a directory")
    reader = CaptureReader(capture)
    _check_capture(reader, run, manifest, str(capture), notes)
    return reader, str(capture)


#: Identity fields a capture and its run may record differently: the device (one rank's, ``cuda:0`` vs ``cpu``).
DEVICE_FIELDS = ("device",)
#: The capture conditions (``lslm.conditions``) the run manifest records in its ``settings``.
SETTINGS_CONDITIONS = ("tts_override", "noise", "audio_overflow", "max_audio_seconds", "max_length", "spoken_form")


def _run_conditions(run: dict, manifest: dict) -> dict:
    """This run's side of a capture's ``conditions``, from what the run recorded: ``lslm``'s settings, its
    intervention spec (less the hook sites and where its calibration was saved, which the capture leaves
    out) and the two model args recorded nowhere else, read as ``lslm`` reads them. Empty for a run that
    ``lslm`` did not describe."""
    ours = (run["results"].get("config") or {}).get("lmeval_speech") or {}
    if "settings" not in ours:
        return {}
    out = {k: ours["settings"][k] for k in SETTINGS_CONDITIONS if k in ours["settings"]}
    if "hooks" in ours:
        spec = (ours["hooks"] or {}).get("intervention")
        out["intervention"] = None if spec is None else {k: v for k, v in spec.items()
                                                         if k not in ("hooks", "save_calibration")}
    bos, prefix = manifest["model_args"].get("add_bos_token"), manifest["model_args"].get("prefix_token_id")
    out["add_bos_token"] = None if bos is None else str(bos).lower() in {"1", "true", "yes", "on"}
    out["prefix_token_id"] = None if prefix is None else int(prefix)
    return out


def _check_capture(reader: CaptureReader, run: dict, manifest: dict, capture: str, notes: list) -> None:
    """Refuse a capture written by another model, or under other conditions, than this run: its states
    would be read beside this run's scores (``--capture`` naming another run's dir, a relative
    ``capture_dir`` read from another folder, a dir refilled since). Compared: the model identity both
    record (every field but the device; only ``pretrained`` where one side has no full identity) and
    each capture condition the run records too (noise, TTS override, intervention, audio limits ...).
    What neither side lets compare is left unchecked with a note."""
    ours = (run["results"].get("config") or {}).get("lmeval_speech") or {}
    captured_model, run_model = reader.meta.get("model"), ours.get("model")
    if captured_model and run_model:
        keys = sorted((set(captured_model) | set(run_model)) - set(DEVICE_FIELDS))
        stored, current = ({f"model.{k}": side.get(k) for k in keys} for side in (captured_model, run_model))
    else:
        stored = {"model.pretrained": (captured_model or {}).get("pretrained") or reader.meta.get("pretrained")}
        current = {"model.pretrained": (run_model or {}).get("pretrained") or manifest["model_args"].get("pretrained")}
        if stored["model.pretrained"] is None or current["model.pretrained"] is None:
            stored, current = {}, {}
            notes.append(f"capture dir {capture} or this run records no model identity (made by an older version, "
                         "or not by lslm): not checked that its states are this run's model's")
        else:
            notes.append(f"capture dir {capture} or this run records no full model identity: only pretrained "
                         "checked against this run's")
    captured_conditions, run_conditions = reader.meta.get("conditions"), _run_conditions(run, manifest)
    if captured_conditions is None or not run_conditions:
        notes.append(f"capture dir {capture} or this run records no run settings (made by an older version, or "
                     "not by lslm): not checked that its states were captured under this run's noise, TTS and "
                     "intervention")
    else:
        # a capture made before the spoken-form rules existed has no record of them: it heard other audio
        keys = [k for k in run_conditions if k in captured_conditions or k == "spoken_form"]
        stored |= {f"conditions.{k}": captured_conditions.get(k) for k in keys}
        current |= {f"conditions.{k}": run_conditions[k] for k in keys}
    differ = mismatch(stored, current)
    if differ:
        raise ValueError(
            f"capture dir {capture} holds states of another model or run settings than this run's ({differ[0]}; "
            f"this run has {differ[1]}): its similarity and alignment would describe another run. Pass --capture "
            "with the dir this run captured into (a relative capture_dir= is read from the current folder: run "
            "the report from the folder lm_eval ran in)")


def _mean_or_none(values) -> float | None:
    """Mean of the finite values (None counts as missing), None when there is none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def _hidden_state_sections(reader, rows, items_by_pair, measure, path, notes):
    """One pass over the captured items: pooled similarity per layer and, with tokens, APS.

    Each item's arrays are loaded once and dropped, so memory stays at one item whatever the run size.
    Returns (similarity, alignment, per-pair sections, per-item values {(pair, doc_id): {cosine,
    euclidean, aps, monotonicity}}, the compared items as (pair, doc_id, speech record, text record));
    the item rows themselves are not changed.
    """
    records = {(r["task"], r["doc_id"]): r for r in reader.records}
    per_item: dict[tuple, dict] = {}
    cos, euc, sim_pairs, compared = [], [], [], []
    aps_layers: dict[int, list[float]] = {}
    missing, no_tokens, non_finite, non_finite_tokens = 0, 0, 0, 0
    text_only_missing = 0  # speech captured, text twin not: its spoken text was not found in the prompt
    mono_paths, mono_undefined = 0, 0  # alignment paths (item x layer), those with no Spearman rho
    for row in rows:
        it = items_by_pair[row["pair"]]
        rec_s, rec_t = records.get((it["speech_task"], row["doc_id"])), records.get((it["text_task"], row["doc_id"]))
        if rec_s is None or rec_t is None:
            missing += 1
            text_only_missing += rec_s is not None and rec_t is None
            continue
        speech, text = reader.load(rec_s), reader.load(rec_t)
        if not (np.isfinite(speech["pooled"]).all() and np.isfinite(text["pooled"]).all()):
            non_finite += 1  # NaN/inf states (an overflow in the model): no similarity is meaningful
            continue
        if cos and speech["pooled"].shape[0] != len(cos[0]):
            raise ValueError(f"{row['pair']} doc {row['doc_id']}: {speech['pooled'].shape[0]} hidden states, "
                             f"other items have {len(cos[0])}: the capture dir mixes models")
        sim = layer_similarity(speech["pooled"], text["pooled"])
        cos.append(sim["cosine"])
        euc.append(sim["euclidean"])
        sim_pairs.append(row["pair"])
        compared.append((row["pair"], row["doc_id"], rec_s, rec_t))
        values = per_item.setdefault((row["pair"], row["doc_id"]), {})
        values["cosine"], values["euclidean"] = float(sim["cosine"].mean()), float(sim["euclidean"].mean())
        layers = common_token_layers(rec_s, rec_t) if "tokens" in speech and "tokens" in text else []
        if not layers:
            no_tokens += 1
            continue
        s_layers, t_layers = token_states(speech, rec_s, layers), token_states(text, rec_t, layers)
        if not all(np.isfinite(x).all() for x in (*s_layers, *t_layers)):
            non_finite_tokens += 1
            continue
        res = alignment_path_score(s_layers, t_layers, measure=measure, path=path)
        values["aps"], values["monotonicity"] = res["aps"], _mean_or_none(res["monotonicity"])
        mono_paths += len(res["monotonicity"])
        mono_undefined += int(np.count_nonzero(np.isnan(res["monotonicity"])))
        for layer, value in zip(layers, res["per_layer"]):
            aps_layers.setdefault(layer, []).append(float(value))
    if mono_undefined:
        notes.append(f"{mono_undefined} of {mono_paths} alignment paths (item x layer) have no monotonicity: every "
                     "word matched one speech position (or one word): left out of the monotonicity means, which "
                     "thus overstate order-keeping")
    if text_only_missing:
        notes.append(f"{text_only_missing} of {len(rows)} paired items have speech states but none of their text "
                     "twin: its spoken text was not found in its prompt (a task of your own must declare "
                     "metadata.spoken_text; the run's log names the task)")
        missing -= text_only_missing
    if missing:
        notes.append(f"{missing} of {len(rows)} paired items lack a captured state for one or both twins "
                     "(capture_limit, an interrupted run, or another task selection): left out of "
                     "similarity and alignment")
    if non_finite:
        notes.append(f"{non_finite} of {len(rows)} paired items have non-finite (NaN/inf) pooled states in one "
                     "or both twins (the model overflowed?): left out of similarity and alignment")
    if non_finite_tokens:
        notes.append(f"{non_finite_tokens} of {len(rows)} paired items have non-finite (NaN/inf) token-level "
                     "states in one or both twins: left out of alignment (their pooled similarity is kept)")
    if not cos:
        notes.append("no item of this run's pairs has finite captured states: similarity, alignment and "
                     "correlation omitted" if non_finite else
                     "the capture holds no item of this run's pairs: similarity, alignment and "
                     "correlation omitted")
        return None, None, {}, per_item, compared
    cos, euc = np.array(cos), np.array(euc)
    similarity = {"layers": list(range(cos.shape[1])),
                  "cosine_mean": cos.mean(0), "cosine_std": cos.std(0),
                  "euclidean_mean": euc.mean(0), "euclidean_std": euc.std(0),
                  "S_cos": float(cos.mean()), "S_euc": float(euc.mean()), "n_items": len(cos),
                  "excluded_non_finite": non_finite}
    per_pair = {}
    for pair in items_by_pair:
        mask = np.array([p == pair for p in sim_pairs])
        aligned = [v for (p, _), v in per_item.items() if p == pair and v.get("aps") is not None]
        per_pair[pair] = {
            "similarity": {"S_cos": float(cos[mask].mean()), "S_euc": float(euc[mask].mean()),
                           "n_items": int(mask.sum())} if mask.any() else None,
            "alignment": {"aps": _mean_or_none([r["aps"] for r in aligned]),
                          "monotonicity": _mean_or_none([r["monotonicity"] for r in aligned]),
                          "n_items": len(aligned)} if aligned else None}
    alignment = None
    aligned = [v for v in per_item.values() if v.get("aps") is not None]
    if aligned:
        token_layers = sorted(aps_layers)
        alignment = {"measure": measure, "path": path, "aps": _mean_or_none([r["aps"] for r in aligned]),
                     "excluded_non_finite": non_finite + non_finite_tokens,
                     "aps_per_layer": [float(np.mean(aps_layers[layer])) for layer in token_layers],
                     "layers": token_layers,
                     "monotonicity": _mean_or_none([r["monotonicity"] for r in aligned]),
                     "monotonicity_undefined": mono_undefined, "n_items": len(aligned)}
        if no_tokens:
            notes.append(f"{no_tokens} captured items have no token-level states for both twins "
                         "(capture=pooled or capture_limit): left out of alignment")
    else:
        notes.append("no token-level states (capture=pooled, or capture_limit reached): alignment "
                     "(APS, monotonicity, critical tokens) omitted")
    return similarity, alignment, per_pair, per_item, compared


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
        notes.append(f"--item {pair}:{doc_id} has no usable token-level states for both twins (not captured "
                     "at token level, or NaN/inf: see the notes): no heat map")
        return None, None
    it = items_by_pair[pair]
    records = {(r["task"], r["doc_id"]): r for r in reader.records}
    rec_s, rec_t = records[(it["speech_task"], doc_id)], records[(it["text_task"], doc_id)]
    speech, text = reader.load(rec_s), reader.load(rec_t)
    layers = common_token_layers(rec_s, rec_t)
    if layer is None:
        layer = layers[-1]
    elif layer not in layers:
        notes.append(f"--layer {layer} was not captured at token level (token layers: {layers}): "
                     f"heat map drawn at layer {layers[-1]}")
        layer = layers[-1]
    s_layers, t_layers = token_states(speech, rec_s, layers), token_states(text, rec_t, layers)
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


#: the per-item values correlated with speech-only errors: raw, and baseline-corrected (report/reference.py)
CORRELATED = ("cosine", "euclidean", "aps", "centered_cosine", "cosine_minus_mismatched")


def n_for_power(r, power: float = 0.8, alpha: float = 0.05) -> int | None:
    """Items a correlation of size |r| needs to reach two-sided significance ``alpha`` with ``power``
    (Fisher z approximation: n = ((z_{1-alpha/2} + z_power) / atanh|r|)^2 + 3); None for r = 0 or NaN."""
    from scipy.stats import norm

    if r is None or not np.isfinite(r) or r == 0:
        return None
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return int(np.ceil((z / np.arctanh(min(abs(r), 0.999999))) ** 2 + 3))


def _correlation(rows: list[dict], notes: list) -> dict:
    """Point-biserial r and a logistic fit of speech-only error on each item's closeness."""
    out = {"target": "speech_only_error (text right, speech wrong)"}
    captured = [r for r in rows if r["cosine"] is not None]
    y = np.array([r["speech_only_error"] for r in captured], dtype=float)
    out["n_items"], out["n_speech_only_errors"] = len(captured), int(y.sum())
    for key in CORRELATED:
        x = np.array([np.nan if r.get(key) is None else r[key] for r in captured], dtype=float)
        if not np.isfinite(x).any():
            continue
        pb = point_biserial(y, x)
        out[key] = {"point_biserial": {**pb, "n_for_80pct_power": n_for_power(pb["r"])},
                    "logistic": logistic_fit(x, y)}
    if out["n_speech_only_errors"] == 0:
        notes.append("no speech-only errors among captured items: correlations are undefined")
    return out


