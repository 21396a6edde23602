"""Owns the report's logit-lens section: per hidden-state index, how often the question's tokens are the
top-1 / top-10 lens readout of the speech positions aligned to them (argmax path, the APS path), with
the text twin's own positions as the reference row and chance (k / vocabulary) beside both.

The ranks are computed at capture (``models/lens.py``, stored as ``lens_ranks`` [L, P, Q] with the
question's token ids ``lens_ids``); this section only aligns and counts. An item is left out, and
counted by reason, when a twin has no lens ranks (a run before the lens, or a speech twin whose text
twin was not in the same run) or the twins' question tokens differ.
"""

from __future__ import annotations

import numpy as np

from lmeval_speech.capture.store import common_token_layers
from lmeval_speech.metrics import argmax_path, similarity_matrix
from lmeval_speech.metrics.lens import KS, aligned_ranks, summarize

#: at most this many items (the first, in the report's order) are read: a capture holds token states for
#: ``capture_limit`` items per task, and the lens needs nothing more to settle its shares
MAX_ITEMS = 500


def lens_section(reader, items: list[tuple], notes: list) -> dict | None:
    """``items``: (pair, doc_id, speech record, text record) of the report's similarity items."""
    excluded: dict[str, int] = {}
    by_layer: dict[int, dict[str, list]] = {}
    n_items, vocab = 0, set()
    for pair, doc_id, s_rec, t_rec in items[:MAX_ITEMS]:
        layers = common_token_layers(s_rec, t_rec)
        if not layers:
            continue
        if not ("lens_ranks" in s_rec.get("arrays", []) and "lens_ranks" in t_rec.get("arrays", [])):
            _count(excluded, "no lens ranks (an older capture, or the text twin not in the speech twin's run)")
            continue
        s, t = reader.load(s_rec), reader.load(t_rec)
        if not np.array_equal(s["lens_ids"], t["lens_ids"]) or t["tokens"].shape[1] != len(t["lens_ids"]):
            _count(excluded, "the twins' question tokens differ")
            continue
        if not (np.isfinite(s["tokens"]).all() and np.isfinite(t["tokens"]).all()):
            _count(excluded, "non-finite token states")
            continue
        n_items += 1
        vocab.add(int(s_rec.get("lens_vocab") or 0))
        for layer in layers:
            si, ti = s_rec["token_layers"].index(layer), t_rec["token_layers"].index(layer)
            A = similarity_matrix(s["tokens"][si], t["tokens"][ti], measure="cosine")
            row = by_layer.setdefault(layer, {"speech": [], "text": []})
            row["speech"].append(aligned_ranks(s["lens_ranks"][si], argmax_path(A)))
            row["text"].append(np.diagonal(t["lens_ranks"][ti]))  # each token at its own position
    if excluded:
        notes.append(f"logit lens: items left out: {excluded}")
    if not by_layer:
        return None
    layers = sorted(by_layer)
    out = {"layers": layers, "k": list(KS), "n_items": n_items, "excluded": excluded,
           "vocab_size": max(vocab) or None, "path": "argmax (cosine), per hidden-state index"}
    for side in ("speech", "text"):
        rows = [summarize(by_layer[layer][side]) for layer in layers]
        out[side] = {key: [r[key] for r in rows] for key in rows[0]}
    out["chance"] = {f"top{k}": (k / out["vocab_size"] if out["vocab_size"] else None) for k in KS}
    best = int(np.argmax(out["speech"]["top10"]))
    out["best_speech_layer"] = {"layer": layers[best], **{key: out["speech"][key][best] for key in out["speech"]}}
    return out


def _count(counts: dict, reason: str) -> None:
    counts[reason] = counts.get(reason, 0) + 1
