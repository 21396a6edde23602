"""The embedded default model with its shipped adapter: it must actually *hear* the question.

A broken or untrained adapter gives speech embeddings the LLM cannot read; then the answer's
likelihood does not depend on which question was spoken. These tests assert that it does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lm_eval.api.instance import Instance

pytestmark = pytest.mark.slow
BASELINE = Path(__file__).parent / "baselines" / "mini_demo.json"
#: the README demo's tasks (scripts/demo.sh), on its first 24 items in the regression check
DEMO_TASKS = "speech_arc_easy,speech_arc_easy_shuffled"

N_ITEMS = 40


def demo_items():
    """(question, correct answer) of the README demo's first items (ARC-Easy test, evaluation data)."""
    from lmeval_speech.mini.evaluate import demo_items as items_of_the_demo

    items, _ = items_of_the_demo(N_ITEMS)
    return [(it["question"], " " + it["options"][it["answer"]]) for it in items]


@pytest.fixture(scope="module")
def mini():
    from lmeval_speech.models.lslm import LSLM

    return LSLM(pretrained="mini", device="cpu", batch_size=8)


def score(lm, audios: list[dict], answers: list[str]) -> np.ndarray:
    """Answer log-likelihoods after each audio ({"tts": text} is spoken by the default TTS)."""
    from lmeval_speech.audio import spoken

    items = [spoken(a["tts"]) if "tts" in a else a for a in audios]
    reqs = [Instance("loglikelihood", {}, ("Question: <audio>\nAnswer:", ans, {"audio": [item]}), 0)
            for item, ans in zip(items, answers)]
    return np.array([ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)])


def test_right_answer_is_more_likely_after_speech_than_after_noise(mini):
    """log p(right answer | the spoken question) vs | white noise of the same length, over 40
    evaluation items. A broken or untrained adapter turns any audio into embeddings the LLM cannot
    read, and the speech loses this comparison."""
    import numpy as np
    from scipy.stats import binomtest

    from lmeval_speech.audio import get_audio

    items = demo_items()
    answers = [a for _, a in items]
    speech = score(mini, [{"tts": q} for q, _ in items], answers)
    rng = np.random.default_rng(0)
    noise = score(mini, [{"array": (0.05 * rng.standard_normal(len(get_audio(q)))).astype(np.float32),
                          "sampling_rate": 16000} for q, _ in items], answers)
    diff = speech - noise
    assert diff.mean() > 0.5, diff
    assert binomtest(int((diff > 0).sum()), len(diff), alternative="greater").pvalue < 0.01, diff


