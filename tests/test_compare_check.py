"""``lmeval-speech compare`` and ``check`` through the CLI, on synthetic runs in lm-eval's layout.

Runs ``a``, ``b``, ``c`` share every setting and differ in scores and captured states: speech states
are ``cos(t) e_i + sin(t) e_{i+4}`` against text ``e_i``, so S_cos = APS = cos(t) by construction.
``voice`` re-voices the speech twins through ``tts_voice=`` in model_args; ``limit`` scores only
the first 8 items of each task with ``--limit 8``.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from lmeval_speech.capture.store import CaptureWriter
from lmeval_speech.cli import main as cli
from test_report import CORRECT, SETTINGS, STAMP, lslm_record, write_run

N_STATES, TOKEN_LAYERS, D = 3, [0, 2], 12
SCORES = {
    "a": CORRECT,
    "b": {"speech_toy_a": (CORRECT["speech_toy_a"][0], [0] * 12), "speech_toy_b": CORRECT["speech_toy_b"]},
    "c": {p: (t, t) for p, (t, _) in CORRECT.items()},
}
THETA = {"a": 0.6, "b": 1.1, "c": 0.2}


def _unit(i: int) -> np.ndarray:
    e = np.zeros(D, dtype=np.float32)
    e[i] = 1.0
    return e


def write_capture(root, theta: float) -> None:
    """Every paired item captured (pooled); pair ``speech_toy_a`` with tokens too."""
    c, s = math.cos(theta), math.sin(theta)
    writer = CaptureWriter(root, meta={"pretrained": "mini", "mode": "tokens", "n_hidden_states": N_STATES,
                                       "token_layers": TOKEN_LAYERS})
    for pair, (text, _) in CORRECT.items():
        for d in range(len(text)):
            for modality in ("text", "speech"):
                if modality == "text":
                    pooled, tokens = 3 * _unit(0), np.stack([_unit(j) for j in range(4)])
                else:
                    pooled = 4 * (c * _unit(0) + s * _unit(1))
                    tokens = np.stack([c * _unit(i) + s * _unit(i + 4) for i in range(4)] + [_unit(8), _unit(9)])
                tensors = {"pooled": np.tile(pooled, (N_STATES, 1))}
                if pair == "speech_toy_a":
                    tensors["tokens"] = np.stack([tokens] * len(TOKEN_LAYERS)).astype(np.float16)
                writer.add({"task": f"{pair}_{modality}", "pair": pair, "modality": modality, "doc_id": d,
                            "n_positions": len(tokens), "token_layers": TOKEN_LAYERS if "tokens" in tensors else [],
                            "audio": None}, tensors)
    writer.flush()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, scores in SCORES.items():
        write_capture(root / f"cap_{name}", THETA[name])
        write_run(root / name, f"pretrained=mini,capture=tokens,capture_dir={root / f'cap_{name}'}", correct=scores)
        dirs[name] = root / name
    write_run(root / "voice", "pretrained=mini,tts_voice=en-gb")
    dirs["voice"] = root / "voice"
    write_run(root / "limit", "pretrained=mini", correct={p: (t[:8], s[:8]) for p, (t, s) in CORRECT.items()})
    results = root / "limit" / "lslm__mini" / f"results_{STAMP}.json"
    data = json.loads(results.read_text())
    data["config"]["limit"] = 8
    results.write_text(json.dumps(data))
    dirs["limit"] = root / "limit"
    return root, dirs


@pytest.fixture(scope="module")
def board(runs):
    root, dirs = runs
    out = root / "board"
    assert cli(["compare", *(str(dirs[n]) for n in "abc"), "--out", str(out), "--labels", "A,B,C"]) == 0
    return out, json.loads((out / "leaderboard.json").read_text())


def _report(path):
    """The report of a run, built here (compare writes nothing into its input folders)."""
    from lmeval_speech.report import report as report_mod
    from lmeval_speech.runs import load_run

    assert not (path / "gap_report").exists()
    rep, _ = report_mod.build_report(load_run(path))
    return json.loads(json.dumps(report_mod.jsonable(rep)))


def test_leaderboard_values_are_the_reports_values(runs, board):
    _, dirs = runs
    out, lb = board
    assert [r["label"] for r in lb["runs"]] == ["A", "B", "C"]
    for name, row in zip("abc", lb["runs"]):
        rep = _report(dirs[name])
        ov = rep["overall"]
        for key in ("n", "text_acc", "speech_acc", "gap", "ci_low", "ci_high"):
            assert row[key] == ov[key], (name, key)
        assert row["mcnemar_p"] == ov["mcnemar"]["p"]
        assert (row["S_cos"], row["S_euc"], row["aps"]) == (  # every pair is pooled: the report's own figures
            pytest.approx(rep["similarity"]["S_cos"]), pytest.approx(rep["similarity"]["S_euc"]),
            pytest.approx(rep["alignment"]["aps"]))
        assert row["aps"] == pytest.approx(math.cos(THETA[name]), abs=2e-3)
        assert row["flags"] == [] and row["tts"] == "espeak-ng:en-us@160"
        pair_rows = {p["pair"]: p for p in lb["pairs"] if p["label"] == row["label"]}
        for pair, p in rep["pairs"].items():
            assert pair_rows[pair]["gap"] == p["gap"] and pair_rows[pair]["n"] == p["n"]
        assert pair_rows["speech_toy_b"]["aps"] is None
    assert lb["comparability"] == {"comparable": True, "differences": []}
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert [r["scope"] for r in rows] == ["overall"] * 3 + ["speech_toy_a", "speech_toy_b"] * 3
    assert float(rows[1]["gap"]) == pytest.approx(lb["runs"][1]["gap"])
    md = (out / "leaderboard.md").read_text()
    assert "| A | 20 |" in md and "All runs used the same" in md and "![gap vs APS](gap_vs_aps.png)" in md
    assert (out / "gap_vs_aps.png").stat().st_size > 1000
    assert not list(out.glob(".*.tmp"))


def test_the_run_rows_states_are_over_the_pairs_its_gap_pools(runs):
    """The run row paired the overall gap (the headline metric's pairs only: a VoiceBench run's
    OpenBookQA and MMSU) with S_cos / APS over every captured pair (AdvBench, IFEval too), and the
    fits regressed one on the other. Both axes are now over the same pairs, and a note says so."""
    from lmeval_speech.report.compare import build_leaderboard

    _, dirs = runs
    rep = _report(dirs["a"])
    a, b = rep["pairs"]["speech_toy_a"]["similarity"], rep["pairs"]["speech_toy_b"]["similarity"]
    b["S_cos"] = -0.9  # pair b as if scored by another metric, its states far apart
    rep["similarity"]["S_cos"] = (a["n_items"] * a["S_cos"] + b["n_items"] * b["S_cos"]) / (a["n_items"] + b["n_items"])
    rep["overall"]["pairs_pooled"] = ["speech_toy_a"]
    lb = build_leaderboard([rep], ["A"], [str(dirs["a"])])
    row = lb["runs"][0]
    assert row["S_cos"] == pytest.approx(a["S_cos"]) and row["S_euc"] == pytest.approx(a["S_euc"])
    assert row["aps"] == pytest.approx(rep["pairs"]["speech_toy_a"]["alignment"]["aps"])
    assert any("['speech_toy_b'], scored by other metrics, are left out" in n for n in lb["notes"])


def test_a_stale_report_in_the_run_folder_is_rebuilt(runs, tmp_path):
    """``report --out RUN_DIR`` leaves report.json beside the results; after a newer run in the same
    folder, compare and check read that old report.json as this run's numbers."""
    import shutil

    from lmeval_speech.report.compare import load_report

    _, dirs = runs
    run = tmp_path / "run"
    shutil.copytree(dirs["b"], run)
    stale = _report(dirs["a"])
    stale["run"]["results_file"] = str(run / "lslm__mini" / "results_2024-01-01T00-00-00.000001.json")
    (run / "report.json").write_text(json.dumps(stale))
    rep, path = load_report(run)
    assert rep["overall"]["gap"] == _report(dirs["b"])["overall"]["gap"] != stale["overall"]["gap"]
    assert path.name.startswith("results_")
    fresh = _report(run)  # one of the latest results: reused as it is
    (run / "report.json").write_text(json.dumps(fresh))
    assert load_report(run) == (fresh, run / "report.json")


