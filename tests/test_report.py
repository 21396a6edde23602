"""``lmeval-speech report`` on a synthetic run written in lm-eval's exact on-disk layout.

The run has two pairs whose per-item scores are fixed here, and a capture dir written with the
real ``CaptureWriter`` whose states are built so the expected numbers are known by hand:

* ``speech_toy_a`` (12 items, pooled + token states):
  docs 0-5: speech states identical to text -> cosine 1, distance 0, APS 1, monotonicity 1;
  docs 6-11: pooled text 3*e0 vs speech 4*e1 -> cosine 0, distance 5; text token j = e_j,
  speech position i = (e_i + e_{i+4}) / sqrt(2) plus two unrelated positions -> APS 1/sqrt(2),
  identity path, monotonicity 1.
* ``speech_toy_b`` (8 items): docs 0-5 pooled-only and identical (cosine 1), docs 6-7 not captured.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil

import numpy as np
import pytest
from scipy import stats

from lmeval_speech.capture.store import CaptureWriter
from lmeval_speech.report import report
from lmeval_speech.runs import UnpairedError, load_run, pair_items

STAMP, OLD_STAMP = "2025-03-04T05-06-07.123456", "2025-01-02T03-04-05.000001"
N_STATES, TOKEN_LAYERS, D = 5, [0, 2, 4], 16
CORRECT = {  # (text, speech) per doc id
    "speech_toy_a": ([1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1], [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1]),
    "speech_toy_b": ([1, 1, 0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0, 0, 1]),
}
TTS = {"engine": "espeak-ng", "voice": "en-us", "rate": 160, "sample_rate": 16000}


def _config(task: str, pair: str, modality: str) -> dict:
    meta = {"version": 1.0, "modality": modality, "pair": pair}
    prompt = "Question: {{question.strip()}}\nAnswer:"
    if modality == "speech":
        prompt = "Question: <audio>\nAnswer:"
        meta |= {"prompt": prompt, "tts": TTS, "spoken": "{question}"}
    return {"task": task, "output_type": "multiple_choice", "doc_to_text": prompt,
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metadata": meta}


def _sample(doc_id: int, correct: int, target: str | None = None) -> dict:
    """One samples_*.jsonl row as lm-eval's EvaluationTracker.save_results_samples writes it."""
    gold = doc_id % 4
    ctx = f"Question: q{doc_id}\nAnswer:"
    return {"doc_id": doc_id, "doc": {"question": f"q{doc_id}", "choices": list("wxyz"), "answer": gold},
            "target": str(gold) if target is None else target,
            "arguments": {f"gen_args_{i}": {"arg_0": ctx, "arg_1": f" {c}"} for i, c in enumerate("wxyz")},
            "resps": [[["-1.0", "False"]]] * 4, "filtered_resps": [["-1.0", "False"]] * 4, "filter": "none",
            "metrics": ["acc", "acc_norm"], "doc_hash": "d", "prompt_hash": "p", "target_hash": "t",
            "acc": float(correct), "acc_norm": float(correct)}


def write_run(out, model_args: str, correct=CORRECT, stamp=STAMP, extra_tasks=()) -> dict:
    """OUT/<model>/results_<stamp>.json + samples_<task>_<stamp>.jsonl; returns {task: rows}."""
    model_dir = out / "lslm__mini"
    model_dir.mkdir(parents=True, exist_ok=True)
    rows, configs = {}, {}
    for pair, (text, speech) in correct.items():
        for modality, scores in (("text", text), ("speech", speech)):
            task = f"{pair}_{modality}"
            configs[task] = _config(task, pair, modality)
            rows[task] = [_sample(d, c) for d, c in enumerate(scores)]
    for task in extra_tasks:
        configs[task] = _config(task, task.removesuffix("_text"), "text")
        rows[task] = [_sample(0, 1)]
    for task, task_rows in rows.items():
        write_samples(model_dir / f"samples_{task}_{stamp}.jsonl", task_rows)
    results = {
        "results": {t: {"alias": t, "acc,none": float(np.mean([r["acc"] for r in rs]))} for t, rs in rows.items()},
        "configs": configs, "versions": {t: 1.0 for t in rows},
        "n-samples": {t: {"original": len(rs), "effective": len(rs)} for t, rs in rows.items()},
        "config": {"model": "lslm", "model_args": model_args, "batch_size": 1, "limit": None},
        "git_hash": None, "date": 1741064767.0, "lm_eval_version": "0.4.13", "model_name": "lslm",
        "model_name_sanitized": "lslm__mini",
    }
    (model_dir / f"results_{stamp}.json").write_text(json.dumps(results, indent=2))
    return rows


