"""The commands a user types: plain ``lm_eval`` finds ``lslm`` and the tasks, and writes its usual files."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

TASK = "speech_mmlu_continuation_high_school_geography"


def sh(*cmd, env_extra=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_registration_keeps_builtin_models():
    out = sh(sys.executable, "-c", "from lm_eval.api.registry import get_model;"
             "print(get_model('hf').__name__, get_model('lslm').__name__)").stdout
    assert out.split() == ["HFLM", "LSLM"]


def test_startup_hook_is_cheap():
    """The .pth hook must not import torch or lm-eval at interpreter start."""
    out = sh(sys.executable, "-c", "import sys; print('torch' in sys.modules, 'lm_eval' in sys.modules,"
             " 'lmeval_speech._autoload' in sys.modules)").stdout.split()
    assert out == ["False", "False", "True"]


@pytest.fixture(scope="module")
def cli_run(tiny_qwen2_audio_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cache = out / "tts_cache"
    cmd = ["lm_eval", "--model", "lslm", "--model_args",
           f"pretrained={tiny_qwen2_audio_dir},capture=tokens,capture_dir={out / 'capture'}",
           "--tasks", TASK, "--device", "cpu", "--limit", "3", "--batch_size", "4",
           "--log_samples", "--output_path", str(out / "results")]
    first = sh(*cmd, env_extra={"LMEVAL_SPEECH_CACHE": str(cache)})
    files = {p: os.path.getmtime(p) for p in glob.glob(str(cache / "**/*.pcm"), recursive=True)}
    cmd[cmd.index("--output_path") + 1] = str(out / "results_again")
    cmd[cmd.index("--model_args") + 1] = f"pretrained={tiny_qwen2_audio_dir}"
    second = sh(*cmd, env_extra={"LMEVAL_SPEECH_CACHE": str(cache)})
    return out, first, second, files, cache


@pytest.mark.slow
def test_cli_writes_results_and_samples_for_both_twins(cli_run):
    out, first, _, _, _ = cli_run
    (results_path,) = glob.glob(str(out / "results/*/results_*.json"))[:1]
    results = json.load(open(results_path))
    for twin in ("text", "speech"):
        r = results["results"][f"{TASK}_{twin}"]
        assert 0.0 <= r["acc,none"] <= 1.0
        rows = [json.loads(l) for p in glob.glob(str(out / f"results/*/samples_{TASK}_{twin}_*.jsonl")) for l in open(p)]
        assert sorted(r["doc_id"] for r in rows) == [0, 1, 2]
    assert "capture_dir" in str(results["config"]["model_args"])
    assert "|acc" in first.stdout.replace(" ", "")  # lm-eval printed its results table


@pytest.mark.slow
def test_second_run_synthesizes_nothing(cli_run):
    _, _, _, files, cache = cli_run
    assert len(files) == 3  # 3 spoken questions
    after = {p: os.path.getmtime(p) for p in glob.glob(str(cache / "**/*.pcm"), recursive=True)}
    assert after == files


@pytest.mark.slow
def test_capture_of_a_cli_run_has_both_twins(cli_run):
    from lmeval_speech.capture.store import CaptureReader

    out, *_ = cli_run
    recs = CaptureReader(out / "capture").records
    assert sorted((r["modality"], r["doc_id"]) for r in recs) == [(m, d) for m in ("speech", "text") for d in range(3)]


@pytest.mark.slow
def test_synthesize_reports_hits(cli_run):
    _, _, _, _, cache = cli_run
    proc = sh("lmeval-speech", "synthesize", "--tasks", f"{TASK}_speech", "--limit", "3",
              env_extra={"LMEVAL_SPEECH_CACHE": str(cache)})
    assert '"hits": 3' in proc.stdout and '"misses": 0' in proc.stdout


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_loses_nothing(tiny_qwen2_audio_dir, tmp_path):
    """SIGKILL inside a capture run (fault injected after 5 batches), then rerun with --use_cache."""
    from lmeval_speech.capture.store import CaptureReader

    cache = tmp_path / "tts"
    base = ["lm_eval", "--model", "lslm", "--tasks", TASK, "--device", "cpu", "--limit", "8",
            "--batch_size", "2", "--log_samples"]
    args = (f"pretrained={tiny_qwen2_audio_dir},capture=pooled,capture_dir={tmp_path / 'cap'},"
            "capture_shard_size=2")
    cmd = base + ["--model_args", args, "--use_cache", str(tmp_path / "lm_cache"), "--output_path", str(tmp_path / "r1")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMEVAL_SPEECH_CACHE": str(cache),
           "LMEVAL_SPEECH_TEST_KILL_AFTER_BATCHES": "5",
           "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "fault_injection"),
                                          os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = CaptureReader(tmp_path / "cap").records  # verified shards only, no temp files
    assert 0 < len(partial) < 16
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]

    rerun = sh(*cmd, env_extra={"LMEVAL_SPEECH_CACHE": str(cache)})
    cached = [l for l in (rerun.stdout + rerun.stderr).splitlines() if "Cached requests:" in l]
    assert cached and int(cached[0].split("Cached requests:")[1].split(",")[0]) > 0
    recs = CaptureReader(tmp_path / "cap").records
    assert sorted((r["modality"], r["doc_id"]) for r in recs) == [(m, d) for m in ("speech", "text") for d in range(8)]

    sh(*(base + ["--model_args", f"pretrained={tiny_qwen2_audio_dir}", "--output_path", str(tmp_path / "r2")]),
               env_extra={"LMEVAL_SPEECH_CACHE": str(cache)})
    res = [json.load(open(glob.glob(str(tmp_path / d / "*/results_*.json"))[0]))["results"] for d in ("r1", "r2")]
    for twin in ("text", "speech"):
        assert res[0][f"{TASK}_{twin}"]["acc,none"] == res[1][f"{TASK}_{twin}"]["acc,none"]


@pytest.mark.slow
def test_data_parallel_two_cpu_processes(tiny_qwen2_audio_dir, tmp_path):
    """torchrun (gloo on CPU): each rank captures its own shards, results equal one process's."""
    from lmeval_speech.capture.store import CaptureReader

    common = ["--model", "lslm", "--tasks", TASK, "--limit", "6", "--batch_size", "2", "--log_samples"]
    env = {"LMEVAL_SPEECH_CACHE": str(tmp_path / "tts")}
    sh("torchrun", "--nproc_per_node", "2", "-m", "lm_eval", *common, "--model_args",
       f"pretrained={tiny_qwen2_audio_dir},capture=pooled,capture_dir={tmp_path / 'cap'}",
       "--output_path", str(tmp_path / "dp"), env_extra=env)
    sh("lm_eval", *common, "--model_args", f"pretrained={tiny_qwen2_audio_dir}", "--device", "cpu",
       "--output_path", str(tmp_path / "single"), env_extra=env)
    res = [json.load(open(glob.glob(str(tmp_path / d / "*/results_*.json"))[0]))["results"] for d in ("dp", "single")]
    for twin in ("text", "speech"):
        assert res[0][f"{TASK}_{twin}"]["acc,none"] == res[1][f"{TASK}_{twin}"]["acc,none"]
    assert {p.name.split("-")[0] for p in (tmp_path / "cap").glob("rank*.safetensors")} == {"rank0", "rank1"}
    recs = CaptureReader(tmp_path / "cap").records
    assert sorted((r["modality"], r["doc_id"]) for r in recs) == [(m, d) for m in ("speech", "text") for d in range(6)]


