"""Second training stage of the mini adapter: distillation through the frozen LLM (owns the stage-2 objective).

Stage 1 (:mod:`lmeval_speech.mini.train`) teaches the adapter to *transcribe* (CTC over SmolLM2's
vocabulary, no LLM pass); the LLM then reads posterior-weighted embeddings. Nothing in stage 1 asks
whether the LLM *understands* what it reads. Stage 2 does (behaviour alignment, as in BLSP):

* teacher: SmolLM2 reads ``Question: <sentence>\\nAnswer:`` as text and continues greedily for
  ``--k`` tokens (``generate``; its raw logits at each step are the teacher's distributions);
* student: the same prompt with the sentence *spoken* (a random training voice, like stage 1),
  passed through Whisper (frozen) -> adapter (trained) -> posterior-weighted embeddings -> SmolLM2
  (frozen), followed by the teacher's continuation;
* loss: KL(teacher || student) over the full vocabulary at the ``k`` continuation positions, plus
  ``--ctc-weight`` x the stage-1 CTC loss on the same utterance (keeps the adapter a recognizer).

The gradient reaches the adapter through the posteriors (the blank/merge selection is by argmax and
carries none). Speech is synthesized and encoded on the fly (~70 ms per utterance, against ~1 s for
the LLM's forward and backward). Sentences are stage 1's corpus minus any sharing an 8-gram with the
*development* set that chooses the posterior temperature (stage 1 already excludes MMLU test data and
the easy-question check); 64 sentences are held out in the evaluation voice to measure the KL.

    nice -n 10 python -m lmeval_speech.mini.distill --minutes 80        # add --resume to continue

Checkpoints are safetensors + JSON (never pickles), written atomically every ``--save-minutes``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .build import ADAPTER_FILE, build_mini, cache_root
from .train import (
    cosine_lr,
    load_checkpoint,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
)

PROMPT_TEXT = "Question: {q}\nAnswer:"  # as lmeval_speech.mini.evaluate's text twin
N_VALID = 64


def dev_ngrams() -> set:
    from .corpus import question_ngrams
    from .evaluate import DEV

    return question_ngrams(DEV)


def load_sentences(path: Path) -> list[str]:
    """Stage 1's corpus (``corpus.json`` of the feature folder, built if missing) minus dev 8-grams."""
    from .corpus import build_corpus, ngrams
    from lmeval_speech.fileio import atomic_write

    if path.exists():
        sentences = json.loads(path.read_text())["sentences"]
    else:
        sentences, stats = build_corpus()
        atomic_write(path, json.dumps({"sentences": sentences, "stats": stats}))
    bad = dev_ngrams()
    return [s for s in sentences if not (ngrams(s) & bad)]


QUESTION_FORMS = ("What is {d}?", "What do we call {d}?", "What is the word for {d}?")


def held_out_words() -> set[str]:
    """Every option (lower-cased, a leading "the " dropped) of the easy-question check and its development set."""
    from .evaluate import DEV, EASY, load_easy

    words = set()
    for path in (EASY, DEV):
        for row in load_easy(path):
            words |= {o.lower().removeprefix("the ").strip() for o in row["options"]}
    return words


def wordnet_questions(path: Path = Path("/usr/share/wordnet/data.noun")) -> list[str]:
    """Spoken-question training prompts from WordNet 3.0 noun definitions (Debian ``wordnet-base``):
    "What is a device that launches aircraft from a warship?" (the teacher answers from its own
    knowledge; no answer is given). Left out: a synset any of whose nouns is an option of the easy-question
    check or its development set (so the stage never sees those answers asked for), a definition sharing an 8-gram
    with an MMLU test question or either check (:func:`.corpus.contamination_ngrams` plus the
    development set's), and definitions with parentheses, non-ASCII or outside 4-16 words."""
    from .corpus import contamination_ngrams, ngrams

    if not path.exists():
        return []
    banned, bad = held_out_words(), contamination_ngrams() | dev_ngrams()
    out, rng = [], random.Random(0)
    for line in path.read_text(errors="ignore").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        lemmas = [fields[4 + 2 * i].replace("_", " ").lower() for i in range(int(fields[3], 16))]
        word = fields[4].replace("_", " ")
        definition = gloss.split(";")[0].strip()
        if "(" in definition or not definition.isascii() or not word.replace(" ", "").isalpha() \
                or not word.islower() or not 4 <= len(definition.split()) <= 16 or banned.intersection(lemmas):
            continue
        q = rng.choice(QUESTION_FORMS).format(d=definition)
        if not (ngrams(q) & bad):
            out.append(q)
    return out


