"""Resident memory over a long capture run: does it stay flat?

Runs ``lslm`` with ``capture=tokens`` (token states for every item, the worst case) over N items of
a tiny Qwen2-Audio built from config, sampling the process's RSS every 0.2 s, and prints RSS at
25/50/75/100% of the run next to the RSS of the same run with capture off (baseline measured in the
same process), plus the bytes written. Flat = the capture's extra RSS does not grow with N.

    python benchmarks/bench_capture_memory.py [--items 2000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_tiny(path: Path) -> str:
    from conftest import build_tokenizer, save_tiny_qwen2_audio

    return save_tiny_qwen2_audio(path, build_tokenizer())


def run(model_dir: str, n: int, capture_dir: str | None):
    from lm_eval.api.instance import Instance

    from conftest import tone
    from lmeval_speech.models.lslm import LSLM

    kw = {"capture": "tokens", "capture_dir": capture_dir, "capture_layers": "all"} if capture_dir else {}
    lm = LSLM(pretrained=model_dir, device="cpu", batch_size=16, **kw)
    reqs = [Instance("loglikelihood", {"question": "q"},
                     ("Question: <audio>\nAnswer:", " x", {"audio": [{"array": tone(0.3, seed=i), "sampling_rate": 16000}]}),
                     0, ("bench_speech", i, 1)) for i in range(n)]
    quarters, dur, _ = measure(lambda: lm.loglikelihood(reqs, disable_tqdm=True))
    return quarters, dur


def measure(call, probe=lambda: 0, every: float = 0.2):
    """Run ``call()`` while sampling RSS (and ``probe()``) every ``every`` s: RSS at 25/50/75/100% of
    the run, its seconds, and the largest ``probe()`` value seen."""
    samples, done = [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.time(), rss_mb(), probe()))
            time.sleep(every)

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.time()
    call()
    done.set()
    t.join()
    run_samples = [(r, p) for ts, r, p in samples if ts >= t0] or [(rss_mb(), probe())]
    quarters = [run_samples[min(len(run_samples) - 1, int(q * len(run_samples)) - 1)][0] for q in (0.25, 0.5, 0.75, 1.0)]
    return quarters, time.time() - t0, max(p for _, p in run_samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(Path(tmp) / "tiny")
        base, t_base = run(model, args.items, None)
        cap, t_cap = run(model, args.items, str(Path(tmp) / "cap"))
        written = sum(p.stat().st_size for p in (Path(tmp) / "cap").glob("*")) / 2**20
    print(f"{time.strftime('%Y-%m-%d')} {os.uname().machine} {os.cpu_count()} cores, {args.items} items, capture=tokens (all layers)")
    print("run            RSS MB at 25%    50%    75%   100%   seconds")
    print(f"capture off   {base[0]:10.0f} {base[1]:6.0f} {base[2]:6.0f} {base[3]:6.0f} {t_base:9.1f}")
    print(f"capture on    {cap[0]:10.0f} {cap[1]:6.0f} {cap[2]:6.0f} {cap[3]:6.0f} {t_cap:9.1f}")
    print(f"capture growth 25%->100%: {cap[3] - cap[0]:+.0f} MB (baseline {base[3] - base[0]:+.0f} MB); "
          f"written to disk: {written:.0f} MB")


if __name__ == "__main__":
    main()
