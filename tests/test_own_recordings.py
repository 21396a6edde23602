"""A user's own recordings as a first-class pair (issue 33): the README's example run verbatim, failed
recordings never scored whatever the task's scoring, a missing WAV failing its item only, spans,
capture, APS and oracle interventions from a declared spoken text. Real ``lm_eval`` runs of the
embedded model on ``tests/data/myquiz``. Each test failed on the code before its fix."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MYQUIZ = ROOT / "tests" / "data" / "myquiz"


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "LMEVAL_SPEECH_CACHE": str(tmp_path / "audio_cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}


def _sh(cmd, cwd, tmp_path, ok=True):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(tmp_path), timeout=600,
                          shell=isinstance(cmd, str))
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _results(out):
    (path,) = glob.glob(str(out / "*" / "results_*.json"))
    return json.loads(Path(path).read_text())


def _samples(out, task):
    (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    return {r["doc_id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}


def _readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "lm_eval" in b]
    return block


@pytest.mark.slow
def test_readme_own_recordings_example_runs_verbatim(tmp_path):
    """The README's commands, unchanged, from a folder laid out as a clone (``tests/data`` linked):
    the report shows the gap, the layer similarity and APS of the user's pair."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "data").symlink_to(ROOT / "tests" / "data")
    _sh(_readme_block("Your own recordings"), tmp_path, tmp_path)
    rep = json.loads((tmp_path / "out" / "myquiz" / "report" / "report.json").read_text())
    row = rep["pairs"]["myquiz"]
    assert row["n"] == 5 and row["gap"] is not None
    assert rep["similarity"]["n_items"] == 5 and 0.0 < rep["similarity"]["S_cos"] <= 1.0
    assert rep["alignment"]["n_items"] == 5 and 0.5 < rep["alignment"]["aps"] <= 1.0
    assert not any("spoken text" in n for n in rep["notes"])


def _broken_quiz(tmp_path, extra_yaml: dict | None = None) -> Path:
    """myquiz with q1's WAV empty (0 bytes) and q5's WAV missing: both have gold 0, the choice
    ``argmax`` of NaNs picks."""
    inc = tmp_path / "tasks"
    inc.mkdir()
    rows = [json.loads(line) for line in (MYQUIZ / "questions.jsonl").read_text().splitlines()]
    (tmp_path / "empty.wav").write_bytes(b"")
    for r in rows:
        r["audio"] = str(ROOT / r["audio"])
    rows[0]["audio"], rows[4]["audio"] = str(tmp_path / "empty.wav"), str(tmp_path / "gone.wav")
    assert rows[0]["answer"] == 0 and rows[4]["answer"] == 0
    data = tmp_path / "quiz.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("myquiz_text.yaml", "myquiz_speech.yaml"):
        text = (MYQUIZ / name).read_text().replace("tests/data/myquiz/questions.jsonl", str(data))
        (inc / name).write_text(text)
    # the package's own process_results, with only the acc metric line (no audio_failed/audio_truncated)
    (inc / "myquizpr_speech.yaml").write_text(
        "task: myquizpr_speech\ninclude: myquiz_speech.yaml\n"
        "process_results: !function lmeval_speech.tasks.prompts.mmlu_continuation_results\n"
        "metric_list:\n- metric: acc\n  aggregation: mean\n  higher_is_better: true\n")
    return inc


@pytest.mark.slow
def test_failed_and_missing_recordings_are_never_scored_whatever_the_scoring(tmp_path):
    """lm-eval's default multiple-choice scoring (no flags in the YAML) and the package's
    ``process_results`` without flag metric lines: an empty and a missing WAV (both gold 0) fail their
    items only, get no accuracy in lm-eval's table, and are counted; capture finds the text twin's
    question tokens from ``metadata.spoken_text``, so the report has APS over the 3 valid items."""
    inc = _broken_quiz(tmp_path)
    out = tmp_path / "results"
    _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--model_args",
         f"capture=tokens,capture_dir={tmp_path / 'cap'}", "--include_path", str(inc),
         "--tasks", "myquiz_text,myquiz_speech,myquizpr_speech", "--device", "cpu",
         "--log_samples", "--output_path", str(out)], ROOT, tmp_path)
    res = _results(out)["results"]
    for task in ("myquiz_speech", "myquizpr_speech"):
        samples = _samples(out, task)
        assert "acc" not in samples[0] and "acc" not in samples[4], task
        assert "not" in samples[0]["audio_failed"] or "cannot" in samples[0]["audio_failed"]
        assert "gone.wav" in samples[4]["audio_failed"]
        scored = [samples[i]["acc"] for i in (1, 2, 3)]
        assert res[task]["acc,none"] == pytest.approx(sum(scored) / 3)
        assert res[task]["audio_failed,none"] == 2 and res[task]["audio_truncated,none"] == 0
    assert res["myquiz_speech"]["acc_norm,none"] == pytest.approx(
        sum(_samples(out, "myquiz_speech")[i]["acc_norm"] for i in (1, 2, 3)) / 3)
    _sh(["lmeval-speech", "report", str(out), "--out", str(tmp_path / "rep")], ROOT, tmp_path)
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    row = rep["pairs"]["myquiz"]
    assert row["n"] == 3 and row["excluded"]["audio_failed"] == 2
    assert rep["alignment"]["n_items"] == 3 and 0.5 < rep["alignment"]["aps"] <= 1.0


@pytest.mark.slow
def test_oracle_intervention_on_an_own_pair(tmp_path):
    """``intervention=angle`` (oracle) on a user's pair edits its speech twin from its text twin's states
    (it failed with ``KeyError ... (add myquiz_text to --tasks)`` with myquiz_text in the run)."""
    out = tmp_path / "results"
    _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--model_args", "intervention=angle",
         "--include_path", str(MYQUIZ), "--tasks", "myquiz_text,myquiz_speech", "--limit", "2",
         "--device", "cpu", "--log_samples", "--output_path", str(out)], ROOT, tmp_path)
    assert _results(out)["results"]["myquiz_speech"]["audio_failed,none"] == 0


def test_a_pair_without_spoken_text_is_named_precisely():
    from lmeval_speech import twins

    msg = twins.no_spoken_text("theirquiz_text")
    assert "theirquiz declares no spoken text" in msg and "metadata" in msg
    twins.declare("theirquiz2", spoken_text="Q: {{question}}")
    assert twins.text_counterpart("theirquiz2_text", {"question": "why? "}) == "Q: why?"
    assert twins.spoken_text("theirquiz2_speech", {"question": "why?"}) == "Q: why?"
    twins.declare("theirquiz3", spoken_text="transcript")
    with pytest.raises(KeyError, match="transcript"):
        twins.text_counterpart("theirquiz3_text", {"question": "why?"})
