"""Text-path throughput of ``lslm`` vs lm-eval's own ``hf`` model, same LM, same requests, same run.

    python benchmarks/bench_text_throughput.py [--quick] [--model DIR] [--batch-size 8] [--threads 1]

Without ``--model`` a random-weight Llama (hidden 256, 4 layers) is built from config with the
test suite's byte-level BPE tokenizer. Two request shapes, 4 choices per item:

* ``cloze``: multi-token continuations (ARC / MMLU-continuation style): every choice needs its
  own forward pass in both models;
* ``letter``: single-token `` A``..`` D`` continuations (MMLU letter style): ``hf``'s logits
  cache (``group_by="contexts"``) scores the four choices from one forward pass.

``hf`` is timed with its default logits cache and with ``logits_cache=False``, which isolates the
cost of the forward path itself; ``lslm`` with its default prefix sharing (one pass over an item's
shared context, the choices extending its key/value cache) and with ``prefix_cache=False`` (every
sequence whole: the path before prefix sharing). Each model scores the same ``Instance`` list; times are the best
of R interleaved repeats (interleaving spreads a co-tenant's load over all models alike). Torch is
pinned to ``--threads`` (default 1) for the same reason: on a shared 2-core box two threads time
whoever else holds a core. The log-likelihoods of the models are compared too (max abs diff).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info  # noqa: E402
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHOICES = 4


def tiny_llama(path: Path) -> str:
    """A random Llama saved with the tests' tokenizer, loaded back by both models as a user's would be."""
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_requests(n_items: int, shape: str, seed: int = 0):
    """n_items x 4 loglikelihood Instances with contexts of 4 to 16 sentences."""
    from conftest import CORPUS
    from lm_eval.api.instance import Instance

    sentences = sorted(set(CORPUS))
    rng = np.random.default_rng(seed)
    out = []
    for doc_id in range(n_items):
        body = " ".join(rng.choice(sentences, size=int(rng.integers(4, 17))))
        ctx = f"The following are questions (with answers).\n\n{body}\nQuestion: item {doc_id}?\nAnswer:"
        if shape == "letter":
            conts = [f" {c}" for c in "ABCD"]
        else:
            # distinct choices: hf scores identical requests once, which would flatter its cache
            conts = [f" {s}" for s in rng.choice(sentences, size=CHOICES, replace=False)]
        out += [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, cont), idx=i,
                         metadata=("bench_text", doc_id, 1)) for i, cont in enumerate(conts)]
    return out


def timed(lm, requests) -> tuple[float, list[float]]:
    start = time.perf_counter()
    res = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, [ll for ll, _ in res]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 items per shape, best of 2 (default 64, best of 3)")
    parser.add_argument("--model", default=None, help="a local causal LM dir (default: a tiny Llama from config)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_items, repeats = (16, 2) if args.quick else (64, 3)

    import transformers
    from lm_eval.models.huggingface import HFLM

    from lmeval_speech.models.lslm import LSLM

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or tiny_llama(Path(tmp))
        kw = {"pretrained": model_dir, "device": "cpu", "batch_size": args.batch_size}
        models = {"hf": HFLM(dtype="float32", **kw), "hf no-cache": HFLM(dtype="float32", logits_cache=False, **kw),
                  "lslm": LSLM(**kw), "lslm whole": LSLM(prefix_cache=False, **kw)}
        n_params = sum(p.numel() for p in models["lslm"].model.parameters())
        rows = []
        for shape in ("cloze", "letter"):
            reqs = make_requests(n_items, shape)
            tok = models["lslm"].tokenizer
            ctx_len = np.mean([len(tok.encode(r.args[0])) for r in reqs])
            cont_len = np.mean([len(tok.encode(r.args[1], add_special_tokens=False)) for r in reqs])
            for lm in models.values():  # warm-up: first-call allocations and lazy imports
                timed(lm, reqs[:CHOICES * 2])
            best, lls = dict.fromkeys(models, float("inf")), {}
            for _ in range(repeats):
                for name, lm in models.items():
                    seconds, lls[name] = timed(lm, reqs)
                    best[name] = min(best[name], seconds)
            diff = max(float(np.max(np.abs(np.subtract(lls[name], lls["lslm"])))) for name in ("hf", "hf no-cache", "lslm whole"))
            rows.append((shape, len(reqs), ctx_len, cont_len, {k: len(reqs) / v for k, v in best.items()}, diff))

    print(machine_info(args.threads))
    print(f"model: {args.model or 'tiny Llama from config (hidden 256, 4 layers)'}, {n_params / 1e6:.1f}M params, "
          f"batch {args.batch_size}, {n_items} items x {CHOICES} choices per shape, best of {repeats} "
          f"interleaved repeats, requests/s (higher is better)")
    head = ("| shape  | requests | ctx tok | cont tok | hf req/s | hf no-cache req/s | lslm req/s | "
            "lslm/hf | lslm/hf no-cache | lslm whole req/s | lslm/lslm whole | max abs diff ll |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for shape, n, ctx_len, cont_len, rate, diff in rows:
        print(f"| {shape:<6} | {n:>8} | {ctx_len:>7.0f} | {cont_len:>8.1f} | {rate['hf']:>8.1f} | "
              f"{rate['hf no-cache']:>17.1f} | {rate['lslm']:>10.1f} | {rate['lslm'] / rate['hf']:>6.2f}x | "
              f"{rate['lslm'] / rate['hf no-cache']:>15.2f}x | {rate['lslm whole']:>16.1f} | "
              f"{rate['lslm'] / rate['lslm whole']:>14.2f}x | {diff:>15.1e} |")
    print("goal: lslm/hf >= 1.0x")


if __name__ == "__main__":
    main()
