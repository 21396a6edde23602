"""Prior controls (issue 15, part): another item's audio and silence, over the speech twin's doc ids."""

from __future__ import annotations

import glob
import json
import re
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from lm_eval.tasks import TaskManager

from lmeval_speech.audio import resolve_audio
from lmeval_speech.tasks import prompts

PAIR = "speech_mmlu_continuation_high_school_geography"


def test_the_shuffled_control_never_hears_its_own_words():
    """A dataset with a repeated question (MMLU college_physics has two): the derangement maps items,
    not audio, so an item could hear its own question in the "another item's audio" control."""
    import datasets

    questions = ["What is a?", "What is b?", "What is c?", "What is a?", "What is d?", "What is e?"]
    assert prompts.derangement(6)[0] == 3  # item 0's source is item 3: the same words
    docs = prompts.shuffled_question_docs(datasets.Dataset.from_dict({"question": questions}))
    for i, doc in enumerate(docs):
        assert doc["control_from"] != i and questions[doc["control_from"]] != questions[i]
        assert prompts.control_audio(doc) == prompts.question_audio({"question": questions[doc["control_from"]]})
    assert sorted(docs["control_from"]) == list(range(6))
    with pytest.raises(ValueError, match="more than half the items"):
        prompts.shuffled_question_docs(datasets.Dataset.from_dict({"question": ["Why?"] * 3}))


def test_derangement_never_maps_an_item_to_itself():
    for n in range(2, 60):
        perm = prompts.derangement(n)
        assert sorted(perm) == list(range(n)) and all(perm[i] != i for i in range(n))
        assert perm == prompts.derangement(n)  # fixed (seeded)
    with pytest.raises(ValueError, match="at least 2"):
        prompts.derangement(1)


@pytest.fixture(scope="module")
def loaded():
    tm = TaskManager()
    return tm.load([f"{PAIR}_{m}" for m in ("text", "speech", "shuffled", "silence")])["tasks"]


def test_controls_cover_the_same_items_and_targets(loaded):
    docs = {m: list(loaded[f"{PAIR}_{m}"].test_docs()) for m in ("text", "speech", "shuffled", "silence")}
    n = len(docs["text"])
    assert all(len(d) == n for d in docs.values())
    targets = {m: [loaded[f"{PAIR}_{m}"].doc_to_target(d) for d in ds] for m, ds in docs.items()}
    assert targets["shuffled"] == targets["silence"] == targets["speech"] == targets["text"]
    speech, shuffled = loaded[f"{PAIR}_speech"], loaded[f"{PAIR}_shuffled"]
    for i, doc in enumerate(docs["shuffled"][:20]):
        j = doc["control_from"]
        assert j != i
        assert shuffled.doc_to_audio(doc) == speech.doc_to_audio(docs["speech"][j]) != speech.doc_to_audio(docs["speech"][i])
        assert shuffled.doc_to_text(doc) == speech.doc_to_text(docs["speech"][i])  # same prompt, other audio
    silence = loaded[f"{PAIR}_silence"]
    assert silence.doc_to_audio(docs["silence"][0]) == [{"silence_like": speech.doc_to_audio(docs["speech"][0])[0]}]


def test_silence_is_as_long_as_the_items_own_audio(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path))
    own = prompts.question_audio({"question": "Which river is the longest?"})[0]
    speech, rate, _ = resolve_audio(own)
    silent, rate2, info = resolve_audio({"silence_like": own})
    assert rate == rate2 and silent.shape == speech.shape and not silent.any() and info["source"] == "silence"