def test_paths_without_monotonicity_are_counted_not_hidden(tmp_path):
    """A path that maps every word to one speech position has no Spearman rho; it was dropped from
    the monotonicity mean without a word, so the least order-keeping alignments raised the figure."""
    writer = CaptureWriter(tmp_path / "cap", meta={"pretrained": "mini", "mode": "tokens", "n_hidden_states": N_STATES,
                                                   "token_layers": TOKEN_LAYERS})
    for pair, (text, _) in CORRECT.items():
        for d in range(len(text)):
            for modality in ("text", "speech"):
                flat = modality == "speech" and d % 2 == 0  # even items: one speech state repeated
                tokens = np.stack([_unit(0)] * 6 if flat else [_unit(j) for j in range(4)])
                tensors = {"pooled": np.tile(3 * _unit(0), (N_STATES, 1)),
                           "tokens": np.stack([tokens] * len(TOKEN_LAYERS)).astype(np.float16)}
                writer.add({"task": f"{pair}_{modality}", "pair": pair, "modality": modality, "doc_id": d,
                            "n_positions": len(tokens), "token_layers": TOKEN_LAYERS, "audio": None}, tensors)
    writer.flush()
    write_run(tmp_path / "run", f"pretrained=mini,capture=tokens,capture_dir={tmp_path / 'cap'}")
    rep = _report(tmp_path / "run")
    al = rep["alignment"]
    flat_items = sum((len(t) + 1) // 2 for t, _ in CORRECT.values())
    assert al["monotonicity_undefined"] == flat_items * len(TOKEN_LAYERS)
    assert any(f"{flat_items * len(TOKEN_LAYERS)} of {al['n_items'] * len(TOKEN_LAYERS)} alignment paths" in n
               for n in rep["notes"])


def test_fits_match_numpy(board):
    _, lb = board
    gap = np.array([r["gap"] for r in lb["runs"]])
    for name, key in (("gap_vs_aps", "aps"), ("gap_vs_S_cos", "S_cos"), ("gap_vs_S_euc", "S_euc")):
        x = np.array([r[key] for r in lb["runs"]])
        fit = lb["fits"][name]
        assert fit["n"] == 3 and fit["runs"] == ["A", "B", "C"] and fit["flagged"] == []
        assert fit["r2"] == pytest.approx(np.corrcoef(x, gap)[0, 1] ** 2, rel=1e-9)
        slope, intercept = np.polyfit(x, gap, 1)
        assert (fit["slope"], fit["intercept"]) == (pytest.approx(slope), pytest.approx(intercept))


def test_different_tts_and_limit_are_flagged(runs, tmp_path, capsys):
    _, dirs = runs
    assert cli(["report", str(dirs["a"]), "--n-boot", "10000"]) == 0
    three = [str(dirs["a"] / "gap_report" / "report.json"), str(dirs["voice"]), str(dirs["limit"])]
    assert cli(["compare", *three, "--out", str(tmp_path / "refused")]) == 2  # another voice: not rankable
    assert "--allow-mismatch" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert cli(["compare", *three, "--out", str(tmp_path), "--allow-mismatch"]) == 0
    printed = capsys.readouterr().out
    lb = json.loads((tmp_path / "leaderboard.json").read_text())
    a, voice, limit = (r["label"] for r in lb["runs"])
    assert (a, voice, limit) == ("mini [espeak-ng:en-us@160] (1)", "mini [espeak-ng:en-gb@160]",
                                 "mini [espeak-ng:en-us@160] (2)")
    assert [r["flags"] for r in lb["runs"]] == [[], ["tts"], ["items", "limit"]]
    diffs = lb["comparability"]["differences"]
    assert not lb["comparability"]["comparable"]
    (tts,) = [d for d in diffs if d["aspect"] == "tts"]  # one entry for both pairs
    assert tts == {"aspect": "tts", "pairs": ["speech_toy_a", "speech_toy_b"], "reference": [a, limit],
                   "runs": [voice], "detail": ["tts.voice: 'en-us' -> 'en-gb'"]}
    (items,) = [d for d in diffs if d["aspect"] == "items"]  # speech_toy_b has 8 items either way
    assert items["pairs"] == ["speech_toy_a"] and items["runs"] == [limit]
    assert "items: 12 -> 8 items" in items["detail"]
    assert "doc ids only in reference [8, 9, 10, 11]" in " ".join(items["detail"])
    assert next(d for d in diffs if d["aspect"] == "limit")["detail"] == ["limit: (absent) -> 8"]
    pairs = {(p["label"], p["pair"]): p["flags"] for p in lb["pairs"]}
    assert pairs[(voice, "speech_toy_b")] == ["tts"] and pairs[(a, "speech_toy_a")] == []
    assert "NOT COMPARABLE tts" in printed
    md = (tmp_path / "leaderboard.md").read_text()
    assert "**tts** (speech_toy_a, speech_toy_b)" in md and "tts.voice: 'en-us' -> 'en-gb'" in md
    # only the first run has APS: its point is drawn, and the fit says why there is no line
    assert lb["files"]["plot"] is not None and lb["fits"]["gap_vs_aps"]["note"].startswith("n=1")


def test_compare_rejects_wrong_label_count(runs, tmp_path, capsys):
    _, dirs = runs
    assert cli(["compare", str(dirs["a"]), str(dirs["b"]), "--labels", "x", "--out", str(tmp_path)]) == 2
    assert "--labels has 1 labels for 2 runs" in capsys.readouterr().err


def check(*argv) -> int:
    return cli(["check", *map(str, argv)])


def test_check_update_then_pass(runs, board, tmp_path, capsys):
    _, dirs = runs
    baseline = tmp_path / "baseline.json"
    assert check(dirs["a"], "--baseline", baseline, "--update") == 0
    data = json.loads(baseline.read_text())
    assert data["schema_version"] == 1 and data["settings"]["limit"] is None
    assert data["settings"]["pairs"]["speech_toy_a"]["items"] == [[0, 11]]
    gap = data["metrics"]["gap"]
    assert gap["value"] == pytest.approx(0.25) and gap["ci_low"] <= 0.25 <= gap["ci_high"]
    assert data["metrics"]["aps"]["value"] == pytest.approx(math.cos(THETA["a"]), abs=2e-3)
    capsys.readouterr()
    assert check(dirs["a"], "--baseline", baseline, "--ci") == 0
    out = capsys.readouterr().out
    assert "passed: gap, text_acc, speech_acc, aps" in out and "REGRESSED" not in out


def test_check_names_the_regressed_metric(runs, board, tmp_path, capsys):
    _, dirs = runs
    baseline = tmp_path / "baseline.json"
    check(dirs["a"], "--baseline", baseline, "--update")
    capsys.readouterr()
    assert check(dirs["b"], "--baseline", baseline) == 1  # gap 0.25 -> 0.55, APS 0.83 -> 0.45
    out = capsys.readouterr().out
    gap_line = next(line for line in out.splitlines() if line.startswith("gap "))
    assert "REGRESSED (tolerance)" in gap_line and "+0.3000" in gap_line
    assert "regressed: gap, speech_acc, aps" in out and "passed: text_acc" in out
    assert "model differs from the baseline (allowed): model_args.capture_dir" in out
    # within a wide tolerance the same run passes, unless it must stay inside the baseline CI
    assert check(dirs["b"], "--baseline", baseline, "--tolerance", "0.5") == 0
    assert check(dirs["b"], "--baseline", baseline, "--tolerance", "0.5", "--ci") == 1
    assert "REGRESSED (CI)" in capsys.readouterr().out
    # the new run accepted as baseline passes against itself, and the old one reads as an improvement
    assert check(dirs["b"], "--baseline", baseline, "--update") == 0
    assert check(dirs["b"], "--baseline", baseline, "--ci") == 0
    capsys.readouterr()
    assert check(dirs["a"], "--baseline", baseline, "--ci") == 0
    gap_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("gap "))
    assert gap_line.endswith("ok (improved)")


