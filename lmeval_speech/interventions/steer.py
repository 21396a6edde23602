"""Owns the steering vector: the mean (text - speech) pooled-state difference per hidden-state index,
estimated on a capture of *calibration* items, written with the items it came from so that a run that
evaluates any of them is refused (``lmeval-speech steer CAPTURE_DIR --out FILE``).

Applied by ``intervention=steer,calibration=FILE,strength=S`` (``h' = h + S v`` at the chosen speech
positions), beside its same-size control ``intervention=random_steer`` (a random direction of norm ``S |v|``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmeval_speech.fileio import atomic_write

KIND = "lmeval-speech steer"


def estimate(capture_dir, pairs=None) -> tuple[dict[int, np.ndarray], list[list], dict]:
    """({hidden-state index: mean text - speech pooled state}, [[pair, doc_id], ...], the capture's model
    identity), over the items of ``pairs`` (all when None) whose text and speech twins are both captured."""
    from lmeval_speech.capture.store import CaptureReader

    reader = CaptureReader(capture_dir)
    by_item: dict[tuple, dict] = {}
    for r in reader.records:
        if r["modality"] in ("text", "speech") and (pairs is None or r["pair"] in pairs):
            by_item.setdefault((r["pair"], r["doc_id"]), {})[r["modality"]] = r
    items = sorted(k for k, v in by_item.items() if len(v) == 2)
    if not items:
        raise ValueError(f"{capture_dir}: no item with both its text and speech twin captured"
                         + (f" in pairs {sorted(pairs)}" if pairs else ""))
    total = None
    for key in items:
        t = reader.load(by_item[key]["text"], names=("pooled",))["pooled"].astype(np.float64)
        s = reader.load(by_item[key]["speech"], names=("pooled",))["pooled"].astype(np.float64)
        total = t - s if total is None else total + (t - s)
    mean = total / len(items)
    return {i: mean[i].astype(np.float32) for i in range(mean.shape[0])}, [list(k) for k in items], \
        reader.meta.get("model") or {}


def write(path, vectors: dict[int, np.ndarray], items: list[list], model: dict, source: str) -> None:
    from safetensors.numpy import save

    meta = {"kind": KIND, "items": json.dumps(items), "model": json.dumps(model), "source": source}
    atomic_write(path, save({f"{i}.vector": v for i, v in vectors.items()}, metadata=meta))


def load(path) -> tuple[dict, set]:
    """({hidden-state index: vector}, {(pair, doc_id) the vector was estimated on}); a file that is not a
    steering vector is refused."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        if meta.get("kind") != KIND:
            raise ValueError(f"{path} is not a steering vector file (make one with `lmeval-speech steer`)")
        vectors = {int(k.split(".")[0]): f.get_tensor(k) for k in f.keys()}
    return vectors, {(p, d) for p, d in json.loads(meta["items"])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("capture_dir", help="a capture (capture=pooled or tokens) of calibration items: never the "
                   "items you will evaluate (e.g. a run on the validation split)")
    p.add_argument("--out", required=True, help="the steering vector file to write (.safetensors)")
    p.add_argument("--pairs", default=None, help="comma-separated pairs to estimate on (default: all)")


def main(args) -> int:
    pairs = set(args.pairs.split(",")) if args.pairs else None
    vectors, items, model = estimate(args.capture_dir, pairs)
    write(args.out, vectors, items, model, str(Path(args.capture_dir).resolve()))
    norms = ", ".join(f"{i}: {np.linalg.norm(v):.2f}" for i, v in list(vectors.items())[:: max(1, len(vectors) // 6)])
    print(f"wrote {args.out}: mean text - speech state over {len(items)} items, {len(vectors)} hidden states "
          f"(norm by index {norms})")
    return 0
