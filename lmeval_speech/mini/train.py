"""Train the mini model's adapter as a CTC recognizer over the LLM's own vocabulary (LLM and Whisper frozen).

Recipe (issue 13's measured findings):

* the adapter (5-frame stacking -> Linear-GELU -> 2 Transformer layers -> Linear, one vector per
  100 ms) is scored against SmolLM2's *frozen input embedding matrix*: the CTC logits of a frame are
  its dot products with the embeddings of the vocabulary subset seen in the training text, plus one
  learned blank logit. No LLM pass is needed: a step of 16 utterances costs ~1.6 s of one CPU core;
* at inference the LLM receives posterior-weighted embeddings (LegoSLM): blank frames dropped,
  repeats merged, each position the posterior-weighted average of the token embeddings
  (:meth:`lmeval_speech.mini.modeling.MiniCTCProjector.speech_embeddings`).

Data: the sentences of :mod:`lmeval_speech.mini.corpus` (offline sources, MMLU-decontaminated),
spoken by several espeak-ng voices and rates and encoded once by :mod:`lmeval_speech.mini.features`
(run it first, or alongside: new feature shards are picked up while training).

    nice -n 10 python -m lmeval_speech.mini.features            # background, resumable
    nice -n 10 python -m lmeval_speech.mini.train --minutes 60  # add --resume to continue

Checkpoints (projector + optimizer + RNG + step + schedule clock + loss curve; one safetensors file
with JSON metadata, never a pickle: :func:`save_checkpoint`) are written atomically (temp file in the
same folder, fsync, ``os.replace``: ``mini/checkpoint.py``) every ``--save-minutes`` to ``--ckpt-dir``;
the shippable ``adapter.safetensors`` and ``training.json`` go to ``--out`` at the same time.
``--minutes`` is the total budget of the cosine schedule, counted across resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .build import WEIGHTS_DIR, cache_root, smollm2_fp32_dir
from .checkpoint import (  # noqa: F401 (train's checkpoint API, as before the split)
    CKPT_NAME,
    LEGACY_CKPT,
    grow_from,
    init_layers,
    load_checkpoint,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
)
from .modeling import ctc_collapse




def load_embeddings() -> torch.Tensor:
    from safetensors import safe_open

    d = smollm2_fp32_dir()
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            if "model.embed_tokens.weight" in sf.keys():
                return sf.get_tensor("model.embed_tokens.weight").float()
    raise KeyError("model.embed_tokens.weight not found in SmolLM2's weights")


def make_config(ctc_vocab_size: int, ctc_layers: int):
    from transformers import AutoConfig

    from .modeling import MiniLSLMConfig
    from lmeval_speech.audio.whisper_ct2 import find_tiny_en_dir, read_ct2_variables, whisper_config_from_ct2

    audio = whisper_config_from_ct2(read_ct2_variables(find_tiny_en_dir() / "model.bin"))
    text = AutoConfig.from_pretrained(smollm2_fp32_dir())
    return MiniLSLMConfig(audio_config=audio, text_config=text, stack=5, audio_token_id=0, adapter_type="ctc",
                          ctc_layers=ctc_layers, ctc_vocab_size=ctc_vocab_size)


class ShardSet:
    """Memory-mapped fp16 encoder-frame shards written by :mod:`.features` (re-scanned for new ones)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.items: list[tuple[np.ndarray, int, int, str]] = []
        self.seen: set[str] = set()
        self.refresh()

    def refresh(self) -> int:
        new = 0
        for meta_file in sorted(self.folder.glob("shard*.json")):
            if meta_file.name in self.seen:
                continue
            meta = json.loads(meta_file.read_text())
            arr = np.load(meta_file.with_suffix(".npy"), mmap_mode="r")
            offs = meta["offsets"]
            for i, it in enumerate(meta["items"]):
                self.items.append((arr, offs[i], offs[i + 1], it["text"]))
            self.seen.add(meta_file.name)
            new += len(meta["items"])
        return new

    def __len__(self):
        return len(self.items)


#: Steps between re-scans of the feature folder for shards the featurizer wrote since.
REFRESH_EVERY = 200


