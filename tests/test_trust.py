"""Numbers you can trust (issue 12): failures never become answers, exact spans, identity of what
was measured. Each test here failed on the code before its fix (see the session note)."""

from __future__ import annotations

import gc
import glob
import json
import os
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml
from lm_eval.api.instance import Instance

from conftest import run_results, run_samples, tone
from lmeval_speech.models.lslm import LSLM

TASKS_DIR = Path(__file__).resolve().parents[1] / "lmeval_speech" / "tasks"
PAIR = "speech_voicebench_mmsu_biology"


def req(ctx, cont, extra=None, task=None, doc_id=0, idx=0, doc=None):
    args = (ctx, cont) + ((extra,) if extra else ())
    return Instance(request_type="loglikelihood", doc=doc or {}, arguments=args, idx=idx, metadata=(task, doc_id, 1))


def sh(*cmd, env_extra=None, ok=True, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------ 1. failures are never answers

def test_missing_tts_engine_stops_before_scoring(tiny_qwen2_audio_dir, tmp_path, monkeypatch):
    """With espeak-ng off PATH every speech item fails: one clear error with the install hint."""
    from lmeval_speech.audio import TTSEngineMissing, spoken

    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng here
    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "cache"))
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    calls = []
    real = lm.backend_impl.run_decoder
    lm.backend_impl.run_decoder = lambda *a, **k: calls.append(1) or real(*a, **k)
    reqs = [req("Q: <audio>\nA:", f" {c}", {"audio": [spoken(f"question {i}")]}, "t_speech", i, j)
            for i in range(3) for j, c in enumerate("xy")]
    with pytest.raises(TTSEngineMissing, match="apt-get install -y espeak-ng"):
        lm.loglikelihood(reqs)
    assert calls == []  # stopped before scoring anything


def test_every_item_failing_stops_the_run(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    bad = [{"audio": [{"array": np.full(800, np.nan, dtype=np.float32) * i, "sampling_rate": 16000}]} for i in range(3)]
    with pytest.raises(Exception, match="every audio .*failed"):
        lm.loglikelihood([req("Q: <audio>\nA:", " x", b, "t_speech", i) for i, b in enumerate(bad)])


def test_a_failed_item_is_not_scored_and_is_recorded(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    bad = {"audio": [{"array": np.zeros(0, dtype=np.float32), "sampling_rate": 16000}]}
    good = {"audio": [{"array": tone(1.0), "sampling_rate": 16000}]}
    res = lm.loglikelihood([req("Q: <audio>\nA:", " x", bad, "t_speech", 0, doc={"q": 0}),
                            req("Q: <audio>\nA:", " x", good, "t_speech", 1, doc={"q": 1})])
    assert np.isnan(res[0][0]) and res[0][1] is False  # never -inf: argmax of an all -inf row is 0 = "A"
    assert np.isfinite(res[1][0])
    assert "empty" in res[0][0].failed  # the reason travels with the value into process_results
    from lmeval_speech.tasks.prompts import voicebench_results

    doc = {"reference": "A"}
    assert voicebench_results(doc, [res[0]] * 4) == {"audio_failed": res[0][0].failed, "audio_truncated": ""}


def _wav_bytes(array, sr=16000) -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, array, sr, format="WAV")
    return buf.getvalue()


def voicebench_run(tmp_path, tiny_qwen2_audio_dir, extra_args=(), model_args="", kill_after=None, cache=None):
    """A VoiceBench MCQ pair on a local parquet in VoiceBench's layout (audio, prompt, reference):
    doc 0 (gold A) has an unreadable recording, doc 1 lasts 31 s (past the 30 s that ``max_audio_seconds=30``
    allows), docs 2-3 are fine."""
    data = tmp_path / "vb.parquet"
    if not data.exists():
        audio = [{"bytes": b"RIFF not really a wav", "path": "0.wav"},
                 {"bytes": _wav_bytes(tone(31.0)), "path": "1.wav"},
                 {"bytes": _wav_bytes(tone(1.0, seed=2)), "path": "2.wav"},
                 {"bytes": _wav_bytes(tone(1.5, seed=3)), "path": "3.wav"}]
        datasets.Dataset.from_dict({
            "audio": audio,
            "prompt": [f"Which is {w}? A. one. B. two. C. three. D. four." for w in ("red", "blue", "cold", "hot")],
            "reference": ["A", "B", "C", "D"]}).cast_column("audio", datasets.Audio()).to_parquet(str(data))
        inc = tmp_path / "tasks"
        inc.mkdir()
        for m in ("text", "speech"):
            (inc / f"{PAIR}_{m}.yaml").write_text(yaml.safe_dump({
                "include": str(TASKS_DIR / "speech_voicebench" / f"{PAIR}_{m}.yaml"), "dataset_path": "parquet",
                "dataset_name": None, "test_split": "test",
                "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf")}}))
    out = tmp_path / "results"
    cmd = ["lm_eval", "--model", "lslm", "--model_args",
           f"pretrained={tiny_qwen2_audio_dir},max_audio_seconds=30{model_args}",
           "--include_path", str(tmp_path / "tasks"), "--tasks", f"{PAIR}_text,{PAIR}_speech",
           "--device", "cpu", "--batch_size", "1", "--log_samples", "--output_path", str(out), *extra_args]
    env = {"LMEVAL_SPEECH_CACHE": str(cache or tmp_path / "audio_cache")}
    if kill_after is not None:
        env["LMEVAL_SPEECH_TEST_KILL_AFTER_BATCHES"] = str(kill_after)
        env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent / "fault_injection"), os.environ.get("PYTHONPATH", "")])
    return cmd, out, env


