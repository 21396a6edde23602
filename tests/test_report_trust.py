"""The report on runs it did not make itself: a user's own task YAMLs (lm-eval's default scoring, no
flags), pairs scored by different metrics, VoiceBench's Overall over items valid in both twins.
Each test here failed on the code before its fix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_report import STAMP, write_run

from lmeval_speech.manifest import build_manifest
from lmeval_speech.outcomes import Scored
from lmeval_speech.report.compute import build_report
from lmeval_speech.runs import load_run, pair_items

def _logged(value):
    """A log-likelihood response as lm-eval's sample log holds it (``sanitize_list`` of (value, greedy))."""
    from lm_eval.utils import sanitize_list

    return sanitize_list([(value, False)])[0][0]


FAILED = _logged(Scored(math.nan, failed="AudioDecodeError: not a RIFF file"))
CUT = _logged(Scored(-2.5, truncated="cut to 30.0 s (was 31.0 s)"))


def _rewrite(model_dir, task, edit) -> None:
    path = model_dir / f"samples_{task}_{STAMP}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        edit(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_failed_audio_in_a_user_task_without_flags_is_excluded_not_scored(tmp_path):
    """A user's speech twin scored by lm-eval's default multiple-choice ``process_results``: an item
    whose audio failed gets NaN log-likelihoods, ``argmax`` makes that choice 0 and the item is
    "right" when the gold is 0. Its logged responses say it failed: left out, counted, in the manifest."""
    text = [1] * 8
    speech = [1, 1, 1, 1, 0, 0, 0, 0]
    write_run(tmp_path, "pretrained=mini", correct={"speech_user": (text, speech)})
    model_dir = tmp_path / "lslm__mini"

    def edit(r):
        if r["doc_id"] in (4, 5, 6, 7):  # broken recordings: NaN for every choice, acc from argmax(NaN) = 0
            r["resps"] = [[[FAILED, "False"]]] * 4
            r["filtered_resps"] = [[FAILED, "False"]] * 4
            r["acc"] = r["acc_norm"] = float(r["doc"]["answer"] == 0)
        if r["doc_id"] == 3:
            r["resps"] = [[[CUT, "False"]]] * 4
    _rewrite(model_dir, "speech_user_speech", edit)
    run = load_run(tmp_path)
    it = pair_items(run, "speech_user")
    assert it["doc_ids"] == [0, 1, 2]
    assert it["excluded"] == {"audio_failed": 4, "audio_truncated": 1}
    assert it["speech_correct"].tolist() == [True, True, True]
    rep, _ = build_report(run, n_boot=200)
    assert rep["overall"]["n"] == 3 and rep["overall"]["gap"] == 0.0
    failures = rep["manifest"]["tasks"]["speech_user_speech"]["failures"]
    assert failures == dict.fromkeys(["4", "5", "6", "7"], "AudioDecodeError: not a RIFF file")
    assert pair_items(run, "speech_user", include_truncated=True)["doc_ids"] == [0, 1, 2, 3]
    assert build_manifest(run)["tasks"]["speech_user_speech"]["truncations"] == {"3": "cut to 30.0 s (was 31.0 s)"}


def test_a_plain_nan_log_likelihood_is_not_a_score(tmp_path):
    write_run(tmp_path, "pretrained=x", correct={"speech_user": ([1, 1, 1, 1], [1, 1, 1, 1])})
    _rewrite(tmp_path / "lslm__mini", "speech_user_speech",
             lambda r: r.update(resps=[[["nan", "False"]]] * 4) if r["doc_id"] == 0 else None)
    it = pair_items(load_run(tmp_path), "speech_user")
    assert it["doc_ids"] == [1, 2, 3] and it["excluded"] == {"audio_failed": 1}


def test_a_generation_twin_that_does_not_count_failed_audio_is_refused(tmp_path):
    """A failed audio generates nothing; a process_results without lmeval_speech's flags scores that
    as a wrong answer, and the log cannot tell it from a real empty answer: one clear error."""
    write_run(tmp_path, "pretrained=x", correct={"speech_open": ([1, 0, 1], [1, 0, 0])})
    model_dir = tmp_path / "lslm__mini"
    results_file = model_dir / f"results_{STAMP}.json"
    results = json.loads(results_file.read_text())
    for twin in ("text", "speech"):
        results["configs"][f"speech_open_{twin}"]["output_type"] = "generate_until"

    def as_generation(r):
        r.update(resps=[[""]], filtered_resps=[""], metrics=["exact_match"], exact_match=r["acc"])
        del r["acc"], r["acc_norm"]
    for twin in ("text", "speech"):
        _rewrite(model_dir, f"speech_open_{twin}", as_generation)
    results_file.write_text(json.dumps(results))
    with pytest.raises(ValueError, match="speech_open_speech: a generation twin that hears audio logs no per-item audio_failed"):
        pair_items(load_run(tmp_path), "speech_open")

    def flagged(r):
        r["metrics"] += ["audio_failed", "audio_truncated"]
        r.update(audio_failed="", audio_truncated="")
    _rewrite(model_dir, "speech_open_speech", flagged)
    it = pair_items(load_run(tmp_path), "speech_open")
    assert it["metric"] == "exact_match" and np.array_equal(it["speech_correct"], [True, False, False])