def test_text_path_is_smollm2_unchanged(mini):
    """The mini model's text twin is SmolLM2-135M-Instruct itself (the audio token reuses id 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lmeval_speech.mini.build import smollm2_fp32_dir

    llm = AutoModelForCausalLM.from_pretrained(smollm2_fp32_dir(), dtype=torch.float32).eval()
    ids = mini.tok_encode("Question: What is the capital city of France?\nAnswer: Paris")
    with torch.no_grad():
        logp = torch.log_softmax(llm(torch.tensor([ids])).logits[0, :-1], -1)
    direct = float(logp[-1, ids[-1]])
    (ll, _), = mini.loglikelihood([Instance("loglikelihood", {}, (
        "Question: What is the capital city of France?\nAnswer:", " Paris"), 0)])
    assert abs(ll - direct) < 1e-4


def test_gap_metrics_do_not_regress_against_the_committed_baseline(tmp_path):
    """The project checks its own default model: a small fixed subset, `report`, then `check`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "run"
    run = subprocess.run(
        ["lm_eval", "--model", "lslm", "--model_args",
         f"pretrained=mini,capture=tokens,capture_dir={tmp_path / 'cap'}",
         "--tasks", DEMO_TASKS, "--limit", "24", "--batch_size", "8", "--device", "cpu",
         "--log_samples", "--output_path", str(out)], capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    for cmd in (["report", str(out)], ["check", str(out), "--baseline", str(BASELINE), "--tolerance", "0.05"]):
        proc = subprocess.run([sys.executable, "-m", "lmeval_speech.cli", *cmd], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gap_report" / "report.json").read_text())
    assert report["overall"]["n"] == 24 and report["alignment"]["n_items"] > 0
    assert report["controls"]["speech_arc_easy"]["shuffled"]["n"] == 24


# ---------------------------------------------------------------- issue 13: the model must hear the question
EASY_GOALS = {"speech_acc": 0.60, "speech_minus_shuffled": 0.25}


def test_easy_questions_are_heard(mini):
    """72 easy general-knowledge questions written for this check (``tests/data/easy_questions.jsonl``,
    cloze, 4 options, not MMLU): the question as text, spoken (espeak-ng en-us 160, as plain audio),
    and spoken with another item's audio (a fixed derangement). Issue 13's goals: speech accuracy
    >= 0.60 and speech - shuffled >= +0.25 with a paired bootstrap CI that excludes 0."""
    from lmeval_speech.mini.evaluate import load_easy, three_way

    items = load_easy()
    assert len(items) >= 60
    res = three_way(mini, items)
    # met by the shipped adapter (2026-12-02, 12,314 steps, T = 0.7: +0.264, CI [+0.17, +0.38], one item above the
    # line; +5.2 nats; the 10,257-step adapter had +0.250 exactly)
    assert res["speech_minus_shuffled_ci"][0] > 0, res
    assert res["speech_minus_shuffled"] >= EASY_GOALS["speech_minus_shuffled"], res
    assert res["nats_own_minus_other_mean"] >= 1.0, res
    # diagnostics (2026-12-02): text 0.653 bounds speech (text - shuffled +0.361); the greedy transcript
    # (WER 0.123) read as text scores 0.569, the LLM reading the posteriors 0.556
    assert res["transcript_wer"] < 0.2 and res["cascade_acc"] <= res["text_acc"] + 0.05, res
    assert res["text_minus_shuffled"] >= res["speech_minus_shuffled"] - 0.05, res
    # not met yet (measured 0.556): reported as an expected failure, never as a pass
    if res["speech_acc"] < EASY_GOALS["speech_acc"]:
        pytest.xfail(f"issue 13 goals not met yet: speech {res['speech_acc']:.3f} (goal >= 0.60), speech - shuffled "
                     f"{res['speech_minus_shuffled']:+.3f} (goal >= +0.25)")


def test_demo_questions_are_heard(mini):
    """The README demo's items (the first 200 ARC-Easy test questions): speech accuracy above its
    shuffled-audio control with a paired bootstrap CI excluding 0 (issue 27), and the right answer more
    likely after its own spoken question than after another demo item's by >= 1 nat on average, for
    >= 75% of items (issue 13's demo goals, moved here from the MMLU demo)."""
    from lmeval_speech.mini.evaluate import demo_items, three_way

    items, groups = demo_items()
    assert len(items) == 200
    res = three_way(mini, items, groups)
    assert res["text_acc"] >= 0.45 and res["text_minus_shuffled_ci"][0] > 0, res  # the text twin can lose something
    assert res["nats_own_minus_other_mean"] >= 1.0, res
    if res["speech_minus_shuffled_ci"][0] <= 0 or res["nats_share_positive"] < 0.75:
        pytest.xfail(f"demo hearing goals not met: speech - shuffled {res['speech_minus_shuffled']:+.3f}, CI "
                     f"{res['speech_minus_shuffled_ci']}, {res['nats_share_positive']:.0%} of items with own > other "
                     "(goal 75%)")


def test_processor_and_forward_use_the_content_dependent_token_count():
    """The CTC adapter drops blank frames, so a clip's speech-token count is its encoded length: the
    processor's placeholders, encode_audio and the model's own forward must agree."""
    import torch

    from lmeval_speech.audio import get_audio
    from lmeval_speech.mini.backend import MiniBackend
    from lmeval_speech.mini.build import load_mini_backend

    assert MiniBackend.content_dependent_audio_tokens
    b = load_mini_backend()
    audio = get_audio("What is the capital city of France?")
    inputs = b.processor("Question: <|endoftext|>\nAnswer: Paris", audio=[audio])
    n = int((inputs["input_ids"] == b.audio_token_id).sum())
    assert n == b.encode_audio([audio])[0].shape[0] <= b.num_audio_tokens(len(audio))
    with torch.no_grad():
        assert b.model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
