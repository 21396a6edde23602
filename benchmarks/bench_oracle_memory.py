"""Resident memory of an oracle intervention run: are the text twins' reference states freed?

Runs ``lslm`` with ``intervention=angle`` (oracle mode, decoder layers 1 and 2 and the input) over N
items, each a text twin and a speech twin, on a tiny Qwen2-Audio built from config, sampling RSS
and the number of items whose reference states are held every 0.1 s; the same run without an
intervention (same process) is the baseline. Flat = RSS growth and held references do not grow with N.

    python benchmarks/bench_oracle_memory.py [--items 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_capture_memory import build_tiny, measure  # noqa: E402

TASK = "speech_mmlu_continuation_bench"


def run(model_dir: str, n: int, intervene: bool):
    from lm_eval.api.instance import Instance

    from conftest import tone
    from lmeval_speech.models.lslm import LSLM

    kw = {"intervention": "angle", "intervene_layers": "input/1/2"} if intervene else {}
    lm = LSLM(pretrained=model_dir, device="cpu", batch_size=16, **kw)
    reqs = []
    for i in range(n):
        doc = {"question": f"What is item number {i} about?"}
        audio = {"audio": [{"array": tone(0.3, seed=i), "sampling_rate": 16000}]}
        reqs.append(Instance("loglikelihood", doc, ("Question: <audio>\nAnswer:", " x", audio), 0, (f"{TASK}_speech", i, 1)))
        reqs.append(Instance("loglikelihood", doc, (f"Question: {doc['question']}\nAnswer:", " x"), 0, (f"{TASK}_text", i, 1)))
    held_now = lambda: len(lm.intervener.text_states) if lm.intervener else 0  # noqa: E731
    quarters, dur, held = measure(lambda: lm.loglikelihood(reqs, disable_tqdm=True), held_now, every=0.1)
    return quarters, dur, held, held_now()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "tiny")
        base, t_base, _, _ = run(model, args.items, False)
        iv, t_iv, held, left = run(model, args.items, True)
    print(f"{time.strftime('%Y-%m-%d')} {os.uname().machine} {os.cpu_count()} cores, {args.items} items "
          "(text + speech twin each), oracle angle at hidden states 0/1/2")
    print("run               RSS MB at 25%    50%    75%   100%   seconds")
    print(f"no intervention {base[0]:12.0f} {base[1]:6.0f} {base[2]:6.0f} {base[3]:6.0f} {t_base:9.1f}")
    print(f"oracle          {iv[0]:12.0f} {iv[1]:6.0f} {iv[2]:6.0f} {iv[3]:6.0f} {t_iv:9.1f}")
    print(f"items with reference states held: at most {held} during the run (chunk "
          f"{256}), {left} after it; RSS growth 25%->100%: {iv[3] - iv[0]:+.0f} MB "
          f"(baseline {base[3] - base[0]:+.0f} MB)")


if __name__ == "__main__":
    main()