def test_pairs_scored_by_different_metrics_are_never_pooled_together(tmp_path):
    """VoiceBench's pairs are scored by acc, refusal_rate, prompt_level_strict_acc, contains_proxy:
    one "overall" over all of them mixed a refusal rate into an accuracy (and ``check`` gated on it)."""
    write_run(tmp_path, "pretrained=x", correct={"speech_qa": ([1, 1, 0, 0], [1, 0, 0, 0]),
                                                 "speech_harm": ([1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0])})

    def as_refusal(r):
        r.update(metrics=["refusal_rate"], refusal_rate=r.pop("acc"))
        del r["acc_norm"]
    for twin in ("text", "speech"):
        _rewrite(tmp_path / "lslm__mini", f"speech_harm_{twin}", as_refusal)
    rep, _ = build_report(load_run(tmp_path), n_boot=200)
    ov = rep["overall"]
    assert (ov["metric"], ov["n"], ov["n_pairs"], ov["pairs_pooled"]) == ("acc", 4, 1, ["speech_qa"])
    assert (ov["text_acc"], ov["speech_acc"], ov["gap"]) == (0.5, 0.25, 0.25)
    harm = ov["by_metric"]["refusal_rate"]
    assert (harm["n"], harm["text_acc"], harm["speech_acc"], harm["pairs_pooled"]) == (6, 1.0, 0.0, ["speech_harm"])
    assert any("never pooled together" in n for n in rep["notes"])
    from lmeval_speech.report.render import markdown

    md = markdown(rep)
    assert "**overall (pooled, acc)** | 4 |" in md and "**pooled, refusal_rate** | 6 |" in md
    assert "| speech_harm (refusal_rate) | 6 |" in md


def test_voicebench_terms_are_means_over_items_valid_in_both_twins(tmp_path):
    """One unreadable recording in OpenBookQA's speech twin: lm-eval's speech acc is over the 9 items
    it scored, its text acc over all 10; the pair's gap (9 items) is 0, and so must be the subset's."""
    write_run(tmp_path, "pretrained=x", correct={"speech_voicebench_openbookqa": ([1] * 5 + [0] * 5, [1] * 5 + [0] * 5)})
    model_dir = tmp_path / "lslm__mini"

    def fail_first(r):
        if r["doc_id"] == 0:
            r.update(metrics=["audio_failed", "audio_truncated"], audio_failed="AudioDecodeError", audio_truncated="")
            del r["acc"], r["acc_norm"]
    _rewrite(model_dir, "speech_voicebench_openbookqa_speech", fail_first)
    results_file = model_dir / f"results_{STAMP}.json"
    results = json.loads(results_file.read_text())
    results["results"]["speech_voicebench_openbookqa_speech"]["acc,none"] = 4 / 9  # what lm-eval aggregates
    results_file.write_text(json.dumps(results))
    rep, _ = build_report(load_run(tmp_path), n_boot=200)
    assert rep["pairs"]["speech_voicebench_openbookqa"]["n"] == 9
    assert rep["pairs"]["speech_voicebench_openbookqa"]["gap"] == 0.0
    obqa = rep["voicebench"]["subsets"]["openbookqa"]
    assert obqa["text"] == pytest.approx(400 / 9) and obqa["speech"] == pytest.approx(400 / 9) and obqa["gap"] == 0.0


def test_a_pair_with_no_valid_item_is_left_out_and_named(tmp_path):
    """Every clip of one pair over the model's limit: that pair has no gap; the others are reported
    (it used to stop the whole report with "no items", naming neither the pair nor the reason)."""
    write_run(tmp_path, "pretrained=x", correct={"speech_ok": ([1, 1, 0], [1, 0, 0]), "speech_long": ([1, 1], [1, 1])})

    def fail(r):
        r.update(metrics=["audio_failed", "audio_truncated"], audio_failed="AudioRequestError: 45 s > 30 s",
                 audio_truncated="")
        del r["acc"], r["acc_norm"]
    _rewrite(tmp_path / "lslm__mini", "speech_long_speech", fail)
    rep, _ = build_report(load_run(tmp_path), n_boot=200)
    assert list(rep["pairs"]) == ["speech_ok"] and rep["overall"]["n"] == 3
    assert rep["run"]["pairs_without_items"] == {"speech_long": {"audio_failed": 2}}
    assert any("speech_long: {'audio_failed': 2}" in n for n in rep["notes"])
    _rewrite(tmp_path / "lslm__mini", "speech_ok_speech", fail)
    with pytest.raises(ValueError, match=r"no item is valid in both twins of any pair.*speech_ok: \{'audio_failed': 3\}"):
        build_report(load_run(tmp_path), n_boot=200)


