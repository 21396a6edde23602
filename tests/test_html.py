"""report.html (the item browser) and leaderboard.html: records, clips, and the page in a real browser.

The run is test_report's synthetic lm-eval layout, named as the ARC pair so its speech twin's audio is
rebuilt (espeak-ng, into a private cache): per-option log-likelihoods are set so the loss of the gold
option is known (text -1, speech -3: 2.0 nats), and one speech item failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from test_report import STAMP, run_report, write_run, write_samples

from lmeval_speech.report import clips
from lmeval_speech.report.html import attach_audio, choose_clips, item_records
from lmeval_speech.runs import load_run

PAIR = "speech_arc_easy"
TEXT = [1, 1, 1, 1, 0, 1, 0, 1]
SPEECH = [1, 0, 1, 1, 1, 0, 0, 0]  # doc 3 fails below; speech-only errors: 1, 5, 7
SPEECH_ONLY, FAILED, TRUNCATED = {1, 5, 7}, 3, 6  # doc 6 (both wrong) was cut: out of the gap
QUESTIONS = ["Which gas do plants take in?", "What is x if x = -4?", "Why is the sky blue?", "Name a mammal.",
             "What melts ice?", "How many legs has a spider?", "What is the boiling point of water?",
             "Which planet is red?"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "audio-cache"))


def make_run(out):
    rows = write_run(out, "pretrained=mini", correct={PAIR: (TEXT, SPEECH)})
    for task, task_rows in rows.items():
        for r in task_rows:
            r["doc"]["question"] = QUESTIONS[r["doc_id"]]
            if task.endswith("_text"):
                for a in r["arguments"].values():
                    a["arg_0"] = f"Question: {QUESTIONS[r['doc_id']]}\nAnswer:"
            gold_ll = -1.0 if task.endswith("_text") else -3.0
            r["resps"] = [[[str(gold_ll if i == r["doc_id"] % 4 else -5.0 - i), "False"]] for i in range(4)]
            if task.endswith("_speech") and r["doc_id"] == FAILED:
                del r["acc"], r["acc_norm"]
                r["metrics"] = ["audio_failed"]
                r["audio_failed"] = "AudioError: espeak-ng said nothing"
            if task.endswith("_speech") and r["doc_id"] == TRUNCATED:
                r["metrics"] = [*r["metrics"], "audio_truncated"]
                r["audio_truncated"] = "truncated 31.2s -> 30.0s"
        write_samples(out / "lslm__mini" / f"samples_{task}_{STAMP}.jsonl", task_rows)
    # the cascade twin: the speech twin's audio transcribed by an ASR, read as text (its transcript and WER logged)
    task = f"{PAIR}_cascade"
    cascade = []
    for r in rows[f"{PAIR}_text"]:
        c = json.loads(json.dumps(r))
        c.update(metrics=["acc", "acc_norm", "asr_transcript", "asr_wer"], asr_transcript=f"heard {r['doc_id']}",
                 asr_wer=r["doc_id"] / 10)
        cascade.append(c)
    write_samples(out / "lslm__mini" / f"samples_{task}_{STAMP}.jsonl", cascade)
    results_file = out / "lslm__mini" / f"results_{STAMP}.json"
    results = json.loads(results_file.read_text())
    results["configs"][task] = {**results["configs"][f"{PAIR}_speech"], "task": task,
                                "metadata": {**results["configs"][f"{PAIR}_speech"]["metadata"], "modality": "cascade"}}
    results_file.write_text(json.dumps(results))
    return out


def test_item_records_hold_every_item_with_its_twins_and_reasons(tmp_path):
    from lmeval_speech.report.compute import build_report

    run = load_run(make_run(tmp_path / "run"))
    report, _ = build_report(run, n_boot=50)
    recs = {r["doc"]: r for r in item_records(run, report)}
    assert sorted(recs) == list(range(8))  # the failed item too, not only the gap's 7
    assert {d for d, r in recs.items() if r["cat"] == "speech_only"} == SPEECH_ONLY
    assert recs[FAILED]["cat"] == "failed" and "espeak-ng said nothing" in recs[FAILED]["reason"]
    assert recs[FAILED]["twins"]["speech"]["choice"] is not None  # its logged values are still shown
    assert recs[TRUNCATED]["cat"] == "truncated" and recs[TRUNCATED]["reason"] == "speech: truncated 31.2s -> 30.0s"
    r = recs[5]
    assert r["gold"] == 1 and r["options"] == [" w", " x", " y", " z"]
    assert r["twins"]["text"]["ll"] == [-5.0, -1.0, -7.0, -8.0] and r["twins"]["text"]["choice"] == 1
    assert r["twins"]["speech"]["correct"] is False and r["twins"]["text"]["correct"] is True
    assert r["dll"] == pytest.approx(2.0)  # text ll of gold - speech ll of gold
    assert r["twins"]["cascade"]["transcript"] == "heard 5" and r["twins"]["cascade"]["wer"] == 0.5
    assert r["prompt"] == f"Question: {QUESTIONS[5]}\nAnswer:" and r["spoken"] is None  # held once, as a span:
    assert r["prompt"][slice(*r["spoken_at"])] == QUESTIONS[5]
    # clips: every speech-only error first, then the failed item, then a seeded sample, capped
    chosen = choose_clips(list(recs.values()), 4)
    assert len(chosen) == 4 and {f"{PAIR}:{d}" for d in SPEECH_ONLY | {FAILED}} == chosen
    assert choose_clips(list(recs.values()), 2) <= {f"{PAIR}:{d}" for d in SPEECH_ONLY}
    # no clips asked for: each item names its cache file, and shows what the engine said where it differs
    counts = attach_audio(list(recs.values()), run, tmp_path / "page", max_clips=0)
    assert counts["written"] == 0 and not (tmp_path / "page" / "audio").exists()
    assert all(r["audio"] is None and "audio-cache" in r["audio_cache"] for r in recs.values())
    assert recs[0]["spoken_form"] is None  # nothing to rewrite
    assert "4" in recs[1]["spoken_form"] and "-4" not in recs[1]["spoken_form"]  # x = -4: the minus spoken


def test_clip_is_what_the_resolver_loads_and_flac_is_lossless(tmp_path):
    """The page's samples equal the run's loader's (after truncation, under settings read back from the
    results file's record) and survive FLAC exactly."""
    from lmeval_speech.audio.resolver import AudioResolver, AudioSettings

    pytest.importorskip("soundfile")
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng not installed (bash scripts/install.sh)")
    item = {"tts_text": QUESTIONS[6], "tts": {"engine": "espeak-ng", "voice": "en-us", "rate": 160, "sample_rate": 16000}}
    settings = AudioSettings(max_audio_seconds=0.75)
    expected, _ = AudioResolver(settings).load(item)
    got, notes = clips.heard(item, json.loads(json.dumps(settings.to_record())))
    assert len(got) == 12000 and np.array_equal(got, expected)
    assert any(n.startswith("truncated") for n in notes)
    info = clips.write_flac(tmp_path / "a.flac", got)
    back, rate = sf.read(tmp_path / "a.flac", dtype="float32")
    assert rate == 16000 and info["samples"] == 12000 and np.array_equal(back, got)
    full, _ = clips.heard(item, {})
    assert len(full) > 12000  # no limit recorded: the whole clip


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["white", "babble"])
def test_a_noisy_runs_clip_is_the_samples_its_model_encoded(tiny_qwen2_audio_dir, kind):
    """The clip rebuilt from a noisy run's recorded settings equals, sample for sample, what the run's
    model received in its encoder (spied on), and differs from the clean clip."""
    from lmeval_speech.models.lslm import LSLM
    from test_audio_inputs import req

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng not installed (bash scripts/install.sh)")
    item = {"tts_text": QUESTIONS[1], "tts": {"engine": "espeak-ng", "voice": "en-us", "rate": 160, "sample_rate": 16000}}
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", noise=kind, snr_db=5, noise_seed=3, max_audio_seconds=2)
    encoded, encode = [], lm.backend_impl.encode
    lm.backend_impl.encode = lambda arrays: encoded.extend(np.array(a) for a in arrays) or encode(arrays)
    lm.loglikelihood([req("<audio> Q:", [item])])
    settings = json.loads(json.dumps(lm.get_model_info()["lmeval_speech"]["settings"]))
    got, notes = clips.heard(item, settings)
    clean, _ = clips.heard(item, {"max_audio_seconds": 2})
    assert len(encoded) == 1 and np.array_equal(got, encoded[0]) and not np.array_equal(got, clean)
    assert any(f"{kind} noise at 5.0 dB" in n for n in notes) and any(n.startswith("truncated") for n in notes)


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: scripts/install.sh installs it")
        pytest.skip("chromium not installed (bash scripts/install.sh installs it from Debian)")
    return exe