class Distiller:
    """The frozen model, the trainable adapter, and one utterance -> (student inputs, teacher targets)."""

    def __init__(self, model, tokenizer, k: int):
        from transformers import WhisperFeatureExtractor

        self.model, self.tok, self.k = model, tokenizer, k
        self.proj = model.multi_modal_projector
        self.llm = model.language_model
        self.emb = model.get_input_embeddings().weight
        self.fe = WhisperFeatureExtractor(feature_size=model.config.audio_config.num_mel_bins)
        ids = tokenizer(PROMPT_TEXT.format(q="<|endoftext|>"), add_special_tokens=False)["input_ids"]
        at = ids.index(model.config.audio_token_id)
        self.before, self.after = ids[:at], ids[at + 1 :]
        self.vocab_index = {int(t): i for i, t in enumerate(self.proj.vocab_ids.tolist())}

    @torch.no_grad()
    def frames(self, audio: np.ndarray) -> torch.Tensor:
        from .features import cropped_mel

        return self.model.encode_frames(cropped_mel(audio, self.fe)[None])[0]

    @torch.no_grad()
    def teacher(self, sentences: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy continuations ``[B, k]`` and the teacher's raw logits there ``[B, k, V]``."""
        prompts = [PROMPT_TEXT.format(q=s) for s in sentences]
        self.tok.padding_side = "left"
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = self.llm.generate(**enc, max_new_tokens=self.k, min_new_tokens=self.k, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=self.tok.pad_token_id)
        cont = out.sequences[:, enc["input_ids"].shape[1] :]
        return cont, torch.stack(out.logits, 1).float()

    def ctc_targets(self, sentence: str) -> list[int]:
        return [self.vocab_index[t] for t in self.tok.encode(" " + sentence, add_special_tokens=False)
                if t in self.vocab_index]

    def student_logits(self, frames: list[torch.Tensor], cont: torch.Tensor, sentences: list[str],
                       ctc_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Student logits ``[B, k, V]`` at the continuation positions, and the mean CTC loss."""
        rows, ctc = [], []
        for f, s in zip(frames, sentences, strict=True):
            h = self.proj(f[None])[0]
            if ctc_weight:
                tgt = self.ctc_targets(s)
                logp = F.log_softmax(self.proj.ctc_logits(h, self.emb), -1)
                ctc.append(F.ctc_loss(logp[:, None], torch.tensor([tgt]), torch.tensor([h.shape[0]]),
                                      torch.tensor([len(tgt)]), blank=logp.shape[-1] - 1, zero_infinity=True))
            speech = self.proj.speech_embeddings(h, self.emb)
            rows.append(speech)
        emb = self.model.get_input_embeddings()
        seqs, ends = [], []
        for speech, c in zip(rows, cont, strict=True):
            pre = emb(torch.tensor(self.before))
            post = emb(torch.cat([torch.tensor(self.after), c[:-1]]))
            seqs.append(torch.cat([pre, speech.to(pre.dtype), post]))
            ends.append(len(self.before) + speech.shape[0] + len(self.after) - 1)  # predicts cont[0]
        n = max(s.shape[0] for s in seqs)
        x = torch.zeros(len(seqs), n, seqs[0].shape[1])
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        for i, s in enumerate(seqs):
            x[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = 1
        hidden = self.llm.model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        pos = torch.tensor(ends)[:, None] + torch.arange(self.k)[None]
        picked = hidden[torch.arange(len(seqs))[:, None], pos]
        ctc_loss = torch.stack(ctc).mean() if ctc else torch.zeros(())
        return self.llm.lm_head(picked).float(), ctc_loss


def answer_logp(logits: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """``[B]`` log-probability of each row's continuation tokens ``cont`` [B, k] under ``logits`` [B, k, V]."""
    return F.log_softmax(logits, -1).gather(-1, cont[..., None]).squeeze(-1).sum(-1)


def kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over rows and positions of KL(teacher || student), full vocabulary, temperature 1."""
    t = F.log_softmax(teacher, -1)
    return (t.exp() * (t - F.log_softmax(student, -1))).sum(-1).mean()


def main(argv=None):
    from transformers import AutoTokenizer

    from lmeval_speech.audio import TTSSpec
    from lmeval_speech.audio.tts import render

    from .features import EVAL_SPEC, RATES, VOICES
    from .modeling import MiniLSLMForConditionalGeneration

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=80.0, help="total budget (cosine schedule), across resumes")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", type=Path, default=ADAPTER_FILE, help="stage-1 adapter to start from")
    ap.add_argument("--corpus", type=Path, default=cache_root() / "ctc_features" / "corpus.json")
    ap.add_argument("--ckpt-dir", type=Path, default=cache_root() / "distill")
    ap.add_argument("--out", type=Path, default=None,
                    help="where adapter.safetensors + training.json go (default: CKPT_DIR/out; never the shipped "
                         "weights, which --init reads: copy them there after the development-set choice)")
    ap.add_argument("--train", choices=["residual", "all"], default="residual",
                    help="what stage 2 trains: the residual correction only (the recognizer stays stage 1's) or the whole adapter")
    ap.add_argument("--data", choices=["sentences", "qa", "mix"], default="mix",
                    help="what is spoken: stage 1's sentences, WordNet definition questions, or both")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=6, help="teacher continuation tokens distilled per utterance")
    ap.add_argument("--ctc-weight", type=float, default=0.2, help="with --train all: weight of the stage-1 CTC loss")
    ap.add_argument("--contrast", type=float, default=0.0,
                    help="weight of a contrastive term: softplus(log p(teacher's answer | another item's speech) - "
                         "log p(it | its own speech)), the negative being the next item of the batch")
    ap.add_argument("--valid", type=int, default=N_VALID, help="held-out prompts (evaluation voice) for the KL curve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-minutes", type=float, default=3.0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.out = args.out or args.ckpt_dir / "out"
    if args.out.resolve() == args.init.resolve().parent:
        raise SystemExit(f"--out {args.out} holds the --init adapter: stage 2 would overwrite what it starts from")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    path = build_mini(args.init)
    model = MiniLSLMForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.multi_modal_projector
    if proj.residual is None:  # zero at the start: stage 2 begins exactly where stage 1 ended
        proj.residual = torch.nn.Linear(proj.linear2.out_features, proj.linear2.out_features)
        torch.nn.init.zeros_(proj.residual.weight)
        torch.nn.init.zeros_(proj.residual.bias)
        model.config.ctc_residual = True
    trained = list(proj.residual.parameters()) if args.train == "residual" else list(proj.parameters())
    if args.train == "residual":
        args.ctc_weight = 0.0  # the CTC logits do not depend on the residual
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01)
    state = {"step": 0, "train_seconds": 0.0, "losses": [], "ctc": [], "valid": [], "utterances": 0,
             "init": str(args.init), "init_sha256": _sha(args.init)}
    rng = random.Random(args.seed)
    ckpt = load_checkpoint(args.ckpt_dir) if args.resume else None
    if ckpt is not None:
        state = restore_checkpoint(ckpt, proj, opt, rng)
    d = Distiller(model, tok, args.k)

    sentences = load_sentences(args.corpus) if args.data in ("sentences", "mix") else []
    questions = wordnet_questions() if args.data in ("qa", "mix") else []
    if args.data != "sentences" and not questions:
        raise SystemExit("--data qa/mix needs WordNet: apt-get install wordnet-base")
    valid_texts, train_texts = [], []
    for pool in (sentences, questions):
        if pool:
            pool = list(pool)
            random.Random(1234).shuffle(pool)
            k = args.valid // 2 if args.data == "mix" else args.valid
            valid_texts += pool[:k]
            train_texts += pool[k:]
    print(f"{len(train_texts)} training prompts ({len(sentences)} sentences, {len(questions)} WordNet questions), "
          f"{len(valid_texts)} held out", flush=True)
    valid_audio = [render(s, EVAL_SPEC) for s in valid_texts]

    @torch.no_grad()
    def validate() -> float:
        proj.eval()
        total = 0.0
        for i in range(0, len(valid_texts), args.batch):
            texts = valid_texts[i : i + args.batch]
            cont, t_logits = d.teacher(texts)
            s_logits, _ = d.student_logits([d.frames(a) for a in valid_audio[i : i + args.batch]], cont, texts, 0.0)
            total += float(kl(t_logits, s_logits)) * len(texts)
        proj.train(args.train == "all")
        return total / len(valid_texts)

    init_log = args.init.with_name("training.json")  # stage 1's log, kept beside stage 2's
    stage1 = json.loads(init_log.read_text()) if init_log.exists() else {}
    stage1.pop("stage2", None)

    def checkpoint():
        save_checkpoint(args.ckpt_dir, proj, opt, state, rng)
        stats = {**stage1, "stage2": {"recipe": "distillation through the frozen LLM (KL on teacher continuations) + CTC",
                            "steps": state["step"], "train_minutes": round(state["train_seconds"] / 60, 1),
                            "utterances_seen": state["utterances"], "batch": args.batch, "lr": args.lr, "k": args.k,
                            "ctc_weight": args.ctc_weight, "trained": args.train, "data": args.data, "contrast": args.contrast, "init": state["init"], "init_sha256": state["init_sha256"],
                            "training_prompts": len(train_texts), "torch_threads": torch.get_num_threads(),
                            "loss_curve_every10": [round(float(np.mean(state["losses"][i : i + 10])), 4)
                                                   for i in range(0, len(state["losses"]), 10)],
                            "valid_kl": state["valid"]}}
        save_adapter(proj, stats, args.out, temperature=proj.temperature)

    if not state["valid"]:
        v = validate()
        state["valid"].append({"step": 0, "minutes": 0.0, "kl": round(v, 4)})
        print(f"valid KL at start {v:.4f}", flush=True)
    proj.train(args.train == "all")  # the residual alone: the frozen recognizer without dropout
    budget = args.minutes * 60
    last_save = time.time()
    order: list[int] = []
    while state["step"] < args.max_steps and state["train_seconds"] < budget:
        t_step = time.time()
        texts, audio = [], []
        while len(texts) < args.batch:
            if not order:  # a new pass (utterances over 30 s or silent are skipped, so a batch may span two)
                order = list(range(len(train_texts)))
                rng.shuffle(order)
            s = train_texts[order.pop()]
            a = render(s, TTSSpec(engine="espeak-ng", voice=rng.choice(VOICES), rate=rng.choice(RATES)))
            if len(a) <= 30 * 16000 and np.abs(a).max() > 0:
                texts.append(s)
                audio.append(a)
        lr = cosine_lr(args.lr, state["step"], args.warmup, min(1.0, state["train_seconds"] / budget), args.min_lr_frac)
        for pg in opt.param_groups:
            pg["lr"] = lr
        cont, t_logits = d.teacher(texts)
        s_logits, ctc = d.student_logits([d.frames(a) for a in audio], cont, texts, args.ctc_weight)
        loss_kl = kl(t_logits, s_logits)
        loss = loss_kl + args.ctc_weight * ctc
        if args.contrast:  # the teacher's answer must be likelier after its own question than after the next one's
            s_other, _ = d.student_logits([d.frames(a) for a in audio[1:] + audio[:1]], cont, texts, 0.0)
            margin = answer_logp(s_logits, cont) - answer_logp(s_other, cont)
            loss = loss + args.contrast * F.softplus(-margin).mean()
            state.setdefault("margins", []).append(float(margin.mean().detach()))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj.parameters(), 1.0)
        opt.step()
        state["losses"].append(float(loss_kl.detach()))
        state["ctc"].append(float(ctc.detach()))
        state["step"] += 1
        state["utterances"] += len(texts)
        state["train_seconds"] += time.time() - t_step
        if state["step"] % 10 == 0:
            print(f"step {state['step']} KL {np.mean(state['losses'][-10:]):.4f} CTC {np.mean(state['ctc'][-10:]):.3f} "
                  f"margin {np.mean(state.get('margins', [0])[-10:]):.2f} "
                  f"lr {lr:.2e} {state['train_seconds'] / 60:.1f} min", flush=True)
        if state["step"] % args.eval_every == 0:
            v = validate()
            state["valid"].append({"step": state["step"], "minutes": round(state["train_seconds"] / 60, 2), "kl": round(v, 4)})
            print(f"  valid KL {v:.4f}", flush=True)
        if time.time() - last_save > args.save_minutes * 60:
            checkpoint()
            last_save = time.time()
    checkpoint()
    print(json.dumps({"steps": state["step"], "valid": state["valid"][-3:]}))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


if __name__ == "__main__":
    main()
