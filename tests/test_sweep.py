"""Perturbation sweeps (issue 15, part): seeded noise at an exact SNR, and one run per condition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tone
from lmeval_speech.audio.noise import NoiseSpec, mix, snr_db


@pytest.mark.parametrize("kind", ["white", "babble"])
@pytest.mark.parametrize("target", [20.0, 10.0, 0.0, -5.0])
def test_noise_is_mixed_at_the_requested_snr_and_deterministic(kind, target):
    clean = tone(2.0, seed=1)
    others = [tone(1.3, freq=150 + 40 * i, seed=10 + i) for i in range(6)]
    spec = NoiseSpec(kind, target, seed=3)
    mixed = mix(clean, spec, "item-1", others)
    assert abs(snr_db(clean, mixed) - target) < 0.1
    np.testing.assert_array_equal(mixed, mix(clean, spec, "item-1", others))  # same spec, same samples
    assert not np.array_equal(mixed, mix(clean, NoiseSpec(kind, target, seed=4), "item-1", others))
    assert not np.array_equal(mixed, mix(clean, spec, "item-2", others))  # each item its own noise


def test_babble_noise_of_an_item_does_not_depend_on_the_rest_of_the_run(tiny_qwen2_audio_dir, tmp_path, monkeypatch):
    """Babble was made of the run's other TTS items: --limit or another task selection changed the
    noise an item heard at the same seed and SNR (and the manifest named no pool). It is now a fixed
    set of sentences in the item's voice: the same item, spec and seed give the same samples."""
    from lmeval_speech.audio import spoken
    from lmeval_speech.models.lslm import LSLM
    from lmeval_speech.models.plan import audio_key

    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "tts"))
    tts = {"engine": "espeak-ng", "voice": "en-us", "rate": 160}
    item = spoken("Which river flows through Paris?", **tts)
    run_a = [spoken(q, **tts) for q in ("Who wrote Hamlet?", "What is two plus two?")]
    run_b = [spoken(q, **tts) for q in ("Name a prime number.", "Where is Kenya?", "What is water made of?")]
    heard = []
    for others in (run_a, run_b):
        lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", noise="babble", snr_db=0)
        lm.audio.resolve({audio_key(it): it for it in [item, *others]})
        heard.append(lm.audio.load(item)[0])
    np.testing.assert_array_equal(heard[0], heard[1])
    clean = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu").audio.load(item)[0]
    assert abs(snr_db(clean, heard[0]) - 0.0) < 0.1


