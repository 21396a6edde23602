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

Several variants run in the same process on the same items, one after another after a warm-up run, with one
lm-eval ``TaskManager`` (so its indexing, a fixed start-up cost, is in none of them); each variant's
log-likelihoods are compared with the first's:

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


VARIANTS = {
    # name: (dtype of the model, continuations packed one row per prefix, decoder only in bfloat16)
    "fp32-rows": ("float32", False, False),      # before: a row (and a copy of the prefix's cache) per continuation
    "fp32-packed": ("float32", True, False),     # after: one packed row per prefix (run_packed)
    "bf16-packed": ("bfloat16", True, False),    # dtype=bfloat16, the whole model
    "bf16-decoder": ("float32", True, True),     # the encoder in float32, the decoder in bfloat16 (not a model arg)
}


def measure(args, name, task_manager, peak):
    from lm_eval.evaluator import simple_evaluate

    from lmeval_speech.models.lslm import LSLM

    dtype, packed, decoder_only = VARIANTS[name]
    lm = LSLM(pretrained="mini", device="cpu", batch_size=args.batch_size, dtype=dtype)
    lm.pack_tails = packed
    b = lm.backend_impl
    if decoder_only:
        b.language_model.to(torch.bfloat16)
    cfg = b.language_model.config
    d, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    params = sum(p.numel() for n, p in b.decoder.named_parameters() if "embed_tokens" not in n)

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

    def count_packed(prefix, prefix_mask, input_ids, segments, offsets, rows=None):
        n, c = input_ids.shape
        ctx = prefix_mask.shape[1] + c / 2  # attention products over the mask's full width, as SDPA computes them
        return decoder_flops(n * c, ctx), decoder_flops(float((segments >= 0).sum()), prefix_mask.shape[1])

    def count_head(hidden):
        positions = hidden.numel() / d
        return 2 * d * vocab * positions, 2 * d * vocab * positions

    ph = Phases()
    ph.wrap(lm.audio, "resolve", "audio preparation (TTS cache, loading)")
    ph.wrap(b, "encode_audio", "encoder + adapter")
    ph.wrap(b, "run_decoder", "decoder prefix", count_prefix)
    ph.wrap(b, "run_continuation", "decoder continuations", count_cont)
    ph.wrap(b, "run_packed", "decoder continuations", count_packed)
    ph.wrap(b, "logits", "LM head (scored positions)", count_head)
    scores: list = []
    real_ll = lm.loglikelihood
    lm.loglikelihood = lambda reqs, *a, **k: (lambda out: scores.extend(float(x[0]) for x in out) or out)(
        real_ll(reqs, *a, **k))
    t0 = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=[args.task], limit=args.limit, verbosity="ERROR", task_manager=task_manager)
    wall = time.perf_counter() - t0
    accuracy = {t: r.get("acc,none") for t, r in out["results"].items()}
    # encode_audio runs inside resolve (the embedded model counts its speech tokens by encoding): shown once,
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
    return {"variant": name, "dtype": dtype, "packed": packed, "decoder_only_bf16": decoder_only, "wall_s": wall,
            "accuracy": accuracy,
            "phases": rows}, scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="speech_arc_easy")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {sorted(VARIANTS)}")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    from lm_eval.tasks import TaskManager

    import lmeval_speech.registration as registration
    from lmeval_speech.models.lslm import LSLM

    registration.register()
    cfg = LSLM(pretrained="mini", device="cpu").backend_impl.language_model.config
    d = cfg.hidden_size
    shapes = [(512, d, cfg.intermediate_size), (512, cfg.intermediate_size, d), (512, d, d), (64, d, cfg.vocab_size)]
    peak = {"float32": matmul_peak(torch.float32, shapes), "bfloat16": matmul_peak(torch.bfloat16, shapes)}
    task_manager = TaskManager()  # indexed once: lm-eval's fixed start-up cost is not in any variant's wall
    names = args.variants.split(",")
    measure(args, names[0], task_manager, peak)  # warm-up: caches (TTS, mel filters, kernels), not reported
    results, reference = [], None
    for name in names:
        res, scores = measure(args, name, task_manager, peak)
        if reference is None:
            reference = scores
        res["max_abs_dll_vs_first"] = float(max(abs(a - b) for a, b in zip(scores, reference, strict=True)))
        results.append(res)
    print(machine_info(threads))
    print(f"matmul roofline at SmolLM2's shapes: float32 {peak['float32']:.0f} GFLOP/s, bfloat16 "
          f"{peak['bfloat16']:.0f} GFLOP/s; sample: {args.task} --limit {args.limit} (text + speech), "
          f"batch {args.batch_size}")
    for res in results:
        print(f"\n{res['variant']}: wall {res['wall_s']:.1f} s, max |dLL| vs {names[0]} {res['max_abs_dll_vs_first']:.2g}, "
              f"accuracy {res['accuracy']}")
        print("| phase | s | share of wall | GFLOP executed (real tokens) | GFLOP/s | of fp32 peak |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in res["phases"]:
            g = "" if r["gflop_executed"] is None else f"{r['gflop_executed']:.1f} ({r['gflop_useful']:.1f})"
            rate = "" if r["gflops_achieved"] is None else f"{r['gflops_achieved']:.0f}"
            share = "" if r["of_fp32_peak"] is None else f"{r['of_fp32_peak']:.0%}"
            print(f"| {r['phase']} | {r['seconds']:.1f} | {r['share']:.0%} | {g} | {rate} | {share} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(threads), "peak_gflops": peak,
                                               "task": args.task, "limit": args.limit, "variants": results},
                                              indent=2) + "\n")


if __name__ == "__main__":
    main()