def test_check_refuses_other_settings(runs, board, tmp_path, capsys):
    _, dirs = runs
    baseline = tmp_path / "baseline.json"
    check(dirs["voice"], "--baseline", baseline, "--update")
    capsys.readouterr()
    assert check(dirs["limit"], "--baseline", baseline) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "limit: (absent) -> 8" in err and "pairs.speech_toy_a.items: 12 -> 8 items" in err
    assert check(dirs["c"], "--baseline", baseline) == 2
    err = capsys.readouterr().err
    assert "pairs.speech_toy_a.tts.voice: 'en-gb' -> 'en-us'" in err
    assert check(dirs["a"], "--baseline", tmp_path / "missing.json") == 2
    assert "--update" in capsys.readouterr().err


def test_noise_and_intervention_are_flagged(tmp_path, capsys):
    """Runs of the same model, tasks and TTS, one clean, one with ``noise=white,snr_db=0``, one intervened:
    compare said ``comparable: true`` with no flags (noise and interventions live in the manifest's settings
    and hooks, never diffed) and fitted them together. They are now the ``conditions`` aspect, flagged like
    the others, and ``check`` refuses a baseline's other conditions."""
    noisy = {"kind": "white", "snr_db": 0.0, "seed": 0}
    intervention = {"kind": "angle", "layers": "input", "critical": "bottom3", "strength": 1.0, "mode": "oracle",
                    "calibration": None}
    runs = {"clean": ("pretrained=mini", SETTINGS, None), "clean2": ("pretrained=mini", SETTINGS, None),
            "noisy": ("pretrained=mini,noise=white,snr_db=0", {**SETTINGS, "noise": noisy}, None),
            "intervened": ("pretrained=mini,intervention=angle", SETTINGS,
                           {**intervention, "save_calibration": "calib.json", "hooks": {"edit": {"kind": "edit"}}}),
            "resaved": ("pretrained=mini,intervention=angle", SETTINGS,
                        {**intervention, "save_calibration": None, "hooks": {"edit": {"kind": "edit", "layers": [0]}}})}
    for name, (model_args, settings, iv) in runs.items():
        write_run(tmp_path / name, model_args)
        lslm_record(tmp_path / name, settings=settings, intervention=iv)
    assert cli(["compare", *(str(tmp_path / n) for n in runs), "--out", str(tmp_path / "lb"),
                "--labels", ",".join(runs)]) == 0
    printed = capsys.readouterr().out
    lb = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert not lb["comparability"]["comparable"]
    assert [r["flags"] for r in lb["runs"]] == [[], [], ["conditions"], ["conditions"], ["conditions"]]
    diffs = {tuple(d["runs"]): d for d in lb["comparability"]["differences"]}
    # where the calibration was saved, and the hook sites, are no difference: one group of two
    assert set(diffs) == {("noisy",), ("intervened", "resaved")}
    assert diffs[("noisy",)]["aspect"] == "conditions" and diffs[("noisy",)]["reference"] == ["clean", "clean2"]
    assert diffs[("noisy",)]["detail"] == ['conditions.noise: (absent) -> {"kind": "white", "snr_db": 0.0, "seed": 0}']
    (detail,) = diffs[("intervened", "resaved")]["detail"]
    assert detail.startswith('conditions.intervention: (absent) -> {"kind": "angle"')
    assert "NOT COMPARABLE conditions: noisy vs clean, clean2" in printed
    assert "**conditions**: noisy differ from clean, clean2" in (tmp_path / "lb" / "leaderboard.md").read_text()
    baseline = tmp_path / "baseline.json"
    assert check(tmp_path / "clean", "--baseline", baseline, "--update") == 0
    capsys.readouterr()
    assert check(tmp_path / "noisy", "--baseline", baseline) == 2
    assert "conditions.noise: (absent) -> " in capsys.readouterr().err
    # a baseline written before conditions were compared does not record them: not refused for them
    data = json.loads(baseline.read_text())
    del data["settings"]["conditions"]
    baseline.write_text(json.dumps(data))
    assert check(tmp_path / "noisy", "--baseline", baseline) == 0