@pytest.mark.slow
def test_report_measures_hearing_against_each_control(tiny_qwen2_audio_dir, tmp_path):
    from lmeval_speech.report import report

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMEVAL_SPEECH_CACHE": str(tmp_path / "tts")}
    proc = subprocess.run(["lm_eval", "--model", "lslm", "--model_args", f"pretrained={tiny_qwen2_audio_dir}",
                           "--tasks", f"{PAIR},{PAIR}_controls", "--limit", "4", "--device", "cpu", "--batch_size", "8",
                           "--log_samples", "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep, _ = report.build_report(report.load_run(tmp_path / "out"), n_boot=500)
    c = rep["controls"][PAIR]
    assert set(c) == {"shuffled", "silence"}
    (res,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    results = json.load(open(res))["results"]
    for control, v in c.items():
        assert v["n"] == 4
        assert v["control_acc"] == pytest.approx(results[f"{PAIR}_{control}"]["acc,none"])
        assert v["speech_acc"] == pytest.approx(results[f"{PAIR}_speech"]["acc,none"])
        assert v["hearing"] == pytest.approx(v["speech_acc"] - v["control_acc"])
    assert "Does the model hear?" in report.markdown(rep)
    assert np.isfinite(rep["overall"]["gap"]) and rep["overall"]["n"] == 4  # the text/speech gap is unchanged


@pytest.mark.slow
def test_cascade_decomposition_adds_up_and_records_the_transcript(tiny_qwen2_audio_dir, tmp_path):
    """The cascade twin: the speech twin's audio through Whisper tiny.en (faster-whisper), the transcript
    read as text; the report's recognition + misalignment equal text - speech on the same items."""
    from lmeval_speech.audio.asr import word_error_rate
    from lmeval_speech.report import report

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LMEVAL_SPEECH_CACHE": str(tmp_path / "tts")}
    proc = subprocess.run(["lm_eval", "--model", "lslm", "--model_args", f"pretrained={tiny_qwen2_audio_dir}",
                           "--tasks", f"{PAIR},{PAIR}_cascade,{PAIR}_shuffled", "--limit", "4", "--device", "cpu",
                           "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (samples,) = glob.glob(str(tmp_path / "out" / "*" / f"samples_{PAIR}_cascade_*.jsonl"))
    rows = [json.loads(line) for line in open(samples)]
    for row in rows:
        spoken = row["doc"]["question"].strip()
        assert row["asr_transcript"] and row["asr_wer"] == pytest.approx(word_error_rate(spoken, row["asr_transcript"]))
        assert row["asr_wer"] < 0.8  # Whisper heard the espeak question
    rep, _ = report.build_report(report.load_run(tmp_path / "out"), n_boot=300)
    d = rep["decomposition"][PAIR]
    assert d["n"] == 4 and d["recognition"]["gap"] + d["misalignment"]["gap"] == pytest.approx(d["gap"]["gap"])
    assert d["gap"]["gap"] == pytest.approx(rep["pairs"][PAIR]["gap"])
    (res,) = glob.glob(str(tmp_path / "out" / "*" / "results_*.json"))
    assert d["cascade_acc"] == pytest.approx(json.load(open(res))["results"][f"{PAIR}_cascade"]["acc,none"])
    assert d["hearing"]["hearing"] == pytest.approx(rep["controls"][PAIR]["shuffled"]["hearing"])
    # agreement of chosen options, recomputed here from the logged log-likelihoods with scikit-learn
    from sklearn.metrics import cohen_kappa_score

    def chosen(task):
        (path,) = glob.glob(str(tmp_path / "out" / "*" / f"samples_{task}_2*.jsonl"))
        by_doc = {r["doc_id"]: r for r in map(json.loads, open(path))}
        value = re.compile(r"-?\d+\.?\d*(?:e-?\d+)?")  # a cascade's responses read "Scored(-12.3, ...)"
        return [int(np.argmax([float(value.search(str(x[0])).group()) for x in by_doc[k]["filtered_resps"]]))
                for k in sorted(by_doc)]

    speech_choice, cascade_choice = chosen(f"{PAIR}_speech"), chosen(f"{PAIR}_cascade")
    agreement = d["speech_cascade_kappa"]
    assert agreement["n"] == 4
    assert agreement["agreement"] == pytest.approx(np.mean(np.array(speech_choice) == np.array(cascade_choice)))
    expected = cohen_kappa_score(speech_choice, cascade_choice)
    assert (agreement["kappa"] is None and not np.isfinite(expected)) or agreement["kappa"] == pytest.approx(expected)
    assert d["recovery"]["rate"] == pytest.approx(d["speech_acc"] / d["text_acc"]) if d["text_acc"] else True
    out = tmp_path / "rep"
    report.write_outputs(rep, None, out)
    assert (out / "decomposition.png").stat().st_size > 1000 and "Where the gap comes from" in (out / "report.md").read_text()


def _hand_run(out, tasks, target=None):
    """A hand-made run of pair speech_toy_a: ``tasks`` = {task: (modality, 0/1 scores)}; ``target(doc_id)``
    overrides the logged target."""
    from test_report import _config, _sample, write_samples

    model_dir = out / "lslm__m"
    model_dir.mkdir(parents=True)
    configs = {}
    for task, (modality, scores) in tasks.items():
        configs[task] = _config(task, "speech_toy_a", "speech" if modality != "text" else "text")
        configs[task]["metadata"]["modality"] = modality
        write_samples(model_dir / f"samples_{task}_2025-01-01T00-00-00.000001.jsonl",
                      [_sample(d, c, None if target is None else target(d)) for d, c in enumerate(scores)])
    (model_dir / "results_2025-01-01T00-00-00.000001.json").write_text(json.dumps(
        {"results": {t: {} for t in tasks}, "configs": configs, "config": {"model": "lslm", "model_args": "pretrained=m"}}))
    return out


def test_forgetting_from_a_base_run_completes_the_decomposition(tmp_path):
    """Hand-made runs: base text 1,1,1,1,0,1 / LSLM text 1,1,0,1,0,1 / cascade 1,0,0,1,0,1 / speech
    0,0,0,1,0,1: forgetting 1/6, recognition 1/6, misalignment 1/6, and they add up to base - speech."""
    from lmeval_speech.report import report

    run = _hand_run

    lslm = run(tmp_path / "lslm", {"speech_toy_a_text": ("text", [1, 1, 0, 1, 0, 1]),
                                   "speech_toy_a_speech": ("speech", [0, 0, 0, 1, 0, 1]),
                                   "speech_toy_a_cascade": ("cascade", [1, 0, 0, 1, 0, 1])})
    base = run(tmp_path / "base", {"speech_toy_a_text": ("text", [1, 1, 1, 1, 0, 1])})
    rep, _ = report.build_report(report.load_run(lslm), n_boot=200, base=report.load_run(base))
    d = rep["decomposition"]["speech_toy_a"]
    assert d["n"] == 6 and d["base_text_acc"] == pytest.approx(5 / 6)
    for step in ("forgetting", "recognition", "misalignment"):
        assert d[step]["gap"] == pytest.approx(1 / 6), step
    assert d["base_gap"]["gap"] == pytest.approx(3 / 6) and d["gap"]["gap"] == pytest.approx(2 / 6)
    assert d["recovery_rate"] == pytest.approx((2 / 6) / (4 / 6))
    rep2, _ = report.build_report(report.load_run(lslm), n_boot=200)
    assert rep2["decomposition"]["speech_toy_a"]["forgetting"] is None


def _toy_run(out, tasks):
    """A run folder of toy twins: ``{task: (pair, modality, per-item correctness)}``."""
    from test_report import _config, _sample, write_samples

    model_dir = out / "lslm__m"
    model_dir.mkdir(parents=True)
    configs = {}
    for task, (pair, modality, scores) in tasks.items():
        configs[task] = _config(task, pair, "speech" if modality != "text" else "text")
        configs[task]["metadata"]["modality"] = modality
        write_samples(model_dir / f"samples_{task}_2025-01-01T00-00-00.000001.jsonl", [_sample(d, c) for d, c in enumerate(scores)])
    (model_dir / "results_2025-01-01T00-00-00.000001.json").write_text(json.dumps(
        {"results": {t: {} for t in tasks}, "configs": configs, "config": {"model": "lslm", "model_args": "pretrained=m"}}))
    return out


def test_pooled_rows_put_every_pairs_items_together(tmp_path):
    """Two pairs (6 + 4 items): the "overall (pooled)" decomposition and control rows are computed on
    the 10 items together (not a mean of the two pairs' figures), with the same exact sums."""
    from lmeval_speech.report import report
    from lmeval_speech.report.schema import POOLED

    a, b = "speech_toy_a", "speech_toy_b"
    lslm = _toy_run(tmp_path / "lslm", {
        f"{a}_text": (a, "text", [1, 1, 0, 1, 0, 1]), f"{a}_speech": (a, "speech", [0, 0, 0, 1, 0, 1]),
        f"{a}_cascade": (a, "cascade", [1, 0, 0, 1, 0, 1]), f"{a}_shuffled": (a, "shuffled", [0, 0, 0, 0, 0, 1]),
        f"{b}_text": (b, "text", [1, 1, 1, 1]), f"{b}_speech": (b, "speech", [1, 1, 1, 0]),
        f"{b}_cascade": (b, "cascade", [1, 1, 1, 1]), f"{b}_shuffled": (b, "shuffled", [1, 0, 0, 0])})
    base = _toy_run(tmp_path / "base", {f"{a}_text": (a, "text", [1, 1, 1, 1, 0, 1]), f"{b}_text": (b, "text", [1, 1, 1, 1])})
    rep, _ = report.build_report(report.load_run(lslm), n_boot=200, base=report.load_run(base))
    d = rep["decomposition"][POOLED]
    assert d["n"] == 10
    # text 8/10, cascade 7/10, speech 5/10, base 9/10: steps 1/10, 1/10, 2/10 (a mean of the pairs' steps
    # would give forgetting (1/6 + 0) / 2 = 0.083 and misalignment (1/6 + 1/4) / 2 = 0.208)
    assert (d["base_text_acc"], d["text_acc"], d["cascade_acc"], d["speech_acc"]) == pytest.approx((0.9, 0.8, 0.7, 0.5))
    assert d["forgetting"]["gap"] == pytest.approx(0.1) and d["recognition"]["gap"] == pytest.approx(0.1)
    assert d["misalignment"]["gap"] == pytest.approx(0.2) and d["base_gap"]["gap"] == pytest.approx(0.4)
    c = rep["controls"][POOLED]["shuffled"]
    assert (c["n"], c["speech_acc"], c["control_acc"]) == (10, pytest.approx(0.5), pytest.approx(0.2))
    assert d["hearing"]["hearing"] == pytest.approx(0.3)
    assert set(rep["decomposition"]) == {a, b, POOLED}


def test_pooled_decomposition_hearing_is_over_the_rows_own_pairs(tmp_path):
    """The pooled decomposition row pools the pairs with a cascade twin (a, b); its hearing was the
    controls' pooled row, which pools the pairs with a shuffled twin (a, c): 0.25 from c's items, a pair
    not in the row. It is now over the row's own pairs, or null when one of them has no shuffled twin."""
    from lmeval_speech.report import report
    from lmeval_speech.report.schema import POOLED

    right, half, wrong = [1] * 10, [1] * 5 + [0] * 5, [0] * 10
    a, b, c = "speech_toy_a", "speech_toy_b", "speech_toy_c"
    tasks = {f"{a}_text": (a, "text", right), f"{a}_speech": (a, "speech", half), f"{a}_cascade": (a, "cascade", right),
             f"{a}_shuffled": (a, "shuffled", wrong),
             f"{b}_text": (b, "text", right), f"{b}_speech": (b, "speech", half), f"{b}_cascade": (b, "cascade", right),
             f"{c}_text": (c, "text", right), f"{c}_speech": (c, "speech", half), f"{c}_shuffled": (c, "shuffled", half)}
    rep, _ = report.build_report(report.load_run(_toy_run(tmp_path / "r1", tasks)), n_boot=200)
    d = rep["decomposition"]
    assert set(d) == {a, b, POOLED} and d[POOLED]["n"] == 20
    assert rep["controls"][POOLED]["shuffled"]["hearing"] == pytest.approx(0.25)  # a + c: not the row's pairs
    assert d[a]["hearing"]["hearing"] == pytest.approx(0.5) and d[b]["hearing"] is None
    assert d[POOLED]["hearing"] is None  # b, in the row, has no shuffled twin
    assert any("pooled row has no hearing" in n and b in n for n in rep["notes"])
    # with b's shuffled twin too, the row's hearing is over a + b (speech 10/20, shuffled 0/20), not a + b + c
    rep, _ = report.build_report(report.load_run(_toy_run(tmp_path / "r2", {**tasks, f"{b}_shuffled": (b, "shuffled", wrong)})),
                                 n_boot=200)
    assert rep["controls"][POOLED]["shuffled"]["hearing"] == pytest.approx(1 / 3)
    assert rep["decomposition"][POOLED]["hearing"]["hearing"] == pytest.approx(0.5)
    assert rep["decomposition"][POOLED]["hearing"]["n"] == 20


@pytest.mark.slow
def test_mini_base_is_the_embedded_models_text_path():
    """``pretrained=mini-base`` is SmolLM2 itself through the causal-LM backend: the embedded model's
    text twin scores are its base LLM's to 1e-5, so its forgetting is exactly 0."""
    from lm_eval.api.instance import Instance

    from lmeval_speech.models.lslm import LSLM

    reqs = [Instance("loglikelihood", {}, ("Question: What is the capital city of France?\nAnswer:", c), 0)
            for c in (" Paris", " Rome")]
    mini, base = LSLM(pretrained="mini", device="cpu"), LSLM(pretrained="mini-base", device="cpu")
    assert type(base.backend_impl).__name__ == "CausalLMBackend"
    np.testing.assert_allclose([r[0] for r in mini.loglikelihood(reqs)], [r[0] for r in base.loglikelihood(reqs)], atol=1e-5)


@pytest.mark.slow
def test_sdqa_cascade_generates_from_the_recordings_transcript(tiny_qwen2_audio_dir, tmp_path, monkeypatch):
    """SD-QA's cascade twin (a generation task): the recording (espeak-ng speaking a known question,
    stored as the dataset's audio) is transcribed by Whisper tiny.en, and that transcript, in the speech
    twin's prompt, is what the LLM generates from; each row records the transcript and its WER.
    Doc 1's recording is unreadable: not scored, counted."""
    import datasets
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lmeval_speech.audio import spoken
    from lmeval_speech.audio.asr import word_error_rate
    from lmeval_speech.models.lslm import LSLM
    from test_trust import _wav_bytes

    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    questions = ["What is the capital city of France?", "Who wrote the play Hamlet?"]
    voice, rate, _ = resolve_audio(spoken(questions[0], **prompts.TTS))
    data = tmp_path / "sdqa.parquet"
    datasets.Dataset.from_dict({
        "audio": [{"bytes": _wav_bytes(voice, rate), "path": "0.wav"}, {"bytes": b"RIFF not a wav", "path": "1.wav"}],
        "prompt": questions, "reference": ["Paris", "Shakespeare"]}).cast_column("audio", datasets.Audio()).to_parquet(str(data))
    task = "speech_voicebench_sdqa_usa_cascade"
    inc = tmp_path / "tasks"
    inc.mkdir()
    (inc / f"{task}.yaml").write_text(yaml.safe_dump({
        "include": str(Path(prompts.__file__).parent / "speech_voicebench_sdqa" / f"{task}.yaml"),
        "dataset_path": "parquet", "dataset_name": None, "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf")}}))
    lm = LSLM(pretrained=str(tiny_qwen2_audio_dir), device="cpu", batch_size=2)
    encoded = []
    real_encode = lm.tok_encode
    monkeypatch.setattr(lm, "tok_encode", lambda s, *a, **k: encoded.append(s) or real_encode(s, *a, **k))
    out = simple_evaluate(model=lm, tasks=[task], task_manager=TaskManager(include_path=str(inc)),
                          gen_kwargs="max_gen_toks=4", log_samples=True)
    rows = {r["doc_id"]: r for r in out["samples"][task]}
    transcript = rows[0]["asr_transcript"]
    assert word_error_rate(questions[0], transcript) < 0.5  # Whisper heard the espeak question
    assert rows[0]["asr_wer"] == pytest.approx(word_error_rate(questions[0], transcript))
    assert f"Question: {transcript}\nAnswer:" in encoded  # the generation prompt held the transcript ...
    assert not any("<audio>" in s or lm.backend_impl.audio_placeholder in s for s in encoded)  # ... and no audio
    assert rows[0]["contains_proxy"] == prompts.sdqa_process_results(rows[0]["doc"], rows[0]["filtered_resps"])["contains_proxy"]
    assert rows[1]["audio_failed"] and "contains_proxy" not in rows[1] and "asr_wer" not in rows[1]
    res = out["results"][task]
    assert res["audio_failed,none"] == 1 and res["asr_wer,none"] == pytest.approx(rows[0]["asr_wer"])
    assert out["configs"][task]["metadata"]["modality"] == "cascade"


def test_a_base_run_with_other_or_fewer_items_is_refused_or_noted(tmp_path):
    """``--base`` matched items by doc id alone: a base run of other items (other targets) gave a
    forgetting figure over different questions, and items missing there changed n without a word."""
    from lmeval_speech.report import report

    run = _hand_run

    lslm = report.load_run(run(tmp_path / "lslm", {"speech_toy_a_text": ("text", [1, 1, 0, 1, 0, 1]),
                                                  "speech_toy_a_speech": ("speech", [0, 0, 0, 1, 0, 1]),
                                                  "speech_toy_a_cascade": ("cascade", [1, 0, 0, 1, 0, 1])}))
    other = run(tmp_path / "other", {"speech_toy_a_text": ("text", [1] * 6)}, target=lambda d: str((d + 1) % 4))
    with pytest.raises(ValueError, match="--base run's speech_toy_a_text is not this run's items: doc 0 target '1'"):
        report.build_report(lslm, n_boot=200, base=report.load_run(other))
    fewer = run(tmp_path / "fewer", {"speech_toy_a_text": ("text", [1, 1, 1, 1])})
    rep, _ = report.build_report(lslm, n_boot=200, base=report.load_run(fewer))
    assert rep["decomposition"]["speech_toy_a"]["n"] == 4
    assert any("2 items not scored in the --base run's speech_toy_a_text" in n and "[4, 5]" in n for n in rep["notes"])


def test_the_cascade_transcribes_what_the_speech_twin_hears(tiny_qwen2_audio_dir, tmp_path, monkeypatch):
    """Under ``noise=...`` the cascade's ASR transcribed the clean clip while the speech twin heard
    the noisy one; and its transcript cache was keyed by the item's reference, which names no noise
    or voice override, so a sweep's later conditions read the first condition's transcripts."""
    from types import SimpleNamespace

    from lmeval_speech.audio import asr, spoken
    from lmeval_speech.models.lslm import LSLM

    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "cache"))
    heard = []

    class Whisper:  # stands in for faster-whisper: records what it is given
        def transcribe(self, array, **kw):
            heard.append(np.array(array))
            return [SimpleNamespace(text=f"transcript {len(heard)}")], None

    monkeypatch.setattr(asr, "_model", lambda name: Whisper())
    speech = spoken("What is the capital city of France?", **prompts.TTS)
    cascade = {"transcribe": speech, "asr": prompts.ASR}
    noisy = LSLM(pretrained=str(tiny_qwen2_audio_dir), device="cpu", noise="white", snr_db=0)
    status = noisy.audio._transcribe(cascade)
    array, notes = noisy.audio.load(speech)  # what the speech twin hears
    np.testing.assert_array_equal(heard[0], array)
    assert status.notes["noise"] == notes["noise"] == noisy.audio_settings.noise.to_dict()
    clean = LSLM(pretrained=str(tiny_qwen2_audio_dir), device="cpu")
    assert clean.audio._transcribe(cascade).transcript == "transcript 2"  # not the noisy clip's transcript
    np.testing.assert_array_equal(heard[1], clean.audio.load(speech)[0])
    gb = LSLM(pretrained=str(tiny_qwen2_audio_dir), device="cpu", tts_voice="en-gb")
    assert gb.audio._transcribe(cascade).transcript == "transcript 3"  # another voice, another transcript
    assert noisy.audio._transcribe(cascade).transcript == "transcript 1" and len(heard) == 3  # cached


def test_two_tasks_claiming_one_twin_are_refused(tmp_path):
    """A copied YAML renamed in ``task:`` only: both tasks claimed pair speech_toy_a's speech twin, the
    later one (sorted) was paired and the other vanished from the report without a word."""
    from lmeval_speech.report import report

    run = _hand_run(tmp_path / "run", {"speech_toy_a_text": ("text", [1, 1, 0, 1]),
                                       "speech_toy_a_speech": ("speech", [0, 0, 0, 1]),
                                       "speech_toy_a_speech_copy": ("speech", [1, 1, 1, 1])})
    with pytest.raises(ValueError, match="speech_toy_a_speech and speech_toy_a_speech_copy both claim"):
        report.load_run(run)


def test_a_base_run_is_read_under_the_pairs_own_filter_and_0_1_scores(tmp_path):
    """``--base`` read the base run's ``filter == "none"`` rows whatever filter the pair was scored
    under (a generation task's strict-match): every base item counted as "not scored" and forgetting
    vanished behind a note; and a score of 0.5 became "correct"."""
    from lmeval_speech.report import report

    def refilter(root, value=None):
        for f in root.rglob("samples_*.jsonl"):
            rows = [json.loads(line) for line in f.read_text().splitlines()]
            for r in rows:
                r["filter"] = "strict-match"
                if value is not None:
                    r["acc"] = value
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return root

    lslm = refilter(_hand_run(tmp_path / "lslm", {"speech_toy_a_text": ("text", [1, 1, 0, 1, 0, 1]),
                                                  "speech_toy_a_speech": ("speech", [0, 0, 0, 1, 0, 1]),
                                                  "speech_toy_a_cascade": ("cascade", [1, 0, 0, 1, 0, 1])}))
    base = refilter(_hand_run(tmp_path / "base", {"speech_toy_a_text": ("text", [1, 1, 1, 1, 0, 1])}))
    rep, _ = report.build_report(report.load_run(lslm), n_boot=200, base=report.load_run(base))
    d = rep["decomposition"]["speech_toy_a"]
    assert d["n"] == 6 and d["forgetting"]["gap"] == pytest.approx(1 / 6)
    cut = refilter(_hand_run(tmp_path / "cut", {"speech_toy_a_text": ("text", [1, 1, 1, 1, 0, 1])}))
    for f in cut.rglob("samples_*.jsonl"):  # the base run cut doc 1's prompt (a smaller max_length)
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        rows[1]["audio_truncated"] = "prompt cut: its first 3 of 40 tokens dropped to fit max_length=37"
        f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep, _ = report.build_report(report.load_run(lslm), n_boot=200, base=report.load_run(cut))
    assert rep["decomposition"]["speech_toy_a"]["n"] == 5
    assert any("1 items not scored in the --base run" in n and "1 of them failed or cut there" in n for n in rep["notes"])
    half = refilter(_hand_run(tmp_path / "half", {"speech_toy_a_text": ("text", [1] * 6)}), value=0.5)
    with pytest.raises(ValueError, match="not 0/1"):
        report.build_report(report.load_run(lslm), n_boot=200, base=report.load_run(half))


def test_a_text_only_models_cascade_transcribes_the_whole_clip(tiny_llama_dir, tiny_qwen2_audio_dir, tmp_path,
                                                               monkeypatch):
    """A text LLM + ASR baseline has no speech twin whose audio limit the ASR should match: a 40 s
    clip is transcribed whole (a speech LLM's cascade hears what its speech twin hears: here 30 s, marked)."""
    from types import SimpleNamespace

    from lmeval_speech.audio import asr
    from lmeval_speech.models.lslm import LSLM

    monkeypatch.setenv("LMEVAL_SPEECH_CACHE", str(tmp_path / "cache"))
    heard = []

    class Whisper:
        def transcribe(self, array, **kw):
            heard.append(len(array))
            return [SimpleNamespace(text="words")], None

    monkeypatch.setattr(asr, "_model", lambda name: Whisper())
    clip = {"array": (0.1 * np.sin(np.arange(40 * 16000) / 7)).astype(np.float32), "sampling_rate": 16000}
    cascade = {"transcribe": clip, "asr": prompts.ASR}
    text_only = LSLM(pretrained=str(tiny_llama_dir), device="cpu").audio._transcribe(cascade)
    speech = LSLM(pretrained=str(tiny_qwen2_audio_dir), device="cpu", max_audio_seconds=30).audio._transcribe(cascade)
    assert heard == [40 * 16000, 30 * 16000]
    assert not text_only.truncated and speech.truncated.startswith("truncated 40.0s -> 30.0s")