@pytest.mark.slow
def test_data_parallel_calibration_is_gathered_and_written_once(tiny_qwen2_audio_dir, tmp_path):
    """Two ranks' calibration statistics are gathered to rank 0 and written once: the file equals
    the one a single process writes from all items."""
    from safetensors.numpy import load_file

    common = ["--model", "lslm", "--tasks", TASK, "--limit", "6", "--batch_size", "2"]
    env = {"LMEVAL_SPEECH_CACHE": str(tmp_path / "tts")}
    args = f"pretrained={tiny_qwen2_audio_dir},intervention=length,intervene_layers=input/2,save_calibration="
    sh("torchrun", "--nproc_per_node", "2", "-m", "lm_eval", *common, "--model_args", args + str(tmp_path / "dp.st"),
       "--output_path", str(tmp_path / "dp"), env_extra=env)
    sh("lm_eval", *common, "--device", "cpu", "--model_args", args + str(tmp_path / "one.st"),
       "--output_path", str(tmp_path / "one"), env_extra=env)
    dp, one = load_file(str(tmp_path / "dp.st")), load_file(str(tmp_path / "one.st"))
    assert sorted(dp) == sorted(one) == ["2.direction", "2.norm", "input.direction", "input.norm"]
    for k in one:
        np.testing.assert_allclose(dp[k], one[k], rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
