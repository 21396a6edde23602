"""Owns where the gap comes from: the decomposition of text - speech into (forgetting +) recognition +
misalignment per pair with a cascade twin, hearing beside it, the modality recovery rate and the agreement
(Cohen's kappa) between the speech twin's and the cascade twin's chosen options, each with a paired CI."""

from __future__ import annotations

import numpy as np

from lmeval_speech import twins
from lmeval_speech.metrics import paired_gap, point_biserial
from lmeval_speech.metrics.agreement import cohen_kappa, recovery_rate
from lmeval_speech.runs import chosen_option, control_items, logged_flags, twin_rows
from lmeval_speech.report.schema import POOLED


def headline_metric(metrics) -> str:
    """The metric a pooled row pools when pairs are scored differently: the first of
    ``PREFERRED_METRICS`` present (``acc`` first), else the first one met."""
    from lmeval_speech.runs import PREFERRED_METRICS

    metrics = list(dict.fromkeys(metrics))
    return next((m for m in PREFERRED_METRICS if m in metrics), metrics[0])


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


def decomposition(run, items_by_pair, controls, include_truncated, n_boot, seed, notes, base=None) -> dict | None:
    """Where the gap comes from, per pair with a cascade twin, on the items valid in every twin used:
    forgetting = base LLM text - LSLM text (with ``--base``), recognition = text - cascade (what ASR
    errors cost), misalignment = cascade - speech (what the end-to-end path loses beyond recognition);
    they add up to (base) text - speech on those items. hearing = speech - shuffled control (its own
    items), modality recovery rate = speech / text."""
    out, arrays, agreement = {}, {}, {}
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
        rows = twin_rows(run, pair, twins.CASCADE)
        wer = np.array([float(rows[d].get("asr_wer", np.nan)) for d in valid], dtype=float)
        agreement[pair] = _choices(twin_rows(run, pair, "speech"), rows, valid, metric, pair, notes)
        base_text = np.array([base_correct[d] for d in valid], dtype=bool) if base_correct is not None else None
        arrays[pair] = (text, cascade, speech, base_text, wer)
        out[pair] = _decompose(*arrays[pair], metric, (controls or {}).get(pair, {}).get("shuffled"), n_boot, seed,
                               agreement[pair])
    headline = headline_metric(out[p]["metric"] for p in out) if out else None
    same = [p for p in out if out[p]["metric"] == headline]
    if len(same) < len(out):
        notes.append(f"decomposition: the pooled row pools the pairs scored by {headline} only (not "
                     f"{[p for p in out if p not in same]})")
    if len(same) > 1:  # those pairs' valid items together (forgetting only if every pair has its base)
        parts = list(zip(*(arrays[p] for p in same)))
        base_all = None if any(b is None for b in parts[3]) else np.concatenate(parts[3])
        hearing = _pooled_hearing(run, same, headline, controls, include_truncated, n_boot, seed, notes)
        choices = None if any(agreement[p] is None for p in same) else \
            [[c for p in same for c in agreement[p][side]] for side in (0, 1)]
        out[POOLED] = _decompose(*(np.concatenate(x) for x in parts[:3]), base_all, np.concatenate(parts[4]),
                                 headline, hearing, n_boot, seed, choices)
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


def _choices(speech_rows: dict, cascade_rows: dict, valid: list, metric: str, pair: str, notes: list):
    """(speech twin's chosen options, cascade twin's) on ``valid`` (pair-qualified, so pooled pairs never
    match across items), or None with a note where the twins' responses are not log-likelihoods of options."""
    speech = [chosen_option(speech_rows[d], metric) for d in valid]
    cascade = [chosen_option(cascade_rows[d], metric) for d in valid]
    if any(c is None for c in speech + cascade):
        notes.append(f"{pair}: speech vs cascade agreement (kappa) needs each item's chosen option (a multiple-"
                     f"choice task scored by acc or acc_norm); not computed for {metric}")
        return None
    return [(pair, c) for c in speech], [(pair, c) for c in cascade]


def _decompose(text, cascade, speech, base_text, wer, metric, shuffled, n_boot, seed, choices=None) -> dict:
    """One decomposition row from per-item correctness arrays over the same valid items (``choices``:
    the speech and cascade twins' chosen options on them, for their agreement)."""
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
        "recovery": recovery_rate(text, speech, n_boot=n_boot, seed=seed) if valid else None,
        "speech_cascade_kappa": cohen_kappa(*choices, n_boot=n_boot, seed=seed) if valid and choices else None,
        "asr_wer_mean": float(np.nanmean(wer)) if np.isfinite(wer).any() else None,
        "wer_vs_speech_only_error": point_biserial(speech_only.astype(float), wer) if valid > 2 else None,
    }
    assert abs(d["recognition"]["gap"] + d["misalignment"]["gap"] - d["gap"]["gap"]) < 1e-9
    if d["forgetting"] is not None:
        assert abs(d["forgetting"]["gap"] + d["gap"]["gap"] - d["base_gap"]["gap"]) < 1e-9
    return d
