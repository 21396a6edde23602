"""Owns the report's hidden-state sections: layer similarity of pooled states, the Alignment Path Score
over token states (with one item's detail for ``--item``), and the per-item correlation of those values
(raw and baseline-corrected) with speech-only errors."""

from __future__ import annotations

import numpy as np

from lmeval_speech.capture.store import common_token_layers, token_states
from lmeval_speech.metrics import (
    alignment_path_score,
    argmax_path,
    critical_tokens,
    dtw_path,
    layer_similarity,
    logistic_fit,
    path_scores,
    point_biserial,
    similarity_matrix,
)
from lmeval_speech.report.schema import N_CRITICAL


def _mean_or_none(values) -> float | None:
    """Mean of the finite values (None counts as missing), None when there is none."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


def hidden_state_sections(reader, rows, items_by_pair, measure, path, notes):
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
        # the item browser's Bottom-3: speech positions that align worst at the deepest token layer
        deep = similarity_matrix(s_layers[-1], t_layers[-1], measure)
        values["bottom3_layer"], values["n_speech"] = layers[-1], int(s_layers[-1].shape[0])
        values["bottom3"] = [int(p) for p in critical_tokens(deep, res["paths"][-1], k=N_CRITICAL)]
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


def item_detail(reader, rows, items_by_pair, item, layer, measure, path, notes):
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


def correlation(rows: list[dict], notes: list) -> dict:
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


