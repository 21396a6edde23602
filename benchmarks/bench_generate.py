"""Batched generation vs the per-request loop, same tiny model and prompts, in one run.

``lslm.generate_until`` batches requests with the same generation kwargs (left padding, each row
stopping at its stop string). Baseline: the same code at ``batch_size=1`` (one request at a time,
as ``generate_until`` ran before batching). Prints requests/s of both, their ratio, and whether
the outputs are identical (greedy decoding).

    python benchmarks/bench_generate.py [--items 32] [--batch 8] [--max-new 32]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=32)
    args = ap.parse_args()
    import torch
    from lm_eval.api.instance import Instance

    from conftest import build_tokenizer, save_tiny_qwen2_audio, tone
    from lmeval_speech.models.lslm import LSLM

    torch.set_num_threads(1)
    kw = {"until": ["\n\n"], "max_gen_toks": args.max_new, "do_sample": False}
    reqs = [Instance("generate_until", {}, ("Question: <audio>\nAnswer:", kw,
                                            {"audio": [{"array": tone(1.0 + (i % 5) * 0.4, seed=i), "sampling_rate": 16000}]}), 0)
            for i in range(args.items)]
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_qwen2_audio(Path(tmp) / "tiny", build_tokenizer(), hidden=256, layers=4)
        rows = {}
        for bs in (1, args.batch):
            lm = LSLM(pretrained=model, device="cpu", batch_size=bs)
            lm.generate_until(reqs[:2], disable_tqdm=True)  # warm-up
            lm.embeddings.clear()
            t0 = time.perf_counter()
            outs = lm.generate_until(reqs, disable_tqdm=True)
            rows[bs] = (args.items / (time.perf_counter() - t0), outs)
    (r1, o1), (rb, ob) = rows[1], rows[args.batch]
    print(f"{time.strftime('%Y-%m-%d')} {os.uname().machine} {os.cpu_count()} cores, 1 torch thread; tiny Qwen2-Audio "
          f"(hidden 256, 4 layers), {args.items} spoken prompts of 1.0-2.6 s, greedy, max {args.max_new} new tokens")
    print(f"batch 1 (per-request loop): {r1:.2f} req/s; batch {args.batch}: {rb:.2f} req/s; "
          f"ratio {rb / r1:.2f}x; identical outputs: {o1 == ob}")


if __name__ == "__main__":
    main()