def test_noise_needs_an_snr_and_a_known_kind(tiny_qwen2_audio_dir):
    from lmeval_speech.models.lslm import LSLM

    with pytest.raises(ValueError, match="snr_db"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", noise="white")
    with pytest.raises(ValueError, match="noise must be one of"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", noise="pink", snr_db=10)
    with pytest.raises(ValueError, match="no slower than 80"):  # espeak-ng would speak it at 80
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", tts_engine="espeak-ng", tts_rate=60)


@pytest.mark.slow
def test_sweep_runs_each_condition_and_records_the_noise(tiny_qwen2_audio_dir, tmp_path):
    task = "speech_mmlu_continuation_high_school_geography"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMEVAL_SPEECH_CACHE": str(tmp_path / "tts")}
    cmd = [sys.executable, "-m", "lmeval_speech.cli", "sweep", "--tasks", task, "--rates", "130,200",
           "--snr", "none,5", "--noise", "babble", "--out", str(tmp_path / "sw"), "--n-boot", "200", "--",
           "--model_args", f"pretrained={tiny_qwen2_audio_dir}", "--limit", "3", "--device", "cpu", "--batch_size", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [(r["rate"], r["snr_db"]) for r in sweep["runs"]] == [(130, None), (130, 5.0), (200, None), (200, 5.0)]
    assert all(r["n"] == 3 for r in sweep["runs"]) and (tmp_path / "sw" / "sweep.png").stat().st_size > 1000
    from lmeval_speech.manifest import load_manifest

    noisy = load_manifest(tmp_path / "sw" / "voice-task_rate-200_babble-snr5")
    assert noisy["settings"]["noise"] == {"kind": "babble", "snr_db": 5.0, "seed": 0}
    assert noisy["tasks"][f"{task}_speech"]["audio"]["tts"]["rate"] == 200
    # a rerun reuses every finished condition
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stderr.count("already run") == 4


def test_sweep_plot_draws_every_condition_with_its_ci():
    """Each condition is its own point with its own interval (the gap's paired-bootstrap CI, speech
    accuracy's Wilson interval); the old plot averaged over the other axes and drew no interval, so
    noise looked like a trend."""
    from matplotlib.container import ErrorbarContainer
    from scipy.stats import binomtest

    from lmeval_speech.report.plots import sweep_figure

    rows = [{"condition": f"r{rate}_{snr}", "voice": None, "rate": rate, "snr_db": snr, "n": 60,
             "speech_acc": acc, "text_acc": 0.4, "gap": 0.4 - acc, "ci_low": 0.4 - acc - lo, "ci_high": 0.4 - acc + hi,
             "S_cos": None, "aps": None}
            for rate, snr, acc, lo, hi in [(130, None, 0.35, 0.11, 0.10), (130, 10.0, 0.30, 0.09, 0.12),
                                           (200, None, 0.25, 0.08, 0.07), (200, 10.0, 0.40, 0.10, 0.10)]]
    fig = sweep_figure(rows)
    grid = fig.axes
    assert len(grid) == 4  # 2 axes (rate, snr) x 2 measures (speech_acc, gap): S_cos/APS were not captured
    rate_gap = grid[1]
    assert rate_gap.get_title().startswith("gap")
    containers = [c for c in rate_gap.containers if isinstance(c, ErrorbarContainer)]
    assert len(containers) == 2  # one series per SNR, never their mean
    for container, snr in zip(containers, (None, 10.0)):
        members = [r for r in rows if r["snr_db"] == snr]
        line, _, (bars,) = container.lines
        np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), [r["gap"] for r in members])
        extents = [(seg[0][1], seg[1][1]) for seg in bars.get_segments()]
        np.testing.assert_allclose(extents, [(r["ci_low"], r["ci_high"]) for r in members])
    # series k has colour C{k} in every panel (the legend is drawn in the first panel only), even when
    # a panel lacks a series: here the snr=clean conditions have no APS
    from matplotlib.colors import same_color

    rows_aps = [{**r, "aps": None if r["snr_db"] is None else 0.5} for r in rows]
    fig2 = sweep_figure(rows_aps)
    aps_rate = [ax for ax in fig2.axes if ax.get_title().startswith("APS")][0]
    (only,) = [c for c in aps_rate.containers if isinstance(c, ErrorbarContainer)]
    assert same_color(only.lines[0].get_color(), "C1")  # the snr=10 series, C1 as in the legend
    acc = [c for c in grid[0].containers if isinstance(c, ErrorbarContainer)][0]
    (bars,) = acc.lines[2]
    ci = binomtest(21, 60).proportion_ci(method="wilson")  # 0.35 of 60
    np.testing.assert_allclose(bars.get_segments()[0][:, 1], [ci.low, ci.high])


def test_each_condition_gets_its_own_capture_dir_and_use_cache():
    """Both are keyed by item only: shared by all conditions, the second condition would read the
    first one's states (and, from ``--use_cache``, its scores)."""
    from lmeval_speech.sweep import conditions, lm_eval_command

    passthrough = ["--", "--model_args", "pretrained=mini,capture=pooled,capture_dir=cap", "--use_cache", "lc/db"]
    cmds = [lm_eval_command(passthrough, "t", c, "white", 0, Path("out")) for c in conditions(["en-us"], [None], ["none", "10"])]
    dirs = [c[c.index("--model_args") + 1] for c in cmds]
    assert dirs == ["pretrained=mini,capture=pooled,capture_dir=cap/voice-en-us_rate-task_clean,tts_voice=en-us",
                    "pretrained=mini,capture=pooled,capture_dir=cap/voice-en-us_rate-task_white-snr10,tts_voice=en-us,"
                    "noise=white,snr_db=10,noise_seed=0"]
    assert [c[c.index("--use_cache") + 1] for c in cmds] == ["lc/db_voice-en-us_rate-task_clean",
                                                           "lc/db_voice-en-us_rate-task_white-snr10"]
    for spelled in (["--use_cache=lc/db"], ["-c", "lc/db"]):  # lm-eval's other spellings of the flag
        cmd = lm_eval_command(["--", *spelled], "t", conditions([None], ["130"], ["none"])[0], "white", 0, Path("o"))
        assert "lc/db_voice-task_rate-130_clean" in " ".join(cmd) and "lc/db " not in " ".join(cmd) + " "


@pytest.mark.slow
def test_sweep_refuses_to_reuse_a_run_of_other_settings(tiny_qwen2_audio_dir, tmp_path):
    """A condition whose folder held any results file was reused: a rerun with another model, --limit,
    seed or task set reported the old run's numbers as the new sweep's, exit 0. The run's recorded config
    is now compared with the request (read by lm-eval's own parser), and a difference stops the sweep
    before anything runs or is written. The same request (here with a relative capture_dir, read from the
    folder the sweep runs in, and the group's tasks named one by one) still reuses the run."""
    task = "speech_mmlu_continuation_high_school_geography"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMEVAL_SPEECH_CACHE": str(tmp_path / "tts")}
    model_args = f"pretrained={tiny_qwen2_audio_dir},capture=pooled,capture_dir=cap"
    rest = ["--limit", "2", "--device", "cpu", "--batch_size", "8"]

    def sweep(*lm_eval_args, tasks=task, model_args=model_args):
        cmd = [sys.executable, "-m", "lmeval_speech.cli", "sweep", "--tasks", tasks, "--out", "sw", "--n-boot", "100",
               "--", "--model_args", model_args, *lm_eval_args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path, check=False)

    first = sweep(*rest)
    assert first.returncode == 0, first.stderr[-3000:]
    (row,) = json.loads((tmp_path / "sw" / "sweep.json").read_text())["runs"]
    assert row["n"] == 2 and row["S_cos"] is not None  # the run's own capture, matched
    again = sweep(*rest, tasks=f"{task}_speech,{task}_text")  # the group's tasks, named one by one
    assert again.returncode == 0 and "already run" in again.stderr, again.stderr[-3000:]
    results = sorted((tmp_path / "sw").rglob("results_*.json"))
    written = (tmp_path / "sw" / "sweep.json").read_text()
    for changed, named in [
        ({"model_args": f"pretrained={tmp_path / 'other_model'}"}, "model_args: {'pretrained': "),
        ({"rest": ["--limit", "3", *rest[2:]]}, "limit: 2.0 in the run, 3.0 requested"),
        ({"rest": [*rest, "--seed", "7"]}, "random_seed: 0 in the run, 7 requested"),
        ({"tasks": f"{task},{task}_shuffled"}, f"'{task}_shuffled', '{task}_speech', '{task}_text'] requested"),
    ]:
        proc = sweep(*changed.get("rest", rest), **{k: v for k, v in changed.items() if k != "rest"})
        assert proc.returncode == 2, (named, proc.stderr[-3000:])
        assert named in proc.stderr and "use a new --out, or delete these folders" in proc.stderr, proc.stderr[-3000:]
        assert "voice-task_rate-task_clean" in proc.stderr
    assert sorted((tmp_path / "sw").rglob("results_*.json")) == results  # nothing ran again
    assert (tmp_path / "sw" / "sweep.json").read_text() == written


def test_a_run_made_under_other_spoken_form_rules_is_not_reused():
    """Its speech twins heard other audio (the rules rewrite what TTS says)."""
    from pathlib import Path

    from lmeval_speech.audio.spoken_form import VERSION
    from lmeval_speech.sweep import lm_eval_command, recorded_differences

    cmd = lm_eval_command(["--model_args", "pretrained=mini"], "t", {"voice": None, "rate": None, "snr_db": None},
                          "white", 0, Path("out"))
    config = {"model": "lslm", "model_args": "pretrained=mini", "limit": None, "gen_kwargs": {},
              "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234, "fewshot_seed": 1234}
    ran = {"config": {**config, "lmeval_speech": {"settings": {"spoken_form": VERSION}}}, "configs": {"t": {}}}
    assert recorded_differences(ran, cmd) == []
    ran["config"]["lmeval_speech"]["settings"]["spoken_form"] = VERSION - 1
    assert recorded_differences(ran, cmd) == [f"spoken_form: {VERSION - 1} in the run, {VERSION} requested"]
    del ran["config"]["lmeval_speech"]
    assert recorded_differences(ran, cmd) == [f"spoken_form: None in the run, {VERSION} requested"]