def write_samples(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _unit(i: int) -> np.ndarray:
    e = np.zeros(D, dtype=np.float32)
    e[i] = 1.0
    return e


def write_capture(root, identity=None, conditions=None) -> None:
    rng = np.random.default_rng(0)
    writer = CaptureWriter(root, shard_size=7, meta={"pretrained": "mini", "mode": "tokens",
                                                     "n_hidden_states": N_STATES, "token_layers": TOKEN_LAYERS},
                           identity=identity, conditions=conditions)

    def add(task, pair, modality, doc_id, pooled, tokens=None):
        tensors = {"pooled": pooled.astype(np.float32)}
        if tokens is not None:
            tensors["tokens"] = np.stack([tokens] * len(TOKEN_LAYERS)).astype(np.float16)
        writer.add({"task": task, "pair": pair, "modality": modality, "doc_id": doc_id,
                    "n_positions": len(pooled), "token_layers": TOKEN_LAYERS if tokens is not None else [],
                    "audio": None}, tensors)

    for d in range(12):
        if d < 6:
            pooled_t = pooled_s = rng.standard_normal((N_STATES, D))
            tok_t = tok_s = rng.standard_normal((5, D))
        else:
            pooled_t, pooled_s = np.tile(3 * _unit(0), (N_STATES, 1)), np.tile(4 * _unit(1), (N_STATES, 1))
            tok_t = np.stack([_unit(j) for j in range(4)])
            tok_s = np.stack([(_unit(i) + _unit(i + 4)) / math.sqrt(2) for i in range(4)] + [_unit(8), _unit(9)])
        add("speech_toy_a_text", "speech_toy_a", "text", d, pooled_t, tok_t)
        add("speech_toy_a_speech", "speech_toy_a", "speech", d, pooled_s, tok_s)
    for d in range(6):
        pooled = rng.standard_normal((N_STATES, D))
        add("speech_toy_b_text", "speech_toy_b", "text", d, pooled)
        add("speech_toy_b_speech", "speech_toy_b", "speech", d, pooled)
    writer.flush()


def run_report(*argv) -> int:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.main(parser.parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """A captured run plus an older run in the same folder that the report must ignore."""
    tmp = tmp_path_factory.mktemp("report")
    cap = tmp / "cap"
    write_capture(cap)
    out = tmp / "out"
    write_run(out, f"pretrained=mini,capture=tokens,capture_dir={cap}", extra_tasks=["speech_toy_c_text"])
    write_run(out, "pretrained=old", correct={"speech_toy_a": ([1] * 3, [1] * 3)}, stamp=OLD_STAMP)
    assert run_report(out, "--n-boot", 2000) == 0
    rep = json.loads((out / "gap_report" / "report.json").read_text())
    return out, rep


def test_gap_matches_hand_counts_and_uses_the_latest_run(full):
    out, rep = full
    assert rep["schema_version"] == 2
    assert rep["run"]["timestamp"] == STAMP and rep["run"]["model_args_parsed"]["pretrained"] == "mini"
    assert rep["run"]["tasks"]["speech_toy_a_speech"]["tts"] == TTS
    assert rep["run"]["unpaired_tasks"] == ["speech_toy_c_text"]
    a, b = rep["pairs"]["speech_toy_a"], rep["pairs"]["speech_toy_b"]
    assert (a["n"], a["text_acc"], a["speech_acc"]) == (12, 10 / 12, 6 / 12)
    assert a["table"] == {"both_right": 6, "text_only": 4, "speech_only": 0, "both_wrong": 2}
    assert b["gap"] == pytest.approx(1 / 8) and b["table"]["speech_only"] == 1
    ov = rep["overall"]
    assert (ov["n"], ov["n_pairs"]) == (20, 2)
    assert ov["gap"] == pytest.approx(5 / 20) == pytest.approx(ov["weighted_mean"]["gap"])
    assert ov["macro_mean"]["gap"] == pytest.approx((4 / 12 + 1 / 8) / 2)
    for g in (a, b, ov):
        assert g["ci_low"] <= g["gap"] <= g["ci_high"]
    # McNemar exact on the discordant pairs (4 text-only, 0 speech-only): p = 2 * 0.5**4
    assert a["mcnemar"]["p"] == pytest.approx(2 * 0.5**4)


def test_pooled_similarity_is_known_by_construction(full):
    _, rep = full
    sim = rep["similarity"]
    assert sim["layers"] == list(range(N_STATES)) and sim["n_items"] == 18
    # 12 items with cosine 1 (a 0-5, b 0-5) and 6 with cosine 0; distances 0 and 5.
    np.testing.assert_allclose(sim["cosine_mean"], 12 / 18, atol=1e-6)
    np.testing.assert_allclose(sim["cosine_std"], np.std([1] * 12 + [0] * 6), atol=1e-6)
    np.testing.assert_allclose(sim["euclidean_mean"], 30 / 18, atol=1e-5)
    assert sim["S_cos"] == pytest.approx(2 / 3, abs=1e-6) and sim["S_euc"] == pytest.approx(5 / 3, abs=1e-5)
    assert rep["pairs"]["speech_toy_b"]["similarity"] == {"S_cos": pytest.approx(1.0, abs=1e-6),
                                                           "S_euc": pytest.approx(0, abs=1e-5), "n_items": 6}
    items = {(r["pair"], r["doc_id"]): r for r in rep["items"]}
    assert items[("speech_toy_a", 0)]["cosine"] == pytest.approx(1, abs=1e-6)
    assert items[("speech_toy_a", 7)]["euclidean"] == pytest.approx(5)
    assert items[("speech_toy_b", 7)]["cosine"] is None
    assert any("2 of 20 paired items lack" in n for n in rep["notes"])


def test_aps_monotonicity_and_critical_tokens(full):
    _, rep = full
    al = rep["alignment"]
    assert (al["measure"], al["path"], al["layers"], al["n_items"]) == ("cosine", "argmax", TOKEN_LAYERS, 12)
    items = {(r["pair"], r["doc_id"]): r for r in rep["items"]}
    assert items[("speech_toy_a", 3)]["aps"] == pytest.approx(1, abs=1e-3)  # float16 tokens
    assert items[("speech_toy_a", 9)]["aps"] == pytest.approx(1 / math.sqrt(2), abs=1e-3)
    assert al["aps"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-3)
    np.testing.assert_allclose(al["aps_per_layer"], al["aps"], atol=1e-6)
    assert al["monotonicity"] == pytest.approx(1)
    assert rep["pairs"]["speech_toy_b"]["alignment"] is None
    # Default item: the lowest APS, the first of docs 6-11; all four text tokens score equally
    # on the identity path, so the Bottom-3 are the lowest three positions.
    item = al["item"]
    assert (item["pair"], item["doc_id"], item["chosen_by"], item["layer"]) == ("speech_toy_a", 6, "lowest APS", 4)
    assert (item["n_speech"], item["n_text"]) == (6, 4)
    assert [c["positions"] for c in item["critical_tokens"]] == [[0, 1, 2]] * 3
    assert item["critical_tokens"][0]["text_tokens"] == [[0], [1], [2]]


def test_correlation_is_computed_over_captured_items(full):
    _, rep = full
    corr = rep["correlation"]
    only = {p: (np.array(t) == 1) & (np.array(s) == 0) for p, (t, s) in CORRECT.items()}
    y = np.concatenate([only["speech_toy_a"], only["speech_toy_b"][:6]]).astype(float)
    cosine = np.array([1.0] * 6 + [0.0] * 6 + [1.0] * 6)
    assert (corr["n_items"], corr["n_speech_only_errors"]) == (18, int(y.sum()))
    expected = stats.pointbiserialr(y, cosine)
    assert corr["cosine"]["point_biserial"]["n"] == 18
    assert corr["cosine"]["point_biserial"]["r"] == pytest.approx(expected.statistic, abs=1e-6)
    assert corr["cosine"]["logistic"]["n"] == 18 and corr["cosine"]["logistic"]["note"] is None
    aps = np.array([1.0] * 6 + [1 / math.sqrt(2)] * 6)
    assert corr["aps"]["point_biserial"]["n"] == 12
    assert corr["aps"]["point_biserial"]["r"] == pytest.approx(stats.pointbiserialr(y[:12], aps).statistic, abs=1e-3)


def test_markdown_and_plots_are_written(full, capsys):
    out, rep = full
    folder = out / "gap_report"
    plots = rep["files"]["plots"]
    assert plots == {"gap": "gap.png", "layers": "layers.png", "cka": "cka.png",
                     "alignment": "alignment_speech_toy_a_6.png"}
    for name in ["report.md", *plots.values()]:
        assert (folder / name).stat().st_size > 1000, name
    md = (folder / "report.md").read_text()
    assert "## How to read this" in md and "| speech_toy_a | 12 |" in md and "S_cos = 0.667" in md
    assert not list(folder.glob(".*.tmp"))


def test_dtw_euclidean_and_chosen_item(full, tmp_path, capsys):
    out, _ = full
    dest = tmp_path / "r"
    assert run_report(out, "--out", dest, "--path", "dtw", "--measure", "euclidean",
                      "--item", "speech_toy_a:0", "--layer", "2", "--n-boot", 200) == 0
    assert "speech_toy_a" in capsys.readouterr().out
    al = json.loads((dest / "report.json").read_text())["alignment"]
    # identical states: distance 0; docs 6-11: |(e_i + e_{i+4})/sqrt2 - e_i| = sqrt(2 - sqrt2)
    assert al["aps"] == pytest.approx(-math.sqrt(2 - math.sqrt(2)) / 2, abs=1e-3)
    assert al["monotonicity"] == pytest.approx(1)
    assert (al["item"]["doc_id"], al["item"]["chosen_by"], al["item"]["layer"]) == (0, "--item", 2)
    assert (dest / "alignment_speech_toy_a_0.png").stat().st_size > 1000


def test_without_capture_sections_are_omitted(tmp_path, capsys):
    write_run(tmp_path, "pretrained=mini")
    assert run_report(tmp_path / "lslm__mini", "--n-boot", 200, "--item", "speech_toy_a:1") == 0
    rep = json.loads((tmp_path / "lslm__mini" / "gap_report" / "report.json").read_text())
    assert rep["similarity"] is rep["alignment"] is rep["correlation"] is None
    assert rep["overall"]["gap"] == pytest.approx(0.25)
    assert any("no capture" in n for n in rep["notes"])
    assert rep["files"]["plots"] == {"gap": "gap.png"}
    assert "Omitted" in (tmp_path / "lslm__mini" / "gap_report" / "report.md").read_text()
    assert run_report(tmp_path, "--item", "speech_toy_a:99") == 2
    assert "not a paired item" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_report(tmp_path, "--item", "speech_toy_a")


def test_mismatched_target_is_refused_with_the_doc_id(tmp_path, capsys):
    rows = write_run(tmp_path, "pretrained=mini")
    speech = rows["speech_toy_b_speech"]
    speech[3] = _sample(3, 1, target="2")
    write_samples(tmp_path / "lslm__mini" / f"samples_speech_toy_b_speech_{STAMP}.jsonl", speech)
    run = load_run(tmp_path)
    with pytest.raises(UnpairedError, match=r"speech_toy_b: .*doc 3 target '3' \(text\) vs '2' \(speech\)"):
        pair_items(run, "speech_toy_b")
    assert run_report(tmp_path) == 2
    assert "doc 3 target" in capsys.readouterr().err
    assert not (tmp_path / "gap_report").exists()


def test_mismatched_doc_ids_are_refused(tmp_path):
    rows = write_run(tmp_path, "pretrained=mini")
    text = rows["speech_toy_a_text"]
    write_samples(tmp_path / "lslm__mini" / f"samples_speech_toy_a_text_{STAMP}.jsonl",
                  text[:10] + [_sample(40, 1, target=text[10]["target"])])
    with pytest.raises(UnpairedError) as err:
        pair_items(load_run(tmp_path), "speech_toy_a")
    message = str(err.value)
    assert "11 items in text vs 12 in speech" in message
    assert "doc ids only in text: [40]" in message and "doc ids only in speech: [10, 11]" in message


def test_missing_samples_and_several_models_are_explained(tmp_path):
    write_run(tmp_path, "pretrained=mini")
    shutil.copytree(tmp_path / "lslm__mini", tmp_path / "other_model")
    with pytest.raises(ValueError, match="several models"):
        load_run(tmp_path)
    (tmp_path / "other_model" / f"samples_speech_toy_a_text_{STAMP}.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="--log_samples"):
        load_run(tmp_path / "other_model")


def test_items_with_non_finite_states_are_excluded_and_counted(tmp_path):
    """A twin whose captured states hold NaN (a model that overflowed) is left out and counted in the
    report, its notes and its markdown: NaN pooled states -> out of similarity and alignment; NaN
    token states only -> out of alignment, its pooled similarity kept. Before, S_cos became NaN
    (argmax path) or the DTW path raised from inside dtw-python."""
    from lmeval_speech.report.compute import build_report
    from lmeval_speech.report.render import markdown
    from lmeval_speech.runs import load_run
    from lmeval_speech.report.schema import jsonable

    cap = tmp_path / "cap"
    rng = np.random.default_rng(1)
    writer = CaptureWriter(cap, shard_size=4, meta={"pretrained": "mini", "mode": "tokens",
                                                    "n_hidden_states": N_STATES, "token_layers": TOKEN_LAYERS})
    for d in range(5):
        for modality in ("text", "speech"):
            pooled, tokens = rng.standard_normal((N_STATES, D)), rng.standard_normal((len(TOKEN_LAYERS), 5, D))
            if d == 1 and modality == "speech":
                tokens[1, 3, 0] = np.nan  # token states only
            if d == 2 and modality == "text":
                pooled[4, 0] = np.inf  # pooled states
            writer.add({"task": f"speech_toy_a_{modality}", "pair": "speech_toy_a", "modality": modality, "doc_id": d,
                        "n_positions": N_STATES, "token_layers": TOKEN_LAYERS, "audio": None},
                       {"pooled": pooled.astype(np.float32), "tokens": tokens.astype(np.float16)})
    writer.flush()
    write_run(tmp_path / "out", f"pretrained=mini,capture=tokens,capture_dir={cap}",
              correct={"speech_toy_a": ([1, 1, 0, 1, 1], [1, 0, 0, 1, 0])})
    for path in ("argmax", "dtw"):
        rep, _ = build_report(load_run(tmp_path / "out"), n_boot=100, path=path)
        sim, al = rep["similarity"], rep["alignment"]
        assert (sim["n_items"], sim["excluded_non_finite"]) == (4, 1)
        assert (al["n_items"], al["excluded_non_finite"]) == (3, 2)
        assert np.isfinite(sim["S_cos"]) and np.isfinite(al["aps"])
        assert any(n.startswith("1 of 5 paired items have non-finite (NaN/inf) pooled") for n in rep["notes"])
        assert any(n.startswith("1 of 5 paired items have non-finite (NaN/inf) token-level") for n in rep["notes"])
        assert "1 items with NaN/inf states left out" in markdown(jsonable(rep))
        assert rep["correlation"]["n_items"] == 4


#: What ``lslm`` stamps a capture dir with (``model_identity``, ``conditions``) and writes into the results
#: file through ``get_model_info`` (model, settings, hooks), as a real run of the embedded model does.
IDENTITY = {"pretrained": "mini", "revision": None, "backend": "MiniBackend", "model_type": "lmeval_speech_mini",
            "dtype": "float32", "device": "cpu", "config_sha256": "ab" * 32, "adapter_sha256": "cd" * 32}
CONDITIONS = {"tts_override": None, "noise": None, "intervention": None, "audio_overflow": "truncate",
              "max_audio_seconds": 300.0, "max_length": 2048, "add_bos_token": None, "prefix_token_id": None,
              "spoken_form": 1}
SETTINGS = {"audio_overflow": "truncate", "max_audio_seconds": 300.0, "tts_override": None, "fail_fast": False,
            "noise": None, "max_length": 2048, "batch_size": 8, "spoken_form": 1}


def lslm_record(out, identity=IDENTITY, settings=SETTINGS, intervention=None) -> None:
    """Add ``lslm``'s ``get_model_info`` to the run's results file, as lm-eval writes it."""
    path = out / "lslm__mini" / f"results_{STAMP}.json"
    results = json.loads(path.read_text())
    results["config"]["lmeval_speech"] = {"model": identity, "settings": settings,
                                          "hooks": {"capture": None, "intervention": intervention}}
    path.write_text(json.dumps(results, indent=2))


def test_a_capture_of_another_model_or_condition_is_refused(tmp_path, capsys):
    """The report compared ``capture.json``'s top-level ``pretrained`` (never written there: the identity is
    under ``model``) and nothing else, so another checkpoint's or another condition's states gave S_cos,
    APS and correlations beside this run's scores, exit 0. Now the identity (all but the device) and the
    conditions the run records are compared, and a difference stops the report naming the fields."""
    noisy = {"kind": "white", "snr_db": 0.0, "seed": 0}
    intervention = {"kind": "angle", "layers": "input", "critical": "bottom3", "strength": 1.0, "mode": "oracle",
                    "calibration": None}
    cases = {
        "model": ({**IDENTITY, "pretrained": "modelA"}, CONDITIONS, "model.pretrained='modelA'"),
        "checkpoint": ({**IDENTITY, "config_sha256": "ef" * 32}, CONDITIONS, "model.config_sha256"),
        "adapter": ({**IDENTITY, "adapter_sha256": "01" * 32}, CONDITIONS, "model.adapter_sha256"),
        "noise": (IDENTITY, {**CONDITIONS, "noise": noisy}, "conditions.noise={'kind': 'white'"),
        "intervention": (IDENTITY, {**CONDITIONS, "intervention": intervention}, "conditions.intervention={'kind'"),
        "voice": (IDENTITY, {**CONDITIONS, "tts_override": {"voice": "en-gb"}}, "conditions.tts_override"),
        # a capture made before the TTS text rules changed heard other audio
        "spoken form": (IDENTITY, {**CONDITIONS, "spoken_form": 0}, "conditions.spoken_form=0"),
        # made before the rules existed (no record of them): it heard the symbols dropped
        "no spoken form": (IDENTITY, {k: v for k, v in CONDITIONS.items() if k != "spoken_form"},
                           "conditions.spoken_form=None"),
    }
    for name, (identity, conditions, named) in cases.items():
        cap, out = tmp_path / name / "cap", tmp_path / name / "out"
        write_capture(cap, identity, conditions)
        write_run(out, f"pretrained=mini,capture=tokens,capture_dir={cap}")
        lslm_record(out)
        assert run_report(out, "--n-boot", 200) == 2, name
        err = capsys.readouterr().err
        assert f"capture dir {cap} holds states of another model or run settings" in err and named in err, name
        assert not (out / "gap_report").exists(), name
        assert run_report(out, "--capture", cap, "--n-boot", 200) == 2, name  # named on the command line too
    # the other way round: the run was noisy and intervened, the capture clean
    cap, out = tmp_path / "clean" / "cap", tmp_path / "clean" / "out"
    write_capture(cap, IDENTITY, CONDITIONS)
    write_run(out, f"pretrained=mini,capture=tokens,capture_dir={cap}")
    lslm_record(out, settings={**SETTINGS, "noise": noisy},
                intervention={**intervention, "save_calibration": None, "hooks": {"edit": {}}})
    assert run_report(out, "--n-boot", 200) == 2
    err = capsys.readouterr().err
    assert "conditions.intervention=None, conditions.noise=None; this run has conditions.intervention=" in err


def test_the_runs_own_capture_matches_it_even_from_a_relative_capture_dir(tmp_path, monkeypatch, capsys):
    """The same run matches itself: a capture stamped on another device (one rank's ``cuda:0``) and the intervention as the capture keeps it
    (without where its calibration was saved or its hook sites). A relative ``capture_dir`` is read from
    the current folder: from another folder holding another run's ``cap/``, the report refuses it."""
    intervention = {"kind": "angle", "layers": "input", "critical": "bottom3", "strength": 1.0, "mode": "oracle",
                    "calibration": None}
    monkeypatch.chdir(tmp_path)
    write_capture(tmp_path / "cap", {**IDENTITY, "device": "cuda:0"}, {**CONDITIONS, "intervention": intervention})
    out = tmp_path / "out"
    write_run(out, "pretrained=mini,capture=tokens,capture_dir=cap")
    lslm_record(out, intervention={**intervention, "save_calibration": "calib.json",
                                   "hooks": {"edit": {"kind": "edit", "layers": [0]}}})
    assert run_report(out, "--n-boot", 200) == 0
    rep = json.loads((out / "gap_report" / "report.json").read_text())
    assert rep["similarity"]["S_cos"] == pytest.approx(2 / 3, abs=1e-6) and rep["run"]["capture_dir"] == "cap"
    assert not any("not checked" in n or "only pretrained" in n for n in rep["notes"])
    elsewhere = tmp_path / "elsewhere"
    write_capture(elsewhere / "cap", {**IDENTITY, "pretrained": "other/checkpoint-500"}, CONDITIONS)
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert run_report(out, "--out", tmp_path / "r2", "--n-boot", 200) == 2
    assert "model.pretrained='other/checkpoint-500'" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
