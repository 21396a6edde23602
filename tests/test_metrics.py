"""The metric functions against hand computations and independent reference calculations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lmeval_speech.metrics import (
    alignment_path_score,
    argmax_path,
    critical_tokens,
    dtw_path,
    layer_similarity,
    layer_similarity_batch,
    linear_fit,
    logistic_fit,
    mcnemar,
    mean_pool,
    monotonicity,
    paired_gap,
    path_scores,
    per_token_path,
    point_biserial,
    similarity_matrix,
)

# A hand-made 3x3 similarity matrix (speech rows i, text columns j).
# Column maxima: j=0 -> i=0 (0.9), j=1 -> i=1 (0.8), j=2 -> i=1 (0.7).
A_HAND = np.array([[0.9, 0.1, 0.3],
                   [0.2, 0.8, 0.7],
                   [0.4, 0.5, 0.6]])


def _repeated_states(seed=0, tt=6, d=8, rep=3):
    """Text states and speech states that repeat each text state `rep` times, in order."""
    text = np.random.default_rng(seed).normal(size=(tt, d))
    return np.repeat(text, rep, axis=0), text


# --- similarity ------------------------------------------------------------------------------

def test_identical_states_have_cosine_one_and_distance_zero():
    speech, text = _repeated_states()
    layers_s, layers_t = np.stack([speech, 2 * speech]), np.stack([text, 2 * text])
    sim = layer_similarity(mean_pool(layers_s), mean_pool(layers_t))
    np.testing.assert_allclose(sim["cosine"], [1.0, 1.0])
    np.testing.assert_allclose(sim["euclidean"], [0.0, 0.0], atol=1e-12)


def test_layer_similarity_hand_values_and_batch():
    s = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    t = np.array([[0.0, 1.0], [3.0, 4.0], [1.0, 1.0]])
    sim = layer_similarity(s, t)
    np.testing.assert_allclose(sim["cosine"], [0.0, 1.0, 0.0])  # zero vector -> cosine 0
    np.testing.assert_allclose(sim["euclidean"], [math.sqrt(2), 0.0, math.sqrt(2)])
    batch = layer_similarity_batch(np.stack([s, t]), np.stack([t, t]))
    assert batch["cosine"].shape == (2, 3)
    np.testing.assert_allclose(batch["cosine"][0], sim["cosine"])
    np.testing.assert_allclose(batch["cosine"][1], 1.0)


def test_non_finite_states_give_no_similarity_number():
    """A NaN or inf in a state became a zero unit vector: cosine 0 (beside a NaN distance) and an APS
    computed as if that frame were silent (the interventions' live critical-token choice uses it)."""
    s = np.array([[1.0, 0.0], [np.nan, 1.0], [np.inf, 0.0], [3e-7, 4e-7]])
    t = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [3e-7, 4e-7]])
    sim = layer_similarity(s, t)
    np.testing.assert_allclose(sim["cosine"], [1.0, np.nan, np.nan, 1.0])  # tiny but non-zero: cosine 1
    assert np.isnan(sim["euclidean"][1])
    with pytest.raises(ValueError, match="non-finite"):
        similarity_matrix(s[:2], t)
    for path in ("argmax", "dtw"):
        with pytest.raises(ValueError, match="non-finite"):
            alignment_path_score([[[1.0, 0.0], [np.nan, 1.0]]], [[[0.0, 1.0]]], path=path)
    with pytest.raises(ValueError, match="non-finite"):
        alignment_path_score([[[1.0, 0.0], [1.0, 1.0]]], [[[np.inf, 1.0]]], measure="euclidean")
    np.testing.assert_allclose(similarity_matrix([[3e-7, 4e-7]], [[3e-7, 4e-7]]), [[1.0]])


