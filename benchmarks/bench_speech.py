"""Speech-path throughput of ``lslm``: batch 1 vs batch 8, prefix sharing vs whole sequences, and
the cost of hidden-state capture.

    python benchmarks/bench_speech.py [--quick] [--model tiny|mini|DIR] [--audio espeak|tone] [--threads 1]

``--model tiny`` (default) is a random-weight Qwen2-Audio built from config like the tests' (text
hidden 256, 4 layers; encoder d_model 64, 2 layers) with their tokenizer; ``mini`` is the embedded
default model; a DIR is any supported speech LLM. Each item is one spoken question (espeak-ng
through ``lmeval_speech.audio.get_audio`` into a temporary cache, or tones) asked as a 4-choice
loglikelihood item, exactly the requests a speech twin sends.

Every timed call gets a freshly loaded ``LSLM`` (loading is not timed) and an empty capture
folder: capture skips items its folder already holds, and the adapter's speech-embedding LRU would
otherwise spare later calls the audio encoding that a real run pays once per item. Times are the
best of R interleaved repeats; torch is pinned to ``--threads`` (default 1; see
bench_text_throughput.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import machine_info  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from lmeval_speech.models.lslm import LSLM  # noqa: E402

CHOICES = [" Paris", " the river Nile", " Madrid", " none of the above"]
QUESTIONS = ["What is the capital of France?", "Which river is the longest in the world?",
             "Which city hosted the first modern Olympic games?", "What is the largest desert on Earth?",
             "Which planet is closest to the sun?", "Who wrote the play Hamlet?",
             "What is the boiling point of water at sea level?", "Which ocean lies between Africa and Australia?"]
# (name, batch size, capture, prefix_cache): "whole" runs every choice's sequence from scratch (the
# path before prefix sharing), the baseline of the prefix-cache row
CONFIGS = [("batch 8, whole sequences", 8, None, False), ("batch 1, capture off", 1, None, True),
           ("batch 8, capture off", 8, None, True), ("batch 8, capture=pooled", 8, "pooled", True),
           ("batch 8, capture=tokens", 8, "tokens", True)]


def tiny_qwen2_audio(path: Path) -> str:
    from conftest import build_tokenizer, save_tiny_qwen2_audio

    return save_tiny_qwen2_audio(path, build_tokenizer(), hidden=256, layers=4)


def make_audio(n_items: int, source: str, cache_dir: Path) -> list[np.ndarray]:
    """One clip per item at 16 kHz: the question spoken by espeak-ng, or a tone of similar length."""
    from conftest import tone

    from lmeval_speech.audio import TTSSpec, get_audio

    texts = [f"Question {i + 1}. {QUESTIONS[i % len(QUESTIONS)]}" for i in range(n_items)]
    if source == "espeak":
        return [get_audio(t, TTSSpec(), cache_dir=cache_dir) for t in texts]
    return [tone(0.08 * len(t), 180 + 20 * i, seed=i) for i, t in enumerate(texts)]


def make_requests(clips):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={"question": QUESTIONS[d % len(QUESTIONS)]},
                     arguments=("The following are questions (with answers).\n\nQuestion: <audio>\nAnswer:", choice,
                                {"audio": [{"array": clip, "sampling_rate": 16000}]}),
                     idx=i, metadata=("bench_speech", d, 1))
            for d, clip in enumerate(clips) for i, choice in enumerate(CHOICES)]


def timed(model: str, requests, batch_size: int, capture: str | None, capture_dir: Path,
          prefix_cache: bool = True) -> tuple[float, list[float]]:
    """Seconds for one ``loglikelihood`` call on a freshly loaded model (loading is not timed)."""
    shutil.rmtree(capture_dir, ignore_errors=True)
    lm = LSLM(pretrained=model, device="cpu", batch_size=batch_size, prefix_cache=prefix_cache,
              **({"capture": capture, "capture_dir": str(capture_dir)} if capture else {}))
    start = time.perf_counter()
    res = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, [ll for ll, _ in res]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 items, best of 2 (default 24 items, best of 3)")
    parser.add_argument("--model", default="tiny", help="tiny (from config), mini (embedded default) or a DIR")
    parser.add_argument("--audio", choices=("espeak", "tone"),
                        default="espeak" if shutil.which("espeak-ng") else "tone")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_items, repeats = (8, 2) if args.quick else (24, 3)

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tiny_qwen2_audio(tmp / "model") if args.model == "tiny" else args.model
        lm = LSLM(pretrained=model, device="cpu")
        clips = make_audio(n_items, args.audio, tmp / "tts")
        reqs = make_requests(clips)
        seconds_audio = np.mean([len(c) / 16000 for c in clips])
        n_audio_tokens = np.mean([lm.backend_impl.num_audio_tokens(len(c)) for c in clips])
        n_params = sum(p.numel() for p in lm.model.parameters())
        del lm
        timed(model, reqs[: 2 * len(CHOICES)], 8, "tokens", tmp / "capture")  # lazy imports, first allocations
        best, lls = {name: float("inf") for name, *_ in CONFIGS}, {}
        for _ in range(repeats):
            for name, batch_size, capture, prefix in CONFIGS:
                seconds, lls[name] = timed(model, reqs, batch_size, capture, tmp / "capture", prefix)
                best[name] = min(best[name], seconds)
    diff = max(float(np.max(np.abs(np.subtract(v, lls[CONFIGS[0][0]])))) for v in lls.values())

    print(machine_info(args.threads))
    print(f"model: {'tiny Qwen2-Audio from config' if args.model == 'tiny' else args.model}, {n_params / 1e6:.1f}M "
          f"params; {n_items} items x {len(CHOICES)} choices, {args.audio} audio of {seconds_audio:.1f} s "
          f"({n_audio_tokens:.0f} audio positions) per item; best of {repeats} interleaved repeats")
    ref = best["batch 8, capture off"]
    head = "| config                  | items/s | requests/s | ms/item | time vs batch 8, capture off |"
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for name, *_ in CONFIGS:
        print(f"| {name:<23} | {n_items / best[name]:>7.2f} | {len(reqs) / best[name]:>10.2f} | "
              f"{1000 * best[name] / n_items:>7.1f} | {best[name] / ref:>27.2f}x |")
    print(f"prefix sharing vs whole sequences (batch 8): {best['batch 8, whole sequences'] / ref:.2f}x requests/s")
    print(f"batch 8 vs batch 1: {best['batch 1, capture off'] / ref:.2f}x items/s; capture overhead: pooled "
          f"{100 * (best['batch 8, capture=pooled'] / ref - 1):+.1f}% (goal <= 10%), tokens "
          f"{100 * (best['batch 8, capture=tokens'] / ref - 1):+.1f}%; max abs diff of log-likelihoods "
          f"across configs {diff:.1e}")


if __name__ == "__main__":
    main()