def dump_dom(exe, page, fragment="") -> str:
    """The DOM after the page's scripts ran (and its media loaded), network blocked."""
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--mute-audio", "--virtual-time-budget=8000",
           "--host-resolver-rules=MAP * ~NOTFOUND", "--dump-dom", page.as_uri() + fragment]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    return dom[:dom.index('<script id="data"')]  # the rendered body, not the page's own code and data


@pytest.mark.slow
def test_report_html_in_a_real_browser_from_a_copied_folder(tmp_path):
    exe = _chromium()
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng not installed (bash scripts/install.sh)")
    make_run(tmp_path / "run")
    assert run_report(tmp_path / "run", "--out", tmp_path / "rep", "--n-boot", 50, "--html-clips", 4) == 0
    copy = shutil.copytree(tmp_path / "rep", tmp_path / "elsewhere" / "copied")  # no absolute path may leak
    shutil.rmtree(tmp_path / "rep")
    flacs = sorted(p.name for p in (copy / "audio").glob("*.flac"))
    assert flacs == sorted(f"{PAIR}_{d}.flac" for d in SPEECH_ONLY | {FAILED})  # the cap: 4 clips
    page = copy / "report.html"

    dom = dump_dom(exe, page)
    assert 'data-ready="1"' in dom and set(re.findall(r'data-id="([^"]+)"', dom)) == {f"{PAIR}:{d}" for d in range(8)}
    dom = dump_dom(exe, page, f"#filter=speech_only&open={PAIR}:5")
    assert set(re.findall(r'data-id="([^"]+)"', dom)) == {f"{PAIR}:{d}" for d in SPEECH_ONLY}
    audio = re.findall(r"<audio[^>]*>", dom)
    assert len(audio) == 3 and all("data-error" not in a for a in audio)
    for tag in audio:  # each source decoded: the browser's duration is the clip's
        src = re.search(r'src="([^"]+)"', tag).group(1)
        duration = float(re.search(r'data-duration="([^"]+)"', tag).group(1))
        assert duration == pytest.approx(sf.info(copy / src).duration, abs=1e-3)
    assert f"<mark title=\"the part the speech twin hears as audio\">{QUESTIONS[5]}</mark>" in dom
    assert "<b>Cascade transcript</b> (WER 0.500)<pre>heard 5</pre>" in dom
    dom = dump_dom(exe, page, "#filter=failed")
    assert re.findall(r'data-id="([^"]+)"', dom) == [f"{PAIR}:{FAILED}", f"{PAIR}:{TRUNCATED}"]
    assert "espeak-ng said nothing" in dom and "truncated 31.2s -&gt; 30.0s" in dom


