"""Owns the report's reference section: every hidden-state similarity beside its baseline.

For the items whose pooled states the report compares (its similarity section), this section gives:
the same cosine, Euclidean distance and (with token states) APS for each item's speech against a
*mismatched* item's text (a seeded derangement within the pair, recorded), the own - mismatched
difference with a paired bootstrap CI; the centered cosine (the run's mean state per layer over both
modalities subtracted first) own and mismatched; linear CKA of speech vs text per layer (and its
mismatched value) and the cross-layer CKA matrix. The measures themselves are ``metrics/baselines.py``.
"""

from __future__ import annotations

import numpy as np

from lmeval_speech.capture.store import common_token_layers, token_states
from lmeval_speech.metrics import alignment_path_score, layer_similarity_batch
from lmeval_speech.metrics.baselines import (
    center,
    cross_layer_cka,
    derangement,
    linear_cka,
    paired_difference,
    rowwise_cosine,
)

#: At most this many items (a seeded sample) enter the pooled-state references and CKA's Gram matrices,
#: so that memory stays bounded on a full run (their states are held at once, float32).
MAX_ITEMS = 1000
MAX_CKA_ITEMS = 256


def _sample(n: int, cap: int, seed: int) -> np.ndarray:
    return np.arange(n) if n <= cap else np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def _deranged(pairs: list[str], seed: int) -> tuple[np.ndarray, list[str]]:
    """Index of each item's mismatched partner: a derangement within its pair; items of a pair with a
    single item have none (-1)."""
    perm = np.full(len(pairs), -1)
    skipped = []
    for k, pair in enumerate(dict.fromkeys(pairs)):
        idx = np.array([i for i, p in enumerate(pairs) if p == pair])
        if len(idx) < 2:
            skipped.append(pair)
            continue
        perm[idx] = idx[derangement(len(idx), seed + k)]
    return perm, skipped


def reference_section(reader, items: list[tuple], measure: str, path: str, notes: list, seed: int = 0,
                      n_boot: int = 2000) -> tuple[dict | None, dict]:
    """``items``: (pair, doc_id, speech record, text record) of the report's similarity items. Returns the
    section and per-item values {(pair, doc_id): {centered_cosine, cosine_minus_mismatched}} (means over
    hidden states; the second only for items with a mismatched partner)."""
    total = len(items)
    items = [items[i] for i in _sample(total, MAX_ITEMS, seed)]
    perm, skipped = _deranged([it[0] for it in items], seed)
    if skipped:
        notes.append(f"reference: pairs with a single captured item have no mismatched partner: {skipped}")
    keep = perm >= 0
    if keep.sum() < 2:
        notes.append("reference: fewer than 2 items with a mismatched partner: no baseline section")
        return None, {}
    speech = np.stack([reader.load(it[2], names=("pooled",))["pooled"] for it in items]).astype(np.float32)
    text = np.stack([reader.load(it[3], names=("pooled",))["pooled"] for it in items]).astype(np.float32)
    own = layer_similarity_batch(speech, text)
    mis = layer_similarity_batch(speech[keep], text[perm[keep]])
    cs, ct, _ = center(speech, text)
    own_c, mis_c = rowwise_cosine(cs, ct), rowwise_cosine(cs[keep], ct[perm[keep]])

    def diff(a, b, k):
        return paired_difference(a[keep].mean(1), b.mean(1), n_boot=n_boot, seed=seed + k)

    cka_idx = _sample(len(items), MAX_CKA_ITEMS, seed)
    s_cka, t_cka = speech[cka_idx], text[cka_idx]
    cka_perm = derangement(len(cka_idx), seed)  # a mismatched CKA: the same text states, other items
    layers = list(range(speech.shape[1]))
    section = {
        "seed": seed,
        "derangement": [[it[0], it[1], items[j][1]] for it, j in zip(items, perm) if j >= 0],
        "mean_from": f"the {len(items)} items below, speech and text states together, per hidden state",
        "n_items": int(keep.sum()), "sampled_from": total if total > MAX_ITEMS else None,
        "per_layer": {
            "layers": layers,
            "cosine_own": own["cosine"][keep].mean(0), "cosine_mismatched": mis["cosine"].mean(0),
            "euclidean_own": own["euclidean"][keep].mean(0), "euclidean_mismatched": mis["euclidean"].mean(0),
            "centered_cosine_own": own_c[keep].mean(0), "centered_cosine_mismatched": mis_c.mean(0),
            "cka": [linear_cka(s_cka[:, i], t_cka[:, i]) for i in layers],
            "cka_mismatched": [linear_cka(s_cka[:, i], t_cka[cka_perm, i]) for i in layers],
        },
        "S_cos": diff(own["cosine"], mis["cosine"], 1),
        "S_euc": diff(own["euclidean"], mis["euclidean"], 2),
        "S_cos_centered": diff(own_c, mis_c, 3),
        "cka_items": len(cka_idx),
        "cross_layer_cka": cross_layer_cka(s_cka, t_cka),
        "aps": _aps_reference(reader, items, perm, measure, path, seed, n_boot),
    }
    per_item = {(it[0], it[1]): {"centered_cosine": float(own_c[k].mean())} for k, it in enumerate(items)}
    own_minus_mismatched = own["cosine"][keep].mean(1) - mis["cosine"].mean(1)
    for k, value in zip(np.flatnonzero(keep), own_minus_mismatched):
        per_item[(items[k][0], items[k][1])]["cosine_minus_mismatched"] = float(value)
    return section, per_item


def _aps_reference(reader, items, perm, measure, path, seed, n_boot) -> dict | None:
    """APS of each token-captured item against a mismatched token-captured item of its pair."""
    with_tokens = [i for i, it in enumerate(items) if common_token_layers(it[2], it[3])]
    if len(with_tokens) < 2:
        return None
    sub_perm, _ = _deranged([items[i][0] for i in with_tokens], seed)
    own, other, by_layer = [], [], {}
    for k, i in enumerate(with_tokens):
        if sub_perm[k] < 0:
            continue
        j = with_tokens[sub_perm[k]]
        layers = common_token_layers(items[i][2], items[i][3], items[j][3])
        if not layers:
            continue
        s, t, t_other = (_tokens(reader, rec, layers) for rec in (items[i][2], items[i][3], items[j][3]))
        if not all(np.isfinite(x).all() for x in (*s, *t, *t_other)):
            continue  # NaN/inf token states: out of alignment, as in the alignment section
        mine = alignment_path_score(s, t, measure=measure, path=path)
        theirs = alignment_path_score(s, t_other, measure=measure, path=path)
        own.append(mine["aps"])
        other.append(theirs["aps"])
        for layer, a, b in zip(layers, mine["per_layer"], theirs["per_layer"]):
            by_layer.setdefault(layer, []).append((a, b))
    ok = np.isfinite(own) & np.isfinite(other)
    if ok.sum() < 2:
        return None
    layers = sorted(by_layer)
    return {**paired_difference(np.asarray(own)[ok], np.asarray(other)[ok], n_boot=n_boot, seed=seed + 4),
            "layers": layers, "per_layer_own": [float(np.nanmean([a for a, _ in by_layer[la]])) for la in layers],
            "per_layer_mismatched": [float(np.nanmean([b for _, b in by_layer[la]])) for la in layers]}


def _tokens(reader, record: dict, layers: list[int]) -> list[np.ndarray]:
    return token_states(reader.load(record, names=("tokens",)), record, layers)
