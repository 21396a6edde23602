"""Issue 34, item 1: where the run's time goes against the machine's matrix-multiply roofline.

In one run: (1) the machine's measured ``F.linear`` throughput at the embedded model's shapes, float32 and
bfloat16 (the roofline); (2) a fixed sample of the demo (``--task``, ``--limit`` items, text and speech
twins, ``lslm`` on ``pretrained=mini``, float32), each phase timed by wrapping the backend's methods, with
the FLOPs each phase *executed* (padding included) and the FLOPs of real tokens:

* audio preparation (``AudioResolver.resolve``: TTS cache or synthesis, loading; the encoder's token counting),
* encoder + adapter (``encode_audio``: log-mel, Whisper tiny.en, the CTC adapter),
* decoder prefix (``run_decoder``: each item's shared context once) and continuations (``run_continuation``),
* the LM head at scored positions (``logits``),
* everything else (collation, Python, lm-eval's own work): the rest of the wall time.

Decoder FLOPs are counted as 2 x (non-embedding parameters) per token plus the attention products
(4 x layers x hidden x context length per token); the LM head as 2 x hidden x vocabulary per position.
Printed as a Markdown table and written as JSON with ``--json``.

    python benchmarks/roofline.py --limit 40 --json benchmarks/roofline.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info  # noqa: E402


def matmul_peak(dtype: torch.dtype, shapes, repeats: int = 20) -> float:
    """Median GFLOP/s of ``F.linear`` over the given (M, K, N) shapes."""
    rates = []
    for m, k, n in shapes:
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        for _ in range(3):
            F.linear(x, w)
        t0 = time.perf_counter()
        for _ in range(repeats):
            F.linear(x, w)
        rates.append(2 * m * k * n * repeats / (time.perf_counter() - t0) / 1e9)
    return sorted(rates)[len(rates) // 2]


class Phases:
    """Wall time and FLOPs per phase, by wrapping bound methods (a phase's outermost call counted only; a
    phase running inside another, the encoder inside audio preparation, is subtracted from it below)."""

    def __init__(self):
        self.time: dict[str, float] = {}
        self.flops: dict[str, float] = {}
        self.useful: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, obj, name: str, phase: str, count=None):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            outer = self._depth.get(phase, 0) == 0
            self._depth[phase] = self._depth.get(phase, 0) + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[phase] -= 1
                if outer:
                    self.time[phase] = self.time.get(phase, 0.0) + time.perf_counter() - t0
                    if count is not None:
                        executed, useful = count(*args, **kwargs)
                        self.flops[phase] = self.flops.get(phase, 0.0) + executed
                        self.useful[phase] = self.useful.get(phase, 0.0) + useful

        setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="speech_arc_easy")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    from lm_eval.evaluator import simple_evaluate

    import lmeval_speech.registration as registration
    from lmeval_speech.models.lslm import LSLM

    registration.register()
    lm = LSLM(pretrained="mini", device="cpu", batch_size=args.batch_size)
    b = lm.backend_impl
    cfg = b.language_model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    params = sum(p.numel() for n, p in b.decoder.named_parameters() if "embed_tokens" not in n)
    shapes = [(512, d, cfg.intermediate_size), (512, cfg.intermediate_size, d), (512, d, d), (64, d, vocab)]
    peak = {"float32": matmul_peak(torch.float32, shapes), "bfloat16": matmul_peak(torch.bfloat16, shapes)}

    def decoder_flops(tokens: float, context: float) -> float:
        return tokens * (2 * params + 4 * layers * d * context)

    def count_prefix(inputs_embeds, attention_mask, *a, **k):
        bsz, width = attention_mask.shape
        real = float(attention_mask.sum())
        return decoder_flops(bsz * width, width / 2), decoder_flops(real, real / bsz / 2)

    def count_cont(prefix, prefix_mask, rows, input_ids, attention_mask):
        n, c = input_ids.shape
        ctx = prefix_mask.shape[1] + c / 2
        return decoder_flops(n * c, ctx), decoder_flops(float(attention_mask.sum()), ctx)

    def count_head(hidden):
        positions = hidden.numel() / d
        return 2 * d * vocab * positions, 2 * d * vocab * positions

    ph = Phases()
    ph.wrap(lm.audio, "resolve", "audio preparation (TTS cache, loading)")
    ph.wrap(b, "encode_audio", "encoder + adapter")
    ph.wrap(b, "run_decoder", "decoder prefix", count_prefix)
    ph.wrap(b, "run_continuation", "decoder continuations", count_cont)
    ph.wrap(b, "logits", "LM head (scored positions)", count_head)
    t0 = time.perf_counter()
    simple_evaluate(model=lm, tasks=[args.task], limit=args.limit, verbosity="ERROR")
    wall = time.perf_counter() - t0
    # encode_audio runs inside resolve (token counting) and again on an embedding-cache miss: shown once,
    # as its own phase, and taken out of the preparation phase it was nested in
    rows = []
    nested = ph.time.get("encoder + adapter", 0.0)
    for phase, seconds in ph.time.items():
        if phase.startswith("audio preparation"):
            seconds = max(0.0, seconds - nested)
        flops = ph.flops.get(phase)
        rows.append({"phase": phase, "seconds": seconds, "share": seconds / wall,
                     "gflop_executed": None if flops is None else flops / 1e9,
                     "gflop_useful": None if flops is None else ph.useful[phase] / 1e9,
                     "gflops_achieved": None if flops is None else flops / seconds / 1e9,
                     "of_fp32_peak": None if flops is None else flops / seconds / 1e9 / peak["float32"]})
    rest = wall - sum(r["seconds"] for r in rows)
    rows.append({"phase": "everything else (collation, Python, lm-eval)", "seconds": rest, "share": rest / wall,
                 "gflop_executed": None, "gflop_useful": None, "gflops_achieved": None, "of_fp32_peak": None})
    print(machine_info(threads))
    print(f"matmul roofline at SmolLM2's shapes: float32 {peak['float32']:.0f} GFLOP/s, bfloat16 "
          f"{peak['bfloat16']:.0f} GFLOP/s; sample: {args.task} --limit {args.limit} (text + speech), "
          f"batch {args.batch_size}, wall {wall:.1f} s")
    print("| phase | s | share of wall | GFLOP executed (real tokens) | GFLOP/s | of fp32 peak |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        g = "" if r["gflop_executed"] is None else f"{r['gflop_executed']:.1f} ({r['gflop_useful']:.1f})"
        rate = "" if r["gflops_achieved"] is None else f"{r['gflops_achieved']:.0f}"
        share = "" if r["of_fp32_peak"] is None else f"{r['of_fp32_peak']:.0%}"
        print(f"| {r['phase']} | {r['seconds']:.1f} | {r['share']:.0%} | {g} | {rate} | {share} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(threads), "peak_gflops": peak,
                                               "task": args.task, "limit": args.limit, "wall_s": wall,
                                               "phases": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