def cosine_lr(peak: float, step: int, warmup: int, progress: float, min_frac: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_frac`` of ``peak`` as ``progress``
    (the schedule clock's share of the budget, counted across resumes) goes from 0 to 1."""
    return peak * min(1.0, (step + 1) / warmup) * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def refresh_due(step: int, last_refresh: int) -> bool:
    """Whether to re-scan for new feature shards. Steps advance by a pool's batches (4) per check, so
    ``step % 200 == 0`` never held after a resume at a step not divisible by 4 (session 4 resumed at
    5,457 and trained 2,300 steps without the 22,000 utterances encoded meanwhile)."""
    return step - last_refresh >= REFRESH_EVERY


def batch_tensors(items, tok_targets) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """Padded frames ``[B, T, 384]`` (T a multiple of 5), padding mask at token level, target ids."""
    lens = [b - a for _, a, b, _ in items]
    t = max(lens)
    t += (-t) % 5
    x = torch.zeros(len(items), t, items[0][0].shape[1])
    for i, (arr, a, b, _) in enumerate(items):
        x[i, : b - a] = torch.from_numpy(np.asarray(arr[a:b], dtype=np.float32))
    n_tok = torch.tensor([math.ceil(n / 5) for n in lens])
    pad = torch.arange(t // 5)[None] >= n_tok[:, None]
    return x, pad, [tok_targets(text) for *_, text in items]


def ctc_batch_loss(proj, vocab_emb, items, tok_targets) -> torch.Tensor:
    x, pad, targets = batch_tensors(items, tok_targets)
    h = proj(x, pad)
    logp = F.log_softmax(proj.ctc_logits(h, vocab_emb=vocab_emb), dim=-1)
    in_len = (~pad).sum(1)
    tgt_len = torch.tensor([len(t) for t in targets])
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    return F.ctc_loss(logp.transpose(0, 1), flat, in_len, tgt_len, blank=logp.shape[-1] - 1, reduction="mean",
                      zero_infinity=True)


def _edit_distance(a: list[int], b: list[int]) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


@torch.no_grad()
def token_error_rate(proj, emb, items, tok_targets, batch: int = 16) -> float:
    """Greedy CTC decoding (best class per frame, repeats merged, blanks dropped) vs the text's tokens."""
    was = proj.training
    proj.eval()
    errs = total = 0
    for s in range(0, len(items), batch):
        chunk = items[s : s + batch]
        x, pad, targets = batch_tensors(chunk, tok_targets)
        best = proj.ctc_logits(proj(x, pad), vocab_emb=emb).argmax(-1)
        blank = int(proj.vocab_ids.numel())
        for i, tgt in enumerate(targets):
            hyp = ctc_collapse(best[i][~pad[i]].tolist(), blank)
            errs += _edit_distance(hyp, tgt)
            total += len(tgt)
    proj.train(was)
    return errs / max(1, total)


def main(argv=None):
    from transformers import AutoTokenizer

    from .modeling import MiniCTCProjector

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0, help="total training budget (cosine schedule), across resumes")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoint in --ckpt-dir")
    ap.add_argument("--init", type=Path, default=None, metavar="ADAPTER",
                    help="start from an adapter file's weights and vocabulary (e.g. the shipped one, on a machine "
                         "without the checkpoint), with a fresh optimizer and schedule")
    ap.add_argument("--features", type=Path, default=cache_root() / "ctc_features")
    ap.add_argument("--ckpt-dir", type=Path, default=cache_root() / "ctc_train")
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-minutes", type=float, default=3.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bf16", type=int, default=1, help="bfloat16 CTC score products (1) or float32 (0)")
    ap.add_argument("--min-count", type=int, default=1, help="CTC vocabulary: tokens seen at least this often")
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="cosine schedule over this many steps instead of --minutes (the same run on any machine)")
    ap.add_argument("--save-at", default="", metavar="N1,N2,...",
                    help="also write adapter_step<N>.safetensors into --out at these steps (0: before training)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="posterior temperature stored in every adapter written (default: none stored)")
    args = ap.parse_args(argv)
    save_at = {int(x) for x in args.save_at.split(",") if x.strip()}
    if args.init is not None and args.out.resolve() == args.init.resolve().parent:
        raise SystemExit(f"--out {args.out} holds the --init adapter, which the first checkpoint would overwrite "
                         "(without its posterior temperature): give --out another folder")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tok = AutoTokenizer.from_pretrained(smollm2_fp32_dir())
    emb = load_embeddings()
    corpus = json.loads((args.features / "corpus.json").read_text())
    ckpt = load_checkpoint(args.ckpt_dir) if args.resume else None
    init = None
    if ckpt is None and args.init is not None:
        from safetensors.torch import load_file

        init = load_file(str(args.init))
        init.pop("ctc_temperature", None)  # an inference setting, not a weight
        if any(k.startswith("residual.") for k in init):
            raise SystemExit(f"{args.init} has a stage-2 residual; stage 1 starts from a stage-1 adapter")
    if ckpt is not None:
        vocab = ckpt["model"]["vocab_ids"].tolist()
    elif init is not None:
        vocab = init["vocab_ids"].tolist()
    else:
        from collections import Counter

        counts = Counter(i for s in corpus["sentences"] for i in tok.encode(" " + s, add_special_tokens=False))
        vocab = sorted(t for t, c in counts.items() if c >= args.min_count)
    index = {t: i for i, t in enumerate(vocab)}
    cache: dict[str, list[int]] = {}

    def tok_targets(text: str) -> list[int]:
        if text not in cache:
            cache[text] = [index[t] for t in tok.encode(" " + text, add_special_tokens=False) if t in index]
        return cache[text]

    # the CTC scores use the vocabulary subset's frozen embeddings, cast once (bf16: 3x faster on CPUs with avx512_bf16)
    vocab_emb = emb[torch.tensor(vocab)].to(torch.bfloat16 if args.bf16 else torch.float32)
    config = make_config(len(vocab), args.layers)
    proj = MiniCTCProjector(config)
    proj.vocab_ids.copy_(torch.tensor(vocab))
    opt = torch.optim.AdamW(proj.parameters(), lr=args.lr, weight_decay=0.01)
    state = {"step": 0, "train_seconds": 0.0, "losses": [], "valid": [], "utterances": 0}
    if init is not None:
        grow_from(proj, init)
        print(f"initialised from {args.init} ({init_layers(init)} -> {args.layers} layers)", flush=True)
    if ckpt is not None:
        state = restore_checkpoint(ckpt, proj, opt, rng)
    proj.train()

    train = ShardSet(args.features / "train")
    valid_set = ShardSet(args.features / "valid")
    valid = valid_set.items[:150]
    print(f"{len(train)} training utterances, {len(valid)} validation, CTC vocabulary {len(vocab)}", flush=True)

    def checkpoint():
        state["args"] = {k: str(v) for k, v in vars(args).items()}
        save_checkpoint(args.ckpt_dir, proj, opt, state, rng)
        stats = {"summary": summary(), "loss_curve_every50": [round(float(np.mean(state["losses"][i : i + 50])), 4)
                                                              for i in range(0, len(state["losses"]), 50)],
                 "valid_token_error_rate": state["valid"]}
        save_adapter(proj, stats, args.out, args.temperature)

    def snapshot() -> None:
        if state["step"] in save_at:
            save_adapter(proj, None, args.out, args.temperature, name=f"adapter_step{state['step']}.safetensors")

    def summary() -> dict:
        return {"recipe": "ctc-over-llm-vocabulary + LegoSLM posterior-weighted embeddings",
                "steps": state["step"], "train_minutes": round(state["train_seconds"] / 60, 1),
                "utterances_seen": state["utterances"], "batch": args.batch, "lr": args.lr,
                "training_utterances_available": len(train), "corpus_sentences": len(corpus["sentences"]),
                "corpus_sources": corpus.get("stats"), "ctc_vocabulary": len(vocab), "layers": args.layers,
                "parameters": sum(p.numel() for p in proj.parameters()), "torch_threads": torch.get_num_threads(),
                "last_valid_ter": state["valid"][-1] if state["valid"] else None}

    budget = args.minutes * 60
    last_save = time.time()
    order: list[int] = []
    last_refresh = state["step"]
    snapshot()  # step 0: the untrained adapter, when asked for
    while state["step"] < args.max_steps and state["train_seconds"] < budget:
        t_step = time.time()
        if refresh_due(state["step"], last_refresh):
            last_refresh = state["step"]
            if train.refresh():
                order = []
        if len(order) < 4 * args.batch:
            order = list(range(len(train)))
            rng.shuffle(order)
        pool = sorted((order.pop() for _ in range(4 * args.batch)), key=lambda i: train.items[i][2] - train.items[i][1])
        groups = [pool[i : i + args.batch] for i in range(0, len(pool), args.batch)]
        rng.shuffle(groups)
        for g in groups:
            progress = state["step"] / args.schedule_steps if args.schedule_steps else state["train_seconds"] / budget
            lr = cosine_lr(args.lr, state["step"], args.warmup, min(1.0, progress), args.min_lr_frac)
            for pg in opt.param_groups:
                pg["lr"] = lr
            loss = ctc_batch_loss(proj, vocab_emb, [train.items[i] for i in g], tok_targets)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
            opt.step()
            state["losses"].append(float(loss.detach()))
            state["step"] += 1
            state["utterances"] += len(g)
            snapshot()
            now = time.time()
            state["train_seconds"] += now - t_step
            t_step = now
            if state["step"] % 50 == 0:
                print(f"step {state['step']} loss {np.mean(state['losses'][-50:]):.3f} lr {lr:.2e} "
                      f"{state['train_seconds'] / 60:.1f} min, {len(train)} utts", flush=True)
            if state["step"] % args.eval_every == 0:
                ter = token_error_rate(proj, emb[torch.tensor(vocab)], valid, tok_targets)
                state["valid"].append({"step": state["step"], "minutes": round(state["train_seconds"] / 60, 2),
                                       "ter": round(ter, 4)})
                print(f"  valid TER {ter:.3f}", flush=True)
                t_step = time.time()
            if state["step"] >= args.max_steps:
                break
            if time.time() - last_save > args.save_minutes * 60:
                checkpoint()
                last_save = time.time()
                t_step = time.time()
    checkpoint()
    print(json.dumps(summary(), indent=1))


if __name__ == "__main__":
    main()
