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

# General-knowledge items written for this test (not MMLU data).
ITEMS = [
    ("What is the capital city of France?", " Paris"),
    ("Which planet is known as the red planet?", " Mars"),
    ("What is the largest ocean on Earth?", " The Pacific Ocean"),
    ("Which animal is known as the king of the jungle?", " The lion"),
    ("What color is the sky on a clear day?", " Blue"),
    ("How many days are there in a week?", " Seven"),
    ("What do bees make?", " Honey"),
    ("Which gas do plants absorb from the air?", " Carbon dioxide"),
]


@pytest.fixture(scope="module")
def mini():
    from lmeval_speech.models.lslm import LSLM

    return LSLM(pretrained="mini", device="cpu", batch_size=8)


def score(lm, spoken: list[str], answers: list[str]) -> np.ndarray:
    from lmeval_speech.audio import spoken as ref

    reqs = [Instance("loglikelihood", {}, ("Question: <audio>\nAnswer:", a, {"audio": [ref(q)]}), 0)
            for q, a in zip(spoken, answers)]
    return np.array([ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)])


def test_answer_is_more_likely_after_its_own_spoken_question(mini):
    questions = [q for q, _ in ITEMS]
    answers = [a for _, a in ITEMS]
    own = score(mini, questions, answers)
    other = score(mini, questions[1:] + questions[:1], answers)  # each answer after another question
    diff = own - other
    assert (diff > 0).sum() >= 7, diff
    assert diff.mean() > 1.0, diff


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
         "--tasks", "speech_mmlu_continuation_demo", "--limit", "4", "--batch_size", "8", "--device", "cpu",
         "--log_samples", "--output_path", str(out)], capture_output=True, text=True, env=env, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    for cmd in (["report", str(out)], ["check", str(out), "--baseline", str(BASELINE), "--tolerance", "0.05"]):
        proc = subprocess.run([sys.executable, "-m", "lmeval_speech.cli", *cmd], capture_output=True, text=True,
                              env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gap_report" / "report.json").read_text())
    assert report["overall"]["n"] == 24 and report["alignment"]["n_items"] > 0