def test_mean_pool_with_mask():
    states = np.arange(12.0).reshape(2, 3, 2)  # [L=2, T=3, D=2]
    np.testing.assert_allclose(mean_pool(states[0]), [2.0, 3.0])
    np.testing.assert_allclose(mean_pool(states, mask=[1, 0, 1]), [[2.0, 3.0], [8.0, 9.0]])
    with pytest.raises(ValueError, match="no positions"):
        mean_pool(states, mask=[0, 0, 0])


# --- alignment -------------------------------------------------------------------------------

def test_similarity_matrix_hand_values():
    speech = np.array([[4.0, 3.0], [3.0, 4.0], [0.0, -1.0]])
    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(similarity_matrix(speech, text),
                               [[0.8, 0.6], [0.6, 0.8], [0.0, -1.0]])
    # Negative distances: |(4,3)-(1,0)| = sqrt(18), |(0,-1)-(0,1)| = 2, ...
    np.testing.assert_allclose(similarity_matrix(speech, text, "euclidean"),
                               -np.array([[math.sqrt(18), math.sqrt(20)],
                                          [math.sqrt(20), math.sqrt(18)],
                                          [math.sqrt(2), 2.0]]))
    # APS on this matrix: path (0, 1) -> (0.8 + 0.8) / 2 = 0.8; a second, identical-state
    # layer scores 1, so APS over the two layers is 0.9.
    res = alignment_path_score([speech, text], [text, text])
    np.testing.assert_allclose(res["per_layer"], [0.8, 1.0])
    assert res["aps"] == pytest.approx(0.9)
    np.testing.assert_array_equal(res["paths"][0], [0, 1])


def test_hand_3x3_argmax_path_and_aps():
    path = argmax_path(A_HAND)
    np.testing.assert_array_equal(path, [0, 1, 1])
    np.testing.assert_allclose(path_scores(A_HAND, path), [0.9, 0.8, 0.7])
    assert path_scores(A_HAND, path).mean() == pytest.approx((0.9 + 0.8 + 0.7) / 3)  # 0.8
    # ranks of (0, 1, 1) are (1, 2.5, 2.5): Pearson with (1, 2, 3) = 1.5 / sqrt(2 * 1.5)
    assert monotonicity(path) == pytest.approx(math.sqrt(3) / 2)