def test_controls_and_cascade_with_no_valid_item_are_left_out_and_named(tmp_path):
    """A shuffled control whose every clip failed, and a cascade twin whose every item failed (it logs
    its ASR transcript beside the flags, which must not be taken for its score): the report names
    them instead of stopping with "no items" or "scored differently"."""
    from test_report import _config, _sample, write_samples

    model_dir = tmp_path / "lslm__m"
    model_dir.mkdir()
    stamp = "2025-01-01T00-00-00.000001"
    tasks = {"speech_toy_a_text": ("text", [1, 1, 0, 1]), "speech_toy_a_speech": ("speech", [1, 0, 0, 1]),
             "speech_toy_a_shuffled": ("shuffled", [0, 0, 0, 1]), "speech_toy_a_cascade": ("cascade", [1, 1, 0, 1])}
    configs = {}
    for task, (modality, scores) in tasks.items():
        configs[task] = _config(task, "speech_toy_a", "speech" if modality != "text" else "text")
        configs[task]["metadata"]["modality"] = modality
        rows = [_sample(d, c) for d, c in enumerate(scores)]
        if modality in ("shuffled", "cascade"):
            for r in rows:
                del r["acc"], r["acc_norm"]
                r.update(metrics=["audio_failed", "audio_truncated"] + (["asr_transcript"] if modality == "cascade" else []),
                         audio_failed="TTSError", audio_truncated="", asr_transcript="")
        write_samples(model_dir / f"samples_{task}_{stamp}.jsonl", rows)
    (model_dir / f"results_{stamp}.json").write_text(json.dumps(
        {"results": {t: {} for t in tasks}, "configs": configs, "config": {"model": "lslm", "model_args": "pretrained=m"}}))
    rep, _ = build_report(load_run(tmp_path), n_boot=200)
    assert rep["overall"]["n"] == 4 and rep["controls"] is None and rep["decomposition"] is None
    notes = " | ".join(rep["notes"])
    assert "no item valid in both the speech twin and the shuffled control" in notes
    assert "no item valid in the text, speech and cascade twins" in notes


def test_pooled_hearing_never_mixes_metrics(tmp_path):
    from test_report import _config, _sample, write_samples

    model_dir = tmp_path / "lslm__m"
    model_dir.mkdir()
    stamp = "2025-01-01T00-00-00.000001"
    configs = {}
    for pair, metric in (("speech_qa", "acc"), ("speech_qb", "acc"), ("speech_harm", "refusal_rate")):
        for modality, scores in (("text", [1, 1, 1, 1]), ("speech", [1, 1, 0, 0]), ("shuffled", [0, 0, 0, 0])):
            task = f"{pair}_{modality}"
            configs[task] = _config(task, pair, "speech" if modality != "text" else "text")
            configs[task]["metadata"]["modality"] = modality
            rows = [_sample(d, c) for d, c in enumerate(scores if metric == "acc" else [1 - c for c in scores])]
            if metric != "acc":
                for r in rows:
                    r.update(metrics=[metric], refusal_rate=r.pop("acc"))
                    del r["acc_norm"]
            write_samples(model_dir / f"samples_{task}_{stamp}.jsonl", rows)
    (model_dir / f"results_{stamp}.json").write_text(json.dumps(
        {"results": {t: {} for t in configs}, "configs": configs, "config": {"model": "lslm", "model_args": "pretrained=m"}}))
    rep, _ = build_report(load_run(tmp_path), n_boot=200)
    pooled = rep["controls"]["overall (pooled)"]["shuffled"]
    assert (pooled["n"], pooled["metric"], pooled["hearing"]) == (8, "acc", 0.5)  # the refusal pair would add -0.5
    assert rep["controls"]["speech_harm"]["shuffled"]["metric"] == "refusal_rate"
    assert any("pools the pairs scored by acc only (not ['speech_harm'])" in n for n in rep["notes"])


def test_an_mmsu_domain_with_no_valid_item_adds_nothing_to_the_pooled_term():
    """Every clip of one MMSU domain unreadable: that domain has no items valid in both twins; the
    term pools the other eleven (it used to lose the MMSU term and so the Overall)."""
    from lmeval_speech.report.voicebench import MMSU_DOMAINS, voicebench_overall

    results = {f"speech_voicebench_mmsu_{d}_{t}": ({"acc,none": 0.5, "sample_len": 10} if i else {"sample_len": 0})
               for i, d in enumerate(MMSU_DOMAINS) for t in ("text", "speech")}
    assert voicebench_overall(results)["subsets"]["mmsu"] == pytest.approx({"text": 50.0, "speech": 50.0, "gap": 0.0})
    del results["speech_voicebench_mmsu_law_text"]  # a domain not run at all: no term
    assert voicebench_overall(results)["subsets"]["mmsu"]["text"] is None
