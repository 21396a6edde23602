"""Every similarity beside its baseline (issue 28): the mismatched pair, the centered cosine and linear CKA
(metrics/baselines.py), and the report's reference section (report/reference.py), recomputed here
with independent code from the capture the report read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_report import full, run_report, write_capture, write_run  # noqa: F401  (fixture)

from lmeval_speech.capture.store import CaptureReader
from lmeval_speech.metrics.baselines import (
    center,
    cross_layer_cka,
    derangement,
    linear_cka,
    paired_difference,
    rowwise_cosine,
)


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_derangement_is_a_seeded_permutation_without_fixed_points(n):
    perm = derangement(n, seed=5)
    assert sorted(perm.tolist()) == list(range(n)) and not np.any(perm == np.arange(n))
    assert np.array_equal(perm, derangement(n, seed=5))
    if n > 3:
        assert not np.array_equal(perm, derangement(n, seed=6))
        assert not np.array_equal(perm, np.roll(np.arange(n), -1))  # not a fixed shift
    with pytest.raises(ValueError):
        derangement(1)


def _feature_space_cka(x, y):
    """The textbook form: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    x, y = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_linear_cka_matches_the_feature_space_formula_and_its_invariances():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((40, 12)), rng.standard_normal((40, 7))
    assert linear_cka(x, y) == pytest.approx(_feature_space_cka(x, y), rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    # invariant to rotation, isotropic scale and a common offset: what raw cosine is not
    assert linear_cka(x, 3.0 * x @ q + 100.0) == pytest.approx(1.0, abs=1e-10)
    mixed = x + 0.5 * rng.standard_normal(x.shape)
    assert 0.5 < linear_cka(x, mixed) < 0.95
    # unrelated representations of few items: small
    assert linear_cka(rng.standard_normal((400, 12)), rng.standard_normal((400, 12))) < 0.1
    with pytest.raises(ValueError):
        linear_cka(x, y[:10])


def test_cross_layer_cka_is_the_per_pair_cka():
    rng = np.random.default_rng(1)
    s, t = rng.standard_normal((30, 3, 8)), rng.standard_normal((30, 4, 8))
    t[:, 2] = s[:, 1] * 2 + 1
    m = cross_layer_cka(s, t)
    assert m.shape == (3, 4) and m[1, 2] == pytest.approx(1.0)
    for i in range(3):
        for j in range(4):
            assert m[i, j] == pytest.approx(linear_cka(s[:, i], t[:, j]))


def test_centering_removes_the_common_direction_that_raw_cosine_sees():
    """States = a large shared vector + the item's own content (+ noise): raw cosine is high for any
    pair; after centering, an item's speech matches its own text, not another's."""
    rng = np.random.default_rng(2)
    n, d = 200, 64
    common = 20 * rng.standard_normal(d)
    content = rng.standard_normal((n, 1, d))
    speech = common + content + 0.3 * rng.standard_normal((n, 1, d))
    text = common + content + 0.3 * rng.standard_normal((n, 1, d))
    perm = derangement(n, 0)
    assert rowwise_cosine(speech, text[perm]).mean() > 0.9  # the mismatched pair is "similar" raw
    cs, ct, mean = center(speech, text)
    np.testing.assert_allclose(mean[0], (speech.mean(0)[0] + text.mean(0)[0]) / 2)
    assert rowwise_cosine(cs, ct).mean() > 0.85
    assert abs(rowwise_cosine(cs, ct[perm]).mean()) < 0.05


def test_paired_difference_keeps_items_paired():
    own = np.array([1.0, 2.0, 3.0, 4.0])
    other = own - 0.5
    d = paired_difference(own, other, n_boot=500)
    # every item differs by exactly 0.5: a paired CI has zero width (an unpaired one would not)
    assert d["difference"] == d["ci_low"] == d["ci_high"] == pytest.approx(0.5)
    assert d["own"] == 2.5 and d["mismatched"] == 2.0 and d["n"] == 4


def test_report_reference_section_recomputed_independently(full):  # noqa: F811
    out, rep = full
    ref = rep["reference"]
    assert ref is not None and ref["n_items"] == 18 and ref["sampled_from"] is None
    pairs = {(p, d): m for p, d, m in ref["derangement"]}
    assert len(pairs) == 18 and all(d != m for (_, d), m in pairs.items())
    by_pair = {}
    for (p, d), m in pairs.items():
        by_pair.setdefault(p, []).append(m)
    assert sorted(by_pair["speech_toy_a"]) == list(range(12)) and sorted(by_pair["speech_toy_b"]) == list(range(6))

    reader = CaptureReader(rep["run"]["capture_dir"])
    rec = {(r["task"], r["doc_id"]): r for r in reader.records}
    order = [(p, d) for p, d, _ in ref["derangement"]]

    def pooled(pair, modality, doc):
        return reader.load(rec[(f"{pair}_{modality}", doc)])["pooled"].astype(np.float64)

    s = np.stack([pooled(p, "speech", d) for p, d in order])
    t = np.stack([pooled(p, "text", d) for p, d in order])
    tm = np.stack([pooled(p, "text", pairs[(p, d)]) for p, d in order])

    def cos(a, b):
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    assert ref["S_cos"]["own"] == pytest.approx(rep["similarity"]["S_cos"], abs=1e-6)
    assert ref["S_cos"]["mismatched"] == pytest.approx(cos(s, tm).mean(), abs=1e-6)
    assert ref["S_euc"]["mismatched"] == pytest.approx(np.linalg.norm(s - tm, axis=-1).mean(), abs=1e-4)
    mu = np.concatenate([s, t]).mean(0)
    assert ref["S_cos_centered"]["own"] == pytest.approx(cos(s - mu, t - mu).mean(), abs=1e-6)
    assert ref["S_cos_centered"]["mismatched"] == pytest.approx(cos(s - mu, tm - mu).mean(), abs=1e-6)
    assert ref["S_cos"]["ci_low"] <= ref["S_cos"]["difference"] <= ref["S_cos"]["ci_high"]
    np.testing.assert_allclose(ref["per_layer"]["cka"], [_feature_space_cka(s[:, i], t[:, i]) for i in range(s.shape[1])],
                               atol=1e-6)
    assert np.asarray(ref["cross_layer_cka"]).shape == (s.shape[1], s.shape[1])
    # APS: toy_a's token items are built identical (0-5) or at 1/sqrt(2) (6-11); a mismatched pair differs
    assert ref["aps"]["n"] == 12 and ref["aps"]["own"] == pytest.approx(rep["alignment"]["aps"], abs=1e-6)
    assert ref["aps"]["mismatched"] < ref["aps"]["own"]
    md = (out / "gap_report" / "report.md").read_text()
    assert "vs mismatched" in md and (out / "gap_report" / "cka.png").exists()


def test_a_pair_with_one_item_has_no_mismatched_partner(tmp_path):
    cap = tmp_path / "cap"
    write_capture(cap)
    out = tmp_path / "out"
    write_run(out, f"pretrained=mini,capture=tokens,capture_dir={cap}",
              correct={"speech_toy_a": ([1], [0]), "speech_toy_b": ([1, 0], [1, 1])})
    assert run_report(out, "--n-boot", 200) == 0
    rep = json.loads((out / "gap_report" / "report.json").read_text())
    assert rep["reference"]["n_items"] == 2  # toy_b's two items, each against the other
    assert {(p, d, m) for p, d, m in rep["reference"]["derangement"]} == {("speech_toy_b", 0, 1), ("speech_toy_b", 1, 0)}
    assert any("single captured item" in n for n in rep["notes"])


def test_correlations_use_the_corrected_values_and_say_the_items_needed(full):  # noqa: F811
    """The per-item correlation with speech-only errors also runs on the baseline-corrected values, and
    each row says how many items its r would need (Fisher z: |r| = 0.3 needs 85 for 80% power, a
    textbook value)."""
    from lmeval_speech.report.states import n_for_power

    assert n_for_power(0.3) == 85 and n_for_power(-0.3) == 85 and n_for_power(0.5) == 30
    assert n_for_power(0.0) is None and n_for_power(float("nan")) is None
    out, rep = full
    corr = rep["correlation"]
    assert {"centered_cosine", "cosine_minus_mismatched"} <= set(corr)
    rows = [r for r in rep["items"] if r.get("centered_cosine") is not None]
    x = np.array([r["centered_cosine"] for r in rows])
    y = np.array([r["speech_only_error"] for r in rows], dtype=float)
    from scipy.stats import pearsonr

    assert corr["centered_cosine"]["point_biserial"]["r"] == pytest.approx(pearsonr(y, x)[0], abs=1e-9)
    r = corr["cosine"]["point_biserial"]["r"]
    assert corr["cosine"]["point_biserial"]["n_for_80pct_power"] == n_for_power(r)
    assert "items for 80% power" in (out / "gap_report" / "report.md").read_text()