@pytest.mark.parametrize("path", ["argmax", "dtw"])
@pytest.mark.parametrize("measure", ["cosine", "euclidean"])
def test_identical_states_give_perfect_aps_and_spearman(path, measure):
    speech, text = _repeated_states()
    res = alignment_path_score([speech, speech], [text, text], measure=measure, path=path)
    best = 1.0 if measure == "cosine" else 0.0
    assert res["aps"] == pytest.approx(best, abs=1e-12)
    np.testing.assert_allclose(res["monotonicity"], [1.0, 1.0])
    for p in res["paths"]:  # every text token lands on one of its own 3 repeats
        np.testing.assert_array_equal(p // 3, np.arange(len(text)))


def test_shuffled_and_reversed_mappings():
    text = np.random.default_rng(1).normal(size=(20, 16))
    perm = np.random.default_rng(2).permutation(20)
    path = argmax_path(similarity_matrix(text[perm], text))
    np.testing.assert_array_equal(path, np.argsort(perm))  # text j sits where perm puts it
    rho = monotonicity(path)
    expected = np.corrcoef(np.arange(20), np.argsort(perm))[0, 1]  # ranks are the values here
    assert rho == pytest.approx(expected)
    assert abs(rho) < 0.5
    assert monotonicity(argmax_path(similarity_matrix(text[::-1], text))) == pytest.approx(-1.0)


def test_monotonicity_undefined_for_constant_or_short_paths():
    assert math.isnan(monotonicity([4, 4, 4]))
    assert math.isnan(monotonicity([2]))


def test_dtw_path_is_monotone_and_covers_corners():
    A = np.random.default_rng(3).uniform(-1, 1, size=(30, 12))
    i_idx, j_idx = dtw_path(A)
    assert (i_idx[0], j_idx[0]) == (0, 0)
    assert (i_idx[-1], j_idx[-1]) == (29, 11)
    steps = np.stack([np.diff(i_idx), np.diff(j_idx)])
    assert ((steps >= 0) & (steps <= 1)).all() and (steps.sum(axis=0) > 0).all()
    # The documented shift invariance: cost A.max() - A gives the same path as 1 - A.
    import dtw
    ref = dtw.dtw(1.0 - A)
    np.testing.assert_array_equal(i_idx, ref.index1)
    np.testing.assert_array_equal(j_idx, ref.index2)


@pytest.mark.parametrize("shape", [(1, 1), (1, 6), (6, 1), (7, 3), (120, 25), (40, 40)])
@pytest.mark.parametrize("kind", ["random", "ties", "constant"])
def test_dtw_path_is_dtw_python_s_index_for_index(shape, kind):
    """dtw_path runs dtw-python's C kernel without its wrapper and backtracks itself: the path must
    be ``dtw.dtw``'s exactly, ties included (a constant matrix is all ties)."""
    import dtw

    rng = np.random.default_rng(sum(shape))
    A = {"random": rng.uniform(-1, 1, size=shape), "ties": np.round(rng.uniform(-1, 1, size=shape), 1),
         "constant": np.full(shape, 0.3)}[kind]
    i_idx, j_idx = dtw_path(A)
    ref = dtw.dtw(A.max() - A)
    np.testing.assert_array_equal(i_idx, ref.index1)
    np.testing.assert_array_equal(j_idx, ref.index2)
    # the per-token reduction equals its definition (sort by token, then best score, then lowest i)
    order = np.lexsort((i_idx, -A[i_idx, j_idx], j_idx))
    first = np.unique(j_idx[order], return_index=True)[1]
    np.testing.assert_array_equal(per_token_path(A, i_idx, j_idx), i_idx[order][first])


def test_per_token_path_skips_a_nan_cell_as_its_definition_does():
    """The run-based reduction compares each cell with its run's max; a NaN cell makes that max NaN,
    so the token would take the next token's cell: NaN goes to the sorting definition instead."""
    A = np.array([[0.9, 0.1], [np.nan, 0.5], [0.2, 0.7]])
    i_idx, j_idx = np.array([0, 1, 2, 2]), np.array([0, 0, 0, 1])
    np.testing.assert_array_equal(per_token_path(A, i_idx, j_idx), [0, 2])


def test_dtw_path_refuses_non_finite_similarities():
    A = np.random.default_rng(0).uniform(size=(5, 4))
    A[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        dtw_path(A)


def test_average_ranks_are_rankdata_s_and_monotonicity_spearman_s():
    from scipy import stats

    from lmeval_speech.metrics.alignment import _average_ranks, _spearman_rows

    rng = np.random.default_rng(4)
    for L, n, hi in [(1, 1, 3), (3, 2, 1), (4, 20, 5), (8, 200, 1500), (2, 7, 1)]:
        rows = rng.integers(0, hi, size=(L, n))
        np.testing.assert_array_equal(_average_ranks(rows), stats.rankdata(rows, axis=1))
        for row, rho in zip(rows, _spearman_rows(rows)):
            expected = monotonicity(row)
            assert (math.isnan(rho) and math.isnan(expected)) or rho == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("path", ["argmax", "dtw"])
def test_batched_layers_equal_the_per_layer_computation(path):
    """Same-shaped layers go through one batched matmul; each layer's APS, path and monotonicity must
    be what similarity_matrix + the path + spearmanr give layer by layer."""
    rng = np.random.default_rng(5)
    speech, text = rng.normal(size=(3, 50, 16)), rng.normal(size=(3, 9, 16))
    res = alignment_path_score(list(speech), list(text), path=path)
    for layer in range(3):
        A = similarity_matrix(speech[layer], text[layer])
        i_star = argmax_path(A) if path == "argmax" else per_token_path(A, *dtw_path(A))
        np.testing.assert_array_equal(res["paths"][layer], i_star)
        assert res["per_layer"][layer] == pytest.approx(path_scores(A, i_star).mean(), abs=1e-12)
        assert res["monotonicity"][layer] == pytest.approx(monotonicity(i_star), abs=1e-12)


def test_per_token_path_takes_best_speech_index_per_text_token():
    A = np.array([[0.1, 0.0, 0.0],
                  [0.5, 0.0, 0.0],
                  [0.0, 0.3, 0.2],
                  [0.0, 0.0, 0.9]])
    i_idx, j_idx = np.array([0, 1, 2, 2, 3]), np.array([0, 0, 1, 2, 2])
    np.testing.assert_array_equal(per_token_path(A, i_idx, j_idx), [1, 2, 3])
    with pytest.raises(ValueError, match="every text token"):
        per_token_path(A, np.array([0, 1]), np.array([0, 0]))


def test_critical_tokens_bottom_k():
    path = argmax_path(A_HAND)  # scores 0.9 @ i=0, 0.8 @ i=1, 0.7 @ i=1
    np.testing.assert_array_equal(critical_tokens(A_HAND, path, k=None), [1, 0])
    np.testing.assert_array_equal(critical_tokens(A_HAND, path, k=1), [1])
    # Hand path with distinct positions: scores 0.3 @ 0, 0.5 @ 2, 0.1 @ 3
    A = np.array([[0.3, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.0, 0.1]])
    np.testing.assert_array_equal(critical_tokens(A, [0, 2, 3], k=2), [3, 0])


# --- gap -------------------------------------------------------------------------------------

def _hand_pairs():
    """20 both right, 10 text only, 5 speech only, 5 both wrong (n = 40)."""
    text = np.array([1] * 20 + [1] * 10 + [0] * 5 + [0] * 5)
    speech = np.array([1] * 20 + [0] * 10 + [1] * 5 + [0] * 5)
    return text, speech


def test_paired_gap_hand_values():
    text, speech = _hand_pairs()
    res = paired_gap(text, speech)
    assert res["table"] == {"both_right": 20, "text_only": 10, "speech_only": 5, "both_wrong": 5}
    assert res["n"] == 40
    assert res["text_acc"] == pytest.approx(30 / 40)
    assert res["speech_acc"] == pytest.approx(25 / 40)
    assert res["gap"] == pytest.approx(5 / 40)
    assert res["text_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 39))
    assert res["mcnemar"]["method"] == "exact"  # 15 discordant < 25
    assert res["mcnemar"]["p"] == pytest.approx(stats.binomtest(10, 15, 0.5).pvalue)
    assert res["ci_low"] <= res["gap"] <= res["ci_high"]


def test_mcnemar_chi2_branch():
    res = mcnemar(30, 10)  # (|30 - 10| - 1)^2 / 40 = 9.025; chi2(1) sf(x) = erfc(sqrt(x / 2))
    assert res["method"] == "chi2_cc"
    assert res["statistic"] == pytest.approx(9.025)
    assert res["p"] == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert mcnemar(0, 0)["p"] == 1.0


def test_bootstrap_deterministic_and_equivalent_to_index_resampling():
    text, speech = _hand_pairs()
    a, b = paired_gap(text, speech, seed=7), paired_gap(text, speech, seed=7)
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])
    # Reference: literal paired bootstrap over item indices, same n_boot.
    idx = np.random.default_rng(123).integers(0, 40, size=(10000, 40))
    ref = np.quantile((text[idx] - speech[idx]).mean(axis=1), [0.025, 0.975])
    assert a["ci_low"] == pytest.approx(ref[0], abs=1 / 40 + 1e-9)   # within one grid step
    assert a["ci_high"] == pytest.approx(ref[1], abs=1 / 40 + 1e-9)


def test_identical_vectors_give_zero_ci():
    text, _ = _hand_pairs()
    res = paired_gap(text, text)
    assert (res["gap"], res["ci_low"], res["ci_high"]) == (0.0, 0.0, 0.0)
    assert res["mcnemar"]["p"] == 1.0


def test_length_mismatch_names_both_lengths():
    with pytest.raises(ValueError, match=r"5 items.*4"):
        paired_gap([1, 0, 1, 1, 0], [1, 0, 1, 1])


# --- correlation -----------------------------------------------------------------------------

def test_linear_fit_exact_line():
    x = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    res = linear_fit(x, 2 * x + 1)
    assert res["slope"] == pytest.approx(2.0)
    assert res["intercept"] == pytest.approx(1.0)
    assert res["r2"] == pytest.approx(1.0)
    assert res["n"] == 5 and res["note"] is None


def test_point_biserial_matches_corrcoef():
    binary = np.array([0, 1, 0, 1, 1, 0, 1])
    values = np.array([0.2, 0.5, 0.1, 0.9, 0.4, 0.3, 0.6])
    res = point_biserial(binary, values)
    assert res["r"] == pytest.approx(np.corrcoef(binary, values)[0, 1])
    assert res["n"] == 7


def test_logistic_fit_binary_predictor_matches_log_odds_ratio():
    # x = 0: 3 ones, 7 zeros; x = 1: 6 ones, 4 zeros. The MLE slope is the log odds ratio and
    # its Wald SE is sqrt(1/3 + 1/7 + 1/6 + 1/4).
    x = np.r_[np.zeros(10), np.ones(10)]
    y = np.r_[np.ones(3), np.zeros(7), np.ones(6), np.zeros(4)]
    res = logistic_fit(x, y)
    assert res["coef"] == pytest.approx(math.log((6 / 4) / (3 / 7)), rel=1e-6)
    assert res["intercept"] == pytest.approx(math.log(3 / 7), rel=1e-6)
    assert res["se"] == pytest.approx(math.sqrt(1 / 3 + 1 / 7 + 1 / 6 + 1 / 4), rel=1e-6)
    assert res["n"] == 20 and res["note"] is None


@pytest.mark.parametrize("fn, x, y, note", [
    (linear_fit, [1.0, 2.0], [3.0, 4.0], "n=2"),
    (linear_fit, [1.0, 1.0, 1.0], [1.0, 2.0, 3.0], "x is constant"),
    (point_biserial, [0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], "binary is constant"),
    (logistic_fit, [1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], "separates"),
    (logistic_fit, [1.0, 1.0, 1.0, 1.0], [0, 1, 0, 1], "x is constant"),
    # constant up to rounding (the exact-equality guard let these through: r = 0.48, slope 6.7e11)
    (point_biserial, [0, 1, 1], [1.0, 1.0, 1.0 + 1e-15], "values is constant"),
    (linear_fit, [1.0, 1.0, 1.0 + 1e-12, 1.0], [1.0, 2.0, 3.0, 4.0], "x is constant"),
])
def test_degenerate_inputs_give_nan_with_note(fn, x, y, note):
    res = fn(x, y)
    assert note in res["note"]
    assert all(math.isnan(v) for k, v in res.items() if k not in ("n", "note"))


def test_non_finite_pairs_are_dropped():
    res = linear_fit([0.0, 1.0, np.nan, 2.0], [1.0, 3.0, 4.0, 5.0])
    assert res["n"] == 3 and res["slope"] == pytest.approx(2.0)


def test_a_nan_p_value_is_printed_as_none_not_as_significant():
    from lmeval_speech.report.render import fmt_p

    assert fmt_p(float("nan")) == "–" and fmt_p(None) == "–"
    assert fmt_p(0.5) == "0.5" and fmt_p(1e-6) == "<1e-4"
