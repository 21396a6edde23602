"""Does the mini model hear the question? The checks of issue 13, for any adapter file.

* **Easy questions** (``tests/data/easy_questions.jsonl``, written for this check, not MMLU):
  cloze accuracy (``acc``: the option with the highest log-likelihood) with the question as text,
  spoken (espeak-ng en-us 160, passed as a plain audio array), and spoken *shuffled* (another
  item's audio: a fixed derangement). Paired bootstrap CI of speech - shuffled.
* **Demo items** (the README demo's items: the first ``DEMO_LIMIT`` ARC-Easy test questions, lm-eval's
  cloze prompt): the same three accuracies, and the *nats* measure: log p(right answer | its own spoken
  question) minus log p(right answer | another item's spoken question), mean and share > 0. (Until
  2026-12-06 the demo was 6 MMLU subjects; the JSON files in benchmarks/mini_hearing before that date
  hold those.)

    python -m lmeval_speech.mini.evaluate [--adapter FILE] [--demo-items 200] [--out result.json]

* **Choosing the posterior temperature** on a *development* set (``tests/data/easy_questions_dev.jsonl``,
  80 other easy questions written for this, never the two evaluation sets above): for each T, the
  same three-way check; the criterion, fixed before looking, is the mean nats measure (continuous,
  so less noisy than accuracy on 80 items):

    python -m lmeval_speech.mini.evaluate --select-temperature 0.35,0.5,0.7,1.0 --out dev.json \
        [--write-best lmeval_speech/mini/weights/adapter.safetensors]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

EASY = Path(__file__).resolve().parents[2] / "tests" / "data" / "easy_questions.jsonl"
DEV = EASY.with_name("easy_questions_dev.jsonl")
PROMPT_TEXT = "Question: {q}\nAnswer:"
PROMPT_SPEECH = "Question: <audio>\nAnswer:"


def load_easy(path: Path = EASY) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def derangement(n: int, groups: list[int] | None = None) -> list[int]:
    """Item i takes the audio of item i+1 (within its group, cyclically): nobody keeps its own."""
    groups = groups or [0] * n
    out = list(range(n))
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for idx in members.values():
        for k, i in enumerate(idx):
            out[i] = idx[(k + 1) % len(idx)]
    return out


def make_lm(adapter: Path | None):
    from lmeval_speech.models.lslm import LSLM

    if adapter is None:
        return LSLM(pretrained="mini", device="cpu", batch_size=8)
    from lmeval_speech.mini.build import build_mini

    return LSLM(pretrained=str(build_mini(Path(adapter))), device="cpu", batch_size=8)


def set_temperature(lm, t: float) -> None:
    lm.backend_impl.model.multi_modal_projector.temperature = float(t)
    lm.embeddings.clear()  # speech embeddings computed at the old temperature


def option_loglik(lm, items: list[dict], audio_of: list[str] | None) -> np.ndarray:
    """``[n, max options]`` log-likelihood of each option, ``-inf`` past an item's last option (ARC has
    items with 3 and 5); ``audio_of[i]`` is the text spoken for item i (None: text twin)."""
    from lm_eval.api.instance import Instance

    from lmeval_speech.audio import spoken

    reqs = []
    for i, it in enumerate(items):
        for opt in it["options"]:
            if audio_of is None:
                reqs.append(Instance("loglikelihood", {}, (PROMPT_TEXT.format(q=it["question"].strip()), " " + opt), 0))
            else:
                reqs.append(Instance("loglikelihood", {}, (PROMPT_SPEECH, " " + opt, {"audio": [spoken(audio_of[i])]}), 0))
    flat = iter([x for x, _ in lm.loglikelihood(reqs, disable_tqdm=True)])
    out = np.full((len(items), max(len(it["options"]) for it in items)), -np.inf)
    for i, it in enumerate(items):
        out[i, : len(it["options"])] = [next(flat) for _ in it["options"]]
    return out


def greedy_transcripts(lm, texts: list[str]) -> list[str] | None:
    """What the CTC adapter recognizes in each spoken text (greedy decoding), or None for an adapter
    without a transcript. The same audio as the speech twin (``spoken`` through the TTS cache)."""
    import torch

    from lmeval_speech.audio import spoken
    from lmeval_speech.audio.cache import resolve_audio
    from lmeval_speech.mini.modeling import MiniCTCProjector

    backend = lm.backend_impl
    if not isinstance(backend.model.multi_modal_projector, MiniCTCProjector):
        return None
    out = []
    with torch.no_grad():
        for text in texts:
            feats, mask = backend.mel_features([resolve_audio(spoken(text))[0]])
            out.append(backend.tokenizer.decode(backend.model.transcribe(feats, mask)[0]).strip())
    return out


def three_way(lm, items: list[dict], groups: list[int] | None = None) -> dict:
    """Text, speech and shuffled-audio accuracy, the nats measure, and two diagnostics that bound
    what hearing can add: ``text_minus_shuffled`` (speech - shuffled if the model heard perfectly,
    against the same control) and, for the CTC adapter, the greedy transcript read as text
    (``cascade_acc``; its word error rate ``transcript_wer``): recognition errors vs what the
    posterior-weighted embeddings lose."""
    from lmeval_speech.audio.asr import corpus_wer
    from lmeval_speech.metrics.gap import paired_gap

    answers = np.array([it["answer"] for it in items])
    perm = derangement(len(items), groups)
    ll_text = option_loglik(lm, items, None)
    ll_speech = option_loglik(lm, items, [it["question"] for it in items])
    ll_shuf = option_loglik(lm, items, [items[j]["question"] for j in perm])
    right = np.arange(len(items))
    text_c, speech_c, shuf_c = (ll.argmax(1) == answers for ll in (ll_text, ll_speech, ll_shuf))
    vs_shuffled = paired_gap(speech_c, shuf_c, n_boot=10000, seed=0)  # "gap" = speech - shuffled here
    ceiling = paired_gap(text_c, shuf_c, n_boot=10000, seed=0)
    nats = ll_speech[right, answers] - ll_shuf[right, answers]
    extra = {}
    if (heard := greedy_transcripts(lm, [it["question"] for it in items])) is not None:
        casc_c = option_loglik(lm, [{**it, "question": h} for it, h in zip(items, heard)], None).argmax(1) == answers
        extra = {"cascade_acc": float(casc_c.mean()),
                 "transcript_wer": corpus_wer([it["question"] for it in items], heard)}
    return {
        "n": len(items),
        "text_acc": float(text_c.mean()), "speech_acc": float(speech_c.mean()), "shuffled_acc": float(shuf_c.mean()),
        "speech_minus_shuffled": vs_shuffled["gap"],
        "speech_minus_shuffled_ci": [vs_shuffled["ci_low"], vs_shuffled["ci_high"]],
        "text_minus_shuffled": ceiling["gap"], "text_minus_shuffled_ci": [ceiling["ci_low"], ceiling["ci_high"]],
        **extra,
        "text_minus_speech": float(text_c.mean() - speech_c.mean()),
        "nats_own_minus_other_mean": float(nats.mean()), "nats_share_positive": float((nats > 0).mean()),
        "nats_ci": [float(x) for x in np.quantile(
            [np.random.default_rng(s).choice(nats, len(nats)).mean() for s in range(2000)], [0.025, 0.975])],
    }


def demo_items(n: int | None = None) -> tuple[list[dict], list[int]]:
    """The README demo's items (tasks/_generate.py: DEMO_PAIR's first DEMO_LIMIT test questions), one
    group: the shuffled audio is another demo item's."""
    from lmeval_speech.tasks import science_data
    from lmeval_speech.tasks._generate import DEMO_LIMIT, DEMO_PAIR, SCIENCE

    ds = science_data.load_split(SCIENCE[DEMO_PAIR], "test")
    rows = ds.select(range(min(n or DEMO_LIMIT, len(ds))))
    items = [{"question": r["question"].strip(), "options": list(r["choices"]["text"]),
              "answer": r["choices"]["label"].index(r["answerKey"])} for r in rows]
    return items, [0] * len(items)


