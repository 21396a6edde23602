"""``dtype=bfloat16`` against float32 on the embedded model, same requests, same run: speed and what
it changes in the numbers (issue 18's untested lever for the full run).

    python benchmarks/bench_dtype.py [--limit 0.001] [--repeats 2] [--batch-size 8] [--out FILE.json]

The requests are ``speech_mmlu_continuation``'s, lm-eval's fixed ``--limit`` sample (0.001 = the
first item of each of the 57 subjects), text and speech twins. The speech is synthesized once (an
untimed warm-up run), then the two models are timed in interleaved repeats (best of R).
The numbers are compared item by item from the sample logs: the largest and mean absolute
difference of the choices' log-likelihoods, and how many items change their chosen answer.
torch uses its default threads (every core), as a user's run would.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASK = "speech_mmlu_continuation"


def run(lm, limit: float) -> tuple[float, dict]:
    from lm_eval.evaluator import simple_evaluate

    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[TASK], limit=limit, log_samples=True, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    samples = {}
    for task, rows in out["samples"].items():  # one leaf task per subject and twin
        twin = task.rsplit("_", 1)[1]
        for s in rows:
            samples[(twin, task, s["doc_id"])] = [float(r[0]) for r in s["filtered_resps"]]
    return seconds, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=float, default=0.001)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    os.environ.setdefault("LMEVAL_SPEECH_CACHE", os.path.join(tempfile.mkdtemp(prefix="lmeval_speech_dtype_"), "audio"))
    import numpy as np
    import torch
    from _common import machine_info

    from lmeval_speech.models.lslm import LSLM

    machine = machine_info(torch.get_num_threads())
    print(machine, flush=True)
    models = {d: LSLM(pretrained="mini", device="cpu", batch_size=args.batch_size, dtype=d)
              for d in ("float32", "bfloat16")}
    times: dict[str, list[float]] = {d: [] for d in models}
    samples = {}
    run(models["float32"], args.limit)  # warm-up: synthesis (the cache is then shared), first-call allocations
    for _ in range(args.repeats):
        for d, lm in models.items():
            seconds, samples[d] = run(lm, args.limit)
            times[d].append(seconds)
            print(f"  {d}: {seconds:.1f} s", flush=True)
    keys = sorted(samples["float32"])
    if keys != sorted(samples["bfloat16"]):
        raise SystemExit("the two runs scored different items")
    a = [np.array(samples["float32"][k]) for k in keys]
    b = [np.array(samples["bfloat16"][k]) for k in keys]
    diff = np.concatenate([np.abs(x - y) for x, y in zip(a, b, strict=True)])
    record = {"machine": machine, "limit": args.limit, "batch_size": args.batch_size,
              "times_s": times, "speedup_bf16": min(times["float32"]) / min(times["bfloat16"]),
              "max_abs_diff_ll": float(diff.max()), "mean_abs_diff_ll": float(diff.mean())}
    for twin in ("text", "speech"):
        idx = [i for i, k in enumerate(keys) if k[0] == twin]
        choice = {d: np.array([int(np.argmax(x[i])) for i in idx]) for d, x in (("float32", a), ("bfloat16", b))}
        record[twin] = {"items": len(idx), "changed_answers": int((choice["float32"] != choice["bfloat16"]).sum())}
    print(f"items: {record['text']['items']} per twin; float32 {min(times['float32']):.1f} s, bfloat16 "
          f"{min(times['bfloat16']):.1f} s (best of {args.repeats}): bfloat16 {record['speedup_bf16']:.2f}x faster")
    print(f"log-likelihoods: max |diff| {record['max_abs_diff_ll']:.3f}, mean {record['mean_abs_diff_ll']:.3f} nats; "
          f"chosen answer changed: text {record['text']['changed_answers']}, speech {record['speech']['changed_answers']}")
    if args.out is not None:
        from lmeval_speech.fileio import atomic_write_json

        atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
