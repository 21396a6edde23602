"""Owns computing a report: one pass over a run's paired items (and its capture store) that
returns the ``report.json`` dict (``report.schema``) without writing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmeval_speech import twins
from lmeval_speech.capture.store import CaptureReader, mismatch
from lmeval_speech.manifest import build_manifest, manifest_path
from lmeval_speech.metrics import paired_gap
from lmeval_speech.report.decomposition import decomposition as decompose_gap
from lmeval_speech.report.decomposition import headline_metric
from lmeval_speech.report.lens import lens_section
from lmeval_speech.report.reference import reference_section
from lmeval_speech.runs import PREFERRED_METRICS, control_items, pair_items, relative_capture_dir, run_settings
from lmeval_speech.report.schema import GAP_FIELDS, POOLED, SCHEMA_VERSION
from lmeval_speech.report.states import correlation as correlate
from lmeval_speech.report.states import hidden_state_sections, item_detail
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
    decomposition = decompose_gap(run, items_by_pair, controls, include_truncated, n_boot, seed, notes, base)
    rows = _item_rows(items_by_pair)
    settings = run_settings(run)
    reader, capture_dir = _open_capture(run, manifest, capture, notes)
    similarity = alignment = correlation = heatmap = reference = logit_lens = None
    if reader is not None:
        similarity, alignment, per_pair, per_item, compared = hidden_state_sections(reader, rows, items_by_pair,
                                                                                    measure, path, notes)
        if similarity is not None:
            reference, ref_items = reference_section(reader, compared, measure, path, notes, seed=seed)
            logit_lens = lens_section(reader, compared, notes)
            rows = [{**r, **ref_items.get((r["pair"], r["doc_id"]), {})} for r in rows]
        rows = [{**r, **per_item.get((r["pair"], r["doc_id"]), {})} for r in rows]
        for pair, sections in per_pair.items():
            pairs[pair].update(sections)
        if alignment is not None:
            alignment["item"], heatmap = item_detail(reader, rows, items_by_pair, item, layer, measure, path, notes)
        elif item is not None:
            notes.append(f"--item {item[0]}:{item[1]} ignored: no token-level states to align")
        correlation = correlate(rows, notes) if similarity is not None else None
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
        "logit_lens": logit_lens,
        "alignment": alignment,
        "correlation": correlation,
        "items": rows,
        "files": {"report_md": "report.md", "plots": {}},
        "notes": notes,
    }
    return report, heatmap


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
        headline = headline_metric(it["metric"] for _, it in members)
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
    """This run's side of a capture's ``conditions``: the record ``lslm`` wrote (``conditions``); for a run made
    before that record, rebuilt from what the run recorded: ``lslm``'s settings, its
    intervention spec (less the hook sites and where its calibration was saved, which the capture leaves
    out) and the two model args recorded nowhere else, read as ``lslm`` reads them. Empty for a run that
    ``lslm`` did not describe."""
    ours = (run["results"].get("config") or {}).get("lmeval_speech") or {}
    if ours.get("conditions") is not None:  # the one record (lmeval_speech/conditions.py), since it exists
        return ours["conditions"]
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
