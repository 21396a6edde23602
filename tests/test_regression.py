"""The across-run regression of the gap on closeness (report/regression.py; issue 29): point fit, and
R² with a bootstrap CI over the items every run scored, resampled once per replicate for all runs."""

from __future__ import annotations

import numpy as np
import pytest
from test_compare_check import board, runs  # noqa: F401  (fixtures)

from lmeval_speech.report.regression import regression


def _report(speech_right: list[int], cosine: list[float], aps: list | None = None, n_text: int = 10) -> dict:
    items = []
    for d, (s, c) in enumerate(zip(speech_right, cosine)):
        items.append({"pair": "p", "doc_id": d, "text_correct": d < n_text, "speech_correct": bool(s), "cosine": c,
                      "euclidean": 10 * (1 - c), "aps": None if aps is None else aps[d],
                      "centered_cosine": c - 0.5, "cosine_minus_mismatched": c - 0.9})
    return {"items": items}


def test_exact_line_and_item_bootstrap():
    # run r: speech right on its first 2r items of 10 (gap 1 - 0.2 r); every item's cosine 0.8 + 0.04 r
    reports = [_report([int(d < 2 * r) for d in range(10)], [0.8 + 0.04 * r] * 10) for r in range(5)]
    reg = regression(reports, [f"r{r}" for r in range(5)], n_boot=500)
    fit = reg["fits"]["S_cos"]
    assert fit["r2"] == pytest.approx(1.0) and fit["slope"] == pytest.approx(-0.2 / 0.04)
    assert fit["x"] == pytest.approx([0.8 + 0.04 * r for r in range(5)]) and fit["n"] == 5
    assert fit["y"] == pytest.approx([1 - 0.2 * r for r in range(5)])
    lo, hi = fit["r2_ci"]
    assert 0 < lo < hi < 1 and hi > 0.95  # resampled items break the exact line (it holds only on the full set)
    assert reg["fits"]["S_euc"]["slope"] == pytest.approx(0.2 / 0.4)
    assert "aps" not in reg["fits"]  # no run has APS


def test_the_same_items_are_resampled_in_every_run():
    """Item gaps identical across runs: in any replicate every run has the same gap, so no replicate has a
    defined R² (resampling each run separately would invent variation and give R² values)."""
    gaps = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    reports = [_report([1 - g for g in gaps], [0.5 + 0.1 * r] * 10) for r in range(4)]
    fit = regression(reports, list("abcd"), n_boot=200)["fits"]["S_cos"]
    assert fit["note"] is not None and fit["r2_ci"] is None and fit["n_boot"] == 0


def test_only_common_items_and_values_every_run_has():
    reports = [_report([0] * 10, [0.9] * 10, aps=[0.7 + 0.01 * r if d < 4 else None for d in range(10)])
               for r in range(3)]
    reports[1]["items"] = reports[1]["items"][:8]  # run 1 scored 8 items
    for r, rep in enumerate(reports):
        for it in rep["items"]:
            it["speech_correct"] = it["doc_id"] < r  # gap 1, 0.9, 0.8 over the 8 common items... (ids < r right)
    reg = regression(reports, ["a", "b", "c"], n_boot=100)
    assert reg["n_items"] == 8 and reg["fits"]["aps"]["n_items_value"] == 4
    assert reg["fits"]["aps"]["x"] == pytest.approx([0.70, 0.71, 0.72])
    assert reg["fits"]["S_cos"]["y"] == pytest.approx([1.0, 7 / 8, 6 / 8])
    assert regression(reports[:2], ["a", "b"]) is None  # fewer than 3 runs


def test_compare_writes_the_regression(board):  # noqa: F811  (fixture of test_compare_check: runs A, B, C)
    out, lb = board
    reg = lb["regression"]
    assert reg["n_runs"] == 3 and set(reg["fits"]) >= {"S_cos", "S_euc", "aps"}
    # the regression's run-level points are the leaderboard's own gaps, on the items all three scored
    assert reg["fits"]["S_cos"]["y"] == pytest.approx([r["gap"] for r in lb["runs"]], abs=1e-9)
    assert np.isfinite(reg["fits"]["S_cos"]["r2"])
    md = (out / "leaderboard.md").read_text()
    assert "## Gap regressed on closeness" in md and (out / "gap_vs_similarity.png").exists()


def test_the_no_aps_note_follows_aps_not_the_regression(runs, tmp_path):  # noqa: F811
    """Two runs with token states (APS, no regression: fewer than 3 runs) get no "no run has token-level states"
    note; two runs without capture get it. (The regression's plot was once wedged between the APS plot
    and its else, so the note followed the regression instead.)"""
    from lmeval_speech.report import compare

    _, dirs = runs
    with_aps = compare.build_leaderboard([compare.load_report(dirs[n])[0] for n in "ab"], ["A", "B"],
                                         [str(dirs[n]) for n in "ab"])
    compare.write_outputs(with_aps, tmp_path / "aps")
    assert with_aps["regression"] is None and with_aps["files"]["plot"] == "gap_vs_aps.png"
    assert not any("no run has token-level states" in n for n in with_aps["notes"])
    without = compare.build_leaderboard([compare.load_report(dirs[n])[0] for n in ("voice", "limit")], ["V", "L"],
                                        [str(dirs[n]) for n in ("voice", "limit")])
    compare.write_outputs(without, tmp_path / "none")
    assert any("no run has token-level states" in n for n in without["notes"])
