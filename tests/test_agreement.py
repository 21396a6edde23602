"""Cohen's kappa and the recovery rate (metrics/agreement.py) against scikit-learn and hand computation."""

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from lmeval_speech.metrics.agreement import cohen_kappa, kappa_from_tables, recovery_rate


def test_kappa_equals_scikit_learn_on_random_choices():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4, 300)
    b = np.where(rng.random(300) < 0.6, a, rng.integers(0, 4, 300))  # agree on ~70%
    got = cohen_kappa(a, b, n_boot=500, seed=1)
    assert got["kappa"] == pytest.approx(cohen_kappa_score(a, b))
    assert got["agreement"] == pytest.approx(np.mean(a == b))
    assert got["ci_low"] < got["kappa"] < got["ci_high"]


def test_kappa_by_hand_and_its_edges():
    # 2x2: 40 both 0, 10 (0,1), 20 (1,0), 30 both 1 -> po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.4
    a = [0] * 50 + [1] * 50
    b = [0] * 40 + [1] * 10 + [0] * 20 + [1] * 30
    assert cohen_kappa(a, b, n_boot=10)["kappa"] == pytest.approx(0.4)
    assert cohen_kappa([1, 2, 3], [1, 2, 3], n_boot=10)["kappa"] == pytest.approx(1.0)
    assert cohen_kappa([0, 0], [0, 0], n_boot=10)["kappa"] is None  # one answer throughout: undefined
    assert np.isnan(kappa_from_tables(np.array([[5, 0], [0, 0]])))
    with pytest.raises(ValueError):
        cohen_kappa([0, 1], [0])


def test_kappa_bootstrap_matches_index_resampling():
    """The multinomial draw of table counts gives the same CI as resampling items (to Monte Carlo error)."""
    rng = np.random.default_rng(0)
    a = rng.integers(0, 3, 200)
    b = np.where(rng.random(200) < 0.5, a, rng.integers(0, 3, 200))
    got = cohen_kappa(a, b, n_boot=4000, seed=2)
    idx = rng.integers(0, 200, (4000, 200))
    ref = np.array([cohen_kappa_score(a[i], b[i]) for i in idx[:1500]])
    assert got["ci_low"] == pytest.approx(np.quantile(ref, 0.025), abs=0.03)
    assert got["ci_high"] == pytest.approx(np.quantile(ref, 0.975), abs=0.03)


def test_recovery_rate_and_its_ci():
    text = np.array([1] * 80 + [0] * 20, dtype=bool)
    speech = np.array([1] * 60 + [0] * 20 + [1] * 5 + [0] * 15, dtype=bool)
    got = recovery_rate(text, speech, n_boot=2000, seed=0)
    assert got["rate"] == pytest.approx(0.65 / 0.80)
    assert got["ci_low"] < got["rate"] < got["ci_high"] and got["ci_high"] - got["ci_low"] < 0.4
    assert recovery_rate([0, 0], [1, 0], n_boot=10)["rate"] is None