def test_runs_under_other_spoken_form_rules_are_flagged(tmp_path, capsys):
    """A run made before a spoken-form rule changed heard other audio for the same items: flagged as a
    difference of conditions, not fitted as comparable."""
    for name, version in (("old", 1), ("new", 2)):
        write_run(tmp_path / name, "pretrained=mini")
        lslm_record(tmp_path / name, settings={**SETTINGS, "spoken_form": version})
    assert cli(["compare", str(tmp_path / "old"), str(tmp_path / "new"), "--out", str(tmp_path / "lb"),
                "--labels", "old,new"]) == 0
    lb = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert not lb["comparability"]["comparable"]
    (diff,) = lb["comparability"]["differences"]
    assert diff["aspect"] == "conditions" and diff["detail"] == ["conditions.spoken_form: 1 -> 2"]


def test_check_reads_the_figures_against_their_baselines_with_per_metric_tolerances():
    """Issue 28: own - mismatched S_cos, kappa, ... are checked; a drop past the tolerance regresses, a
    per-metric tolerance allows it, a figure the baseline has and the run lacks is a regression."""
    from lmeval_speech.report.check import compare_metrics, per_metric_tolerances

    base = {"gap": {"value": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n": 100},
            "S_cos_vs_mismatched": {"value": 0.06, "ci_low": 0.05, "ci_high": 0.07, "n": 100},
            "speech_cascade_kappa": {"value": 0.5, "ci_low": 0.3, "ci_high": 0.7, "n": 100}}
    run = {"gap": {"value": 0.1}, "S_cos_vs_mismatched": {"value": 0.02}, "speech_cascade_kappa": None}
    status = {r["metric"]: r["status"] for r in compare_metrics(base, run, 0.02, False)}
    assert status["S_cos_vs_mismatched"] == "REGRESSED (tolerance)"
    assert status["speech_cascade_kappa"] == "REGRESSED (not in this run)"
    assert status["aps_vs_mismatched"] == "skipped (not in baseline)" and status["gap"] == "ok"
    loose = per_metric_tolerances(["S_cos_vs_mismatched=0.05"])
    status = {r["metric"]: r["status"] for r in compare_metrics(base, run, 0.02, True, loose)}
    assert status["S_cos_vs_mismatched"] == "REGRESSED (CI)"  # within its tolerance, below its CI
    with pytest.raises(ValueError, match="no metric"):
        per_metric_tolerances(["kappa=0.1"])


def test_leaderboard_carries_the_baseline_columns():
    from lmeval_speech.report.compare import baseline_columns
    from lmeval_speech.report.leaderboard_out import baseline_lines

    rep = {"reference": {"S_cos": {"difference": 0.061}, "S_cos_centered": {"own": 0.7},
                         "aps": {"difference": 0.2}},
           "logit_lens": {"best_speech_layer": {"top10": 0.69}},
           "decomposition": {"p": {"speech_cascade_kappa": {"kappa": 0.42}}}}
    cols = baseline_columns(rep)
    assert cols == {"S_cos_vs_mismatched": 0.061, "S_cos_centered": 0.7, "aps_vs_mismatched": 0.2,
                    "lens_speech_top10": 0.69, "speech_cascade_kappa": 0.42}
    lines = baseline_lines([{"label": "a", **cols}])
    assert lines[-2] == "| a | 0.061 | 0.700 | 0.200 | 0.690 | 0.420 |"
    assert baseline_columns({})["S_cos_vs_mismatched"] is None and baseline_lines([{"label": "a"}]) == []