def main(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", type=Path, default=None, help="adapter safetensors (default: the shipped one)")
    ap.add_argument("--demo-items", type=int, default=None, help="first N demo items (default: the demo's DEMO_LIMIT)")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="first N easy questions only (smoke test)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--temperature", type=float, default=None, help="override the CTC adapter's posterior temperature")
    ap.add_argument("--select-temperature", default=None, metavar="T1,T2,...",
                    help="run the check on the development set for each T and report the best (mean nats)")
    ap.add_argument("--write-best", type=Path, default=None, metavar="ADAPTER",
                    help="with --select-temperature: store the best T in this adapter file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    lm = make_lm(args.adapter)
    if args.select_temperature:
        res = {"adapter": str(args.adapter or "shipped"), "dev_set": DEV.name, "criterion": "nats_own_minus_other_mean",
               "by_temperature": {}}
        for t in [float(x) for x in args.select_temperature.split(",")]:
            set_temperature(lm, t)
            res["by_temperature"][str(t)] = r = three_way(lm, load_easy(DEV)[: args.limit])
            print(f"T={t}: " + json.dumps({k: r[k] for k in ("speech_acc", "shuffled_acc", "nats_own_minus_other_mean")}),
                  flush=True)
        res["best"] = max(res["by_temperature"], key=lambda t: res["by_temperature"][t][res["criterion"]])
        res["seconds"] = round(time.time() - t0, 1)
        print("best temperature:", res["best"])
        if args.write_best:
            from lmeval_speech.mini.build import set_adapter_temperature

            set_adapter_temperature(args.write_best, float(res["best"]))
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        return
    if args.temperature is not None:
        set_temperature(lm, args.temperature)
    res = {"adapter": str(args.adapter or "shipped"), "temperature": args.temperature, "easy": three_way(lm, load_easy()[: args.limit])}
    print(json.dumps(res["easy"], indent=1), flush=True)
    if not args.skip_demo:
        items, groups = demo_items(args.demo_items)
        res["demo"] = three_way(lm, items, groups)
        print(json.dumps(res["demo"], indent=1), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