@pytest.fixture(scope="module")
def vb_run(tiny_qwen2_audio_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vb")
    cmd, out, env = voicebench_run(tmp, tiny_qwen2_audio_dir)
    sh(*cmd, env_extra=env)
    return tmp, out


@pytest.mark.slow
def test_failed_and_truncated_items_are_counted_in_results_and_samples(vb_run):
    _, out = vb_run
    res = run_results(out)["results"]
    speech = res[f"{PAIR}_speech"]
    assert speech["audio_failed,none"] == 1 and speech["audio_truncated,none"] == 1
    assert res[f"{PAIR}_text"]["audio_failed,none"] == 0
    rows = run_samples(out, f"{PAIR}_speech")
    assert rows[0]["audio_failed"] and "audio" in rows[0]["audio_failed"].lower()
    assert "acc" not in rows[0]  # not scored: never "correct because the gold answer is A"
    assert rows[1]["audio_truncated"].startswith("truncated 31.0s")
    assert not rows[2]["audio_failed"] and not rows[2]["audio_truncated"]
    # speech accuracy is over the 3 scored items only
    scored = [rows[d]["acc"] for d in (1, 2, 3)]
    assert speech["acc,none"] == pytest.approx(np.mean(scored))


@pytest.mark.slow
def test_report_counts_only_items_valid_in_both_twins(vb_run, tmp_path):
    from lmeval_speech.report import report

    _, out = vb_run
    rep, _ = report.build_report(report.load_run(out), n_boot=200)
    p = rep["pairs"][PAIR]
    assert p["n"] == 2  # doc 0 failed, doc 1 truncated (left out by default)
    assert p["excluded"] == {"audio_failed": 1, "audio_truncated": 1}
    assert sorted(r["doc_id"] for r in rep["items"]) == [2, 3]
    rep2, _ = report.build_report(report.load_run(out), n_boot=200, include_truncated=True)
    assert rep2["pairs"][PAIR]["n"] == 3 and rep2["pairs"][PAIR]["excluded"] == {"audio_failed": 1}
    md = report.markdown(rep)
    assert "audio_failed" in md and "audio_truncated" in md


@pytest.mark.slow
def test_run_manifest_is_the_record_of_what_was_measured(vb_run):
    from lmeval_speech.manifest import load_manifest

    _, out = vb_run
    m = load_manifest(out)
    assert Path(m["path"]).parent == Path(glob.glob(str(out / "*" / "results_*.json"))[0]).parent
    assert m["model"]["backend"] == "Qwen2AudioBackend" and m["model"]["dtype"] == "float32"
    assert len(m["model"]["config_sha256"]) == 64
    t = m["tasks"][f"{PAIR}_speech"]
    assert (t["pair"], t["modality"]) == (PAIR, "speech")
    assert t["audio"] == {"recorded": {"dataset": "hlt-lab/voicebench", "column": "audio"}}
    assert t["failures"] == {"0": t["failures"]["0"]} and t["truncations"].keys() == {"1"}
    assert m["tasks"][f"{PAIR}_text"]["modality"] == "text"


@pytest.mark.slow
def test_use_cache_works_for_recorded_audio_and_resumes_after_kill(tiny_qwen2_audio_dir, tmp_path):
    cmd, out, env = voicebench_run(tmp_path, tiny_qwen2_audio_dir, ("--use_cache", str(tmp_path / "lmcache")),
                                   kill_after=3)
    killed = sh(*cmd, env_extra=env, ok=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    env.pop("LMEVAL_SPEECH_TEST_KILL_AFTER_BATCHES")
    env.pop("PYTHONPATH")
    rerun = sh(*cmd, env_extra=env)
    cached = [line for line in (rerun.stdout + rerun.stderr).splitlines() if "Cached requests:" in line]
    assert cached and int(cached[-1].split("Cached requests:")[1].split(",")[0]) > 0
    assert run_results(out)["results"][f"{PAIR}_speech"]["audio_failed,none"] == 1


# ------------------------------------------------------------------ 3-4. exact spans

def _mini_lm(tmp_path):
    return LSLM(pretrained="mini", device="cpu", batch_size=4, capture="tokens", capture_dir=str(tmp_path / "cap"),
                capture_layers="0")


@pytest.mark.slow
def test_text_span_is_exactly_the_spoken_text_for_every_family(tmp_path):
    """Real SmolLM2 tokenizer, real task prompts: the captured text states are those of the tokens
    whose characters are the spoken text (letter, cloze, ARC, OBQA, VoiceBench)."""
    from lm_eval.tasks import TaskManager

    from lmeval_speech import twins
    from lmeval_speech.capture.store import CaptureReader
    from test_tasks import ARC_ROWS, OBQA_ROWS, override

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(map(json.dumps, ARC_ROWS)))
    obqa = tmp_path / "obqa.jsonl"
    obqa.write_text("\n".join(map(json.dumps, OBQA_ROWS)))
    vb = tmp_path / "vb.parquet"
    datasets.Dataset.from_dict({"audio": [{"bytes": _wav_bytes(tone(1.0)), "path": "a.wav"}],
                                "prompt": ["Which is red? A. sky. B. blood. C. grass. D. snow."],
                                "reference": ["B"]}).cast_column("audio", datasets.Audio()).to_parquet(str(vb))
    splits = {"training_split": None, "validation_split": None}
    tm = TaskManager()
    names = ["speech_mmlu_high_school_geography_text", "speech_mmlu_continuation_high_school_geography_text"]
    extra = [override(tmp_path, "speech_arc_easy_text", "speech_arc", rows, "json", **splits),
             override(tmp_path, "speech_openbookqa_text", "speech_openbookqa", obqa, "json", **splits),
             override(tmp_path, f"{PAIR}_text", "speech_voicebench", vb, "parquet", test_split="test")]
    loaded = tm.load(names + extra)["tasks"]
    lm = _mini_lm(tmp_path)
    tok = lm.tokenizer
    reqs = []
    for task in loaded.values():
        task.build_all_requests(limit=1, rank=0, world_size=1)
        reqs += task.instances
    lm.loglikelihood(reqs)
    reader = CaptureReader(tmp_path / "cap")
    assert len(reader.records) == 5
    emb = lm.backend_impl.model.language_model.get_input_embeddings().weight
    for rec in reader.records:
        inst = next(i for i in reqs if i.task_name == rec["task"] and i.idx == 0)
        spoken = twins.text_counterpart(rec["task"], inst.doc)
        ctx = inst.arguments[0]
        enc = tok(ctx, return_offsets_mapping=True, add_special_tokens=False)
        start = ctx.rindex(spoken)
        ids = [t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if b > start and a < start + len(spoken)]
        assert tok.decode(ids).strip() == spoken.strip(), rec["task"]
        assert rec["n_positions"] == len(ids), (rec["task"], tok.decode(ids))
        np.testing.assert_allclose(reader.load(rec)["pooled"][0], emb[ids].mean(0).detach().numpy(), atol=1e-5)


def test_spoken_text_comes_from_the_task_not_a_field_name():
    from lmeval_speech import twins
    from lmeval_speech.tasks import prompts

    doc = {"prompt": "Which is red? A. sky. B. blood.", "reference": "B", "audio": {"path": "x.wav"}}
    assert twins.spoken_text(f"{PAIR}_text", doc) == "Which is red? A. sky. B. blood."
    mmlu = {"question": "What is up?", "choices": ["a", "b", "c", "d"], "answer": 0}
    assert twins.spoken_text("speech_mmlu_anatomy_text", mmlu) == prompts.mmlu_spoken_text(mmlu)
    assert twins.spoken_text("speech_mmlu_continuation_anatomy_text", mmlu) == "What is up?"


# ------------------------------------------------------------------ 5-6. identity

def test_capture_dir_refuses_another_models_records(tiny_qwen2_audio_dir, tiny_llama_dir, tmp_path):
    cap = str(tmp_path / "cap")
    reqs = [req("Question: What is the capital of France?\nAnswer:", " Paris", None, "speech_mmlu_continuation_geo_text", 0,
                doc={"question": "What is the capital of France?"})]
    LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", capture="pooled", capture_dir=cap).loglikelihood(reqs)
    with pytest.raises(ValueError, match="(?s)capture dir.*tiny_qwen2_audio.*tiny_llama"):
        LSLM(pretrained=tiny_llama_dir, device="cpu", capture="pooled", capture_dir=cap)


def test_audio_is_keyed_by_content_not_object_id(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    fresh = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    for seed in range(4):
        a = tone(1.0, freq=200 + 100 * seed, seed=seed)
        r = [req("Q: <audio>\nA:", " x", {"audio": [{"array": a, "sampling_rate": 16000}]})]
        assert lm.loglikelihood(r) == fresh.loglikelihood(r)
        fresh.embeddings.clear()
        del a, r
        gc.collect()


# ------------------------------------------------------------------ 9, 12. smaller defects

@pytest.mark.slow
def test_capture_layers_survive_lm_eval_model_args(tiny_qwen2_audio_dir, tmp_path):
    from lmeval_speech.capture.store import CaptureReader

    task = "speech_mmlu_continuation_high_school_geography"
    sh("lm_eval", "--model", "lslm", "--model_args",
       f"pretrained={tiny_qwen2_audio_dir},capture=tokens,capture_dir={tmp_path / 'cap'},capture_layers=0/2",
       "--tasks", task, "--limit", "1", "--device", "cpu", "--output_path", str(tmp_path / "r"),
       env_extra={"LMEVAL_SPEECH_CACHE": str(tmp_path / "tts")})
    assert {tuple(r["token_layers"]) for r in CaptureReader(tmp_path / "cap").records} == {(0, 2)}
    with pytest.raises(ValueError, match="layer 40.*3 hidden states"):
        LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu", capture="tokens", capture_dir=str(tmp_path / "c2"),
             capture_layers="0/40")


def test_capture_limit_counts_items_already_stored(tiny_qwen2_audio_dir, tmp_path):
    from lmeval_speech.capture.store import CaptureReader

    cap = str(tmp_path / "cap")
    mk = lambda d: req(f"Question: q{d} is what?\nAnswer:", " x", None, "speech_mmlu_continuation_geo_text", d,
                       doc={"question": f"q{d} is what?"})
    kw = dict(pretrained=tiny_qwen2_audio_dir, device="cpu", capture="tokens", capture_dir=cap, capture_limit=2)
    LSLM(**kw).loglikelihood([mk(0), mk(1)])
    LSLM(**kw).loglikelihood([mk(2), mk(3)])  # a resumed run: the limit is already reached
    with_tokens = [r["doc_id"] for r in CaptureReader(cap).records if r["token_layers"]]
    assert sorted(with_tokens) == [0, 1]


def test_pad_token_id_zero_is_used_for_generation(tiny_qwen2_audio_dir):
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    assert lm.tokenizer.pad_token_id == 0
    seen = {}
    real = lm.backend_impl.language_model.generate
    lm.backend_impl.language_model.generate = lambda *a, **k: seen.update(k) or real(*a, **k)
    lm.generate_until([Instance(request_type="generate_until", doc={}, idx=0,
                                arguments=("Question: hi\nAnswer:", {"until": ["\n"], "max_gen_toks": 2}))])
    assert seen["pad_token_id"] == 0


# ------------------------------------------------------------------ tests that could not fail before

def test_slerp_half_way_matches_a_hand_computation():
    from lmeval_speech.interventions.ops import angle_projection

    s = torch.tensor([[3.0, 0.0, 0.0]])  # norm 3, direction e0
    t = torch.tensor([[0.0, 5.0, 0.0]])  # direction e1, 90 degrees away
    half = angle_projection(s, t, 0.5)
    # half way along the great circle: 45 degrees, norm kept
    np.testing.assert_allclose(half.numpy(), [[3 / np.sqrt(2), 3 / np.sqrt(2), 0.0]], atol=1e-6)
    third = angle_projection(s, t, 1 / 3)  # 30 degrees
    np.testing.assert_allclose(third.numpy(), [[3 * np.cos(np.pi / 6), 3 * np.sin(np.pi / 6), 0.0]], atol=1e-6)


def test_paired_bootstrap_on_asymmetric_cells_matches_index_resampling():
    from lmeval_speech.metrics import paired_gap

    # 30 both right, 14 text only, 2 speech only, 4 both wrong: gap = 12/50 = 0.24
    text = np.array([1] * 30 + [1] * 14 + [0] * 2 + [0] * 4)
    speech = np.array([1] * 30 + [0] * 14 + [1] * 2 + [0] * 4)
    res = paired_gap(text, speech, n_boot=20000, seed=3)
    assert res["gap"] == pytest.approx(0.24)
    assert res["table"] == {"both_right": 30, "text_only": 14, "speech_only": 2, "both_wrong": 4}
    idx = np.random.default_rng(11).integers(0, 50, size=(20000, 50))
    lo, hi = np.quantile((text[idx] - speech[idx]).mean(axis=1), [0.025, 0.975])
    assert res["ci_low"] == pytest.approx(lo, abs=0.021) and res["ci_high"] == pytest.approx(hi, abs=0.021)
    assert res["ci_low"] > 0.08  # a swapped or symmetrized cell would centre the CI on 0 or -0.24
    # McNemar exact on 14 vs 2 discordant pairs
    from scipy.stats import binomtest

    assert res["mcnemar"]["p"] == pytest.approx(binomtest(2, 16, 0.5).pvalue, rel=1e-6)


def test_failed_generation_is_marked_not_an_empty_answer(tiny_qwen2_audio_dir):
    from lmeval_speech.tasks.prompts import sdqa_process_results

    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    bad = {"audio": [{"array": np.zeros(0, dtype=np.float32), "sampling_rate": 16000}]}
    good = {"audio": [{"array": tone(1.0), "sampling_rate": 16000}]}
    kw = {"until": ["\n"], "max_gen_toks": 4, "do_sample": False}
    out = lm.generate_until([Instance("generate_until", {}, ("Question: <audio>\nAnswer:", kw, a), 0)
                             for a in (bad, good)])
    assert out[0] == "" and "empty" in out[0].failed
    assert sdqa_process_results({"reference": ""}, [out[0]]) == {"audio_failed": out[0].failed, "audio_truncated": ""}
    assert "contains_proxy" in sdqa_process_results({"reference": "x"}, [out[1]])


def test_generation_equals_a_direct_greedy_generate(tiny_qwen2_audio_dir):
    """The generated text is the real model's greedy continuation, stopped at the stop string."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    audio = tone(1.0, seed=4)
    kw = {"until": ["Paris"], "max_gen_toks": 12, "do_sample": False}
    (got,) = lm.generate_until([Instance("generate_until", {}, ("Question: <audio>\nAnswer:", kw,
                                                                {"audio": [{"array": audio, "sampling_rate": 16000}]}), 0)])
    proc = AutoProcessor.from_pretrained(tiny_qwen2_audio_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_qwen2_audio_dir).eval()
    inputs = proc(text="Question: <|audio_bos|><|AUDIO|><|audio_eos|>\nAnswer:", audio=[audio], return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = proc.tokenizer.decode(gen[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).split("Paris")[0]
    assert got == expected and len(got) > 0


def test_bottom3_positions_end_to_end_with_distinct_scores(tmp_path):
    """A captured item whose speech positions align to text tokens with distinct cosines
    0.9, 0.3, 0.6, 0.5 (+ two unrelated positions): the report's Bottom-3 are 1, 3, 2, worst first."""
    from lmeval_speech.capture.store import CaptureWriter
    from lmeval_speech.report import report
    from test_report import D, N_STATES, TOKEN_LAYERS, _unit, write_run

    cos = [0.9, 0.3, 0.6, 0.5]
    writer = CaptureWriter(tmp_path / "cap", meta={"mode": "tokens", "n_hidden_states": N_STATES,
                                                   "token_layers": TOKEN_LAYERS})
    text_tok = np.stack([_unit(j) for j in range(4)])
    speech_tok = np.stack([c * _unit(i) + np.sqrt(1 - c * c) * _unit(i + 4) for i, c in enumerate(cos)]
                          + [_unit(8), _unit(9)])
    for d in range(2):
        for modality, tok in (("text", text_tok), ("speech", speech_tok)):
            writer.add({"task": f"speech_toy_a_{modality}", "pair": "speech_toy_a", "modality": modality, "doc_id": d,
                        "n_positions": len(tok), "token_layers": TOKEN_LAYERS, "audio": None},
                       {"pooled": np.tile(tok.mean(0), (N_STATES, 1)).astype(np.float32),
                        "tokens": np.stack([tok] * len(TOKEN_LAYERS)).astype(np.float16)})
    writer.flush()
    assert D >= 10
    write_run(tmp_path / "out", f"pretrained=mini,capture=tokens,capture_dir={tmp_path / 'cap'}",
              correct={"speech_toy_a": ([1, 1], [1, 0])})
    rep, _ = report.build_report(report.load_run(tmp_path / "out"), n_boot=100, item=("speech_toy_a", 1))
    for crit in rep["alignment"]["item"]["critical_tokens"]:
        assert list(map(int, crit["positions"])) == [1, 3, 2]
        np.testing.assert_allclose(crit["scores"], [0.3, 0.5, 0.6], atol=2e-3)
        assert [list(map(int, t)) for t in crit["text_tokens"]] == [[1], [3], [2]]


def test_named_chat_template_returns_the_template_not_its_name(tiny_llama_dir):
    lm = LSLM(pretrained=tiny_llama_dir, device="cpu")
    default = lm.tokenizer.chat_template
    lm.tokenizer.chat_template = {"default": default, "terse": "{{ messages[0]['content'] }}"}
    assert lm.chat_template("terse") == "{{ messages[0]['content'] }}"
    assert lm.chat_template(True) == default and lm.chat_template(False) is None


def test_few_shot_speech_twin_stops_before_any_synthesis(tiny_qwen2_audio_dir, tmp_path, monkeypatch):
    from lmeval_speech.audio import spoken

    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "cache"))
    lm = LSLM(pretrained=tiny_qwen2_audio_dir, device="cpu")
    ctx = "Question: <audio>\nAnswer: A\n\nQuestion: <audio>\nAnswer:"
    with pytest.raises(ValueError, match="2 <audio> markers but the request carries 1.*--num_fewshot 0"):
        lm.loglikelihood([req(ctx, " B", {"audio": [spoken("what is two plus two")]}, "t_speech")])
    assert not (tmp_path / "cache").exists()  # nothing synthesized