def test_leaderboard_html_lists_runs_and_flags(tmp_path):
    from lmeval_speech.report import compare

    for name, tts in (("a", ""), ("b", ",tts_rate=120")):
        make_run(tmp_path / name)
        text = (tmp_path / name / "lslm__mini" / f"results_{STAMP}.json").read_text()
        res = json.loads(text)
        res["config"]["model_args"] = "pretrained=mini" + tts
        (tmp_path / name / "lslm__mini" / f"results_{STAMP}.json").write_text(json.dumps(res))
    import argparse

    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "lb"),
                              "--allow-mismatch", "--html", "--labels", "rate160,rate120"])
    assert compare.main(args) == 0
    page = (tmp_path / "lb" / "leaderboard.html").read_text()
    body = page[page.index('<table class="num sortable" id="runs">'):page.index('id="pairs"')]
    assert body.count("<tr") == 3 and "rate160" in body and "rate120" in body
    assert body.count('class="flagged"') == 1 and "tts" in page  # the re-voiced run is flagged, its aspect listed
    if shutil.which("chromium") or os.environ.get("CI"):  # the sort, in a real browser
        exe = _chromium()
        for frag, order in (("#sort=label", ["rate120", "rate160"]), ("#sort=-label", ["rate160", "rate120"])):
            cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=3000", "--dump-dom",
                   (tmp_path / "lb" / "leaderboard.html").as_uri() + frag]
            dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
            runs = dom[dom.index('id="runs"'):dom.index('id="pairs"')]
            assert 'data-ready="1"' in dom and re.findall(r"<tr[^>]*><td>(rate\d+)</td>", runs) == order


def test_each_items_bottom3_is_the_critical_tokens_of_its_deepest_layer(tmp_path):
    """The per-item Bottom-3 the browser shows equals what the single-item detail (--item) computes."""
    from test_report import write_capture

    write_capture(tmp_path / "cap")
    write_run(tmp_path / "run", f"pretrained=mini,capture_dir={tmp_path / 'cap'}")
    assert run_report(tmp_path / "run", "--out", tmp_path / "rep", "--n-boot", 50, "--item", "speech_toy_a:5",
                      "--no-html") == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert not (tmp_path / "rep" / "report.html").exists()
    deepest = rep["alignment"]["item"]["critical_tokens"][-1]
    row = next(r for r in rep["items"] if r["pair"] == "speech_toy_a" and r["doc_id"] == 5)
    assert row["bottom3"] == deepest["positions"] and row["bottom3_layer"] == deepest["layer"] == 4
    assert row["bottom3"] != [0, 1, 2] and row["n_speech"] == 5  # random states: not the tie order
    worst = [r for r in rep["items"] if r["pair"] == "speech_toy_a" and r["doc_id"] >= 6]
    assert all(r["bottom3"] == [0, 1, 2] and r["n_speech"] == 6 for r in worst)  # equal scores: lowest positions
    assert all(r.get("bottom3") is None for r in rep["items"] if r["pair"] == "speech_toy_b")  # pooled only


def test_a_clip_whose_length_differs_from_the_capture_says_so(tmp_path):
    from lmeval_speech.report.compute import build_report

    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng not installed (bash scripts/install.sh)")
    run = load_run(make_run(tmp_path / "run"))
    report, _ = build_report(run, n_boot=50)
    recs = item_records(run, report)
    counts = attach_audio(recs, run, tmp_path / "page", max_clips=2, captured={(PAIR, 1): 99.0, (PAIR, 2): 1.0})
    assert counts["checked_against_capture"] == 1 and counts["differ_from_capture"] == 1  # doc 2 has no clip
    one = next(r for r in recs if r["doc"] == 1)
    assert "NOT the model's length" in one["audio"]["notes"][-1]
    recs = item_records(run, report)
    counts = attach_audio(recs, run, tmp_path / "page", max_clips=2, captured={(PAIR, 1): one["audio"]["seconds"]})
    assert counts["differ_from_capture"] == 0 and not any("NOT" in n for r in recs if r["audio"] for n in r["audio"]["notes"])
