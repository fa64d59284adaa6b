"""Confidence-head metrics (``pipo_jax.train.calibration``): AUROC, Brier, ECE, reliability
diagrams."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.train import calibration
from pipo_jax.train.calibration import (
    auroc,
    brier_score,
    calibration_scores,
    expected_calibration_error,
    reliability_bins,
)


def _pairwise_auroc(score, label, mask):
    """Brute force: every (positive, negative) pair, 1 if the positive scores higher, ½ on a
    tie."""
    pos, neg = score[mask & label], score[mask & ~label]
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return wins / (len(pos) * len(neg))


# ------------------------------------------------------------------------------------ AUROC


def test_auroc_perfect_reversed_and_tied_rankings():
    score = jnp.array([0.1, 0.2, 0.3, 0.8, 0.9])
    label = jnp.array([False, False, False, True, True])
    assert float(auroc(score, label)) == 1.0
    assert float(auroc(score, ~label)) == 0.0
    assert float(auroc(jnp.full(5, 0.7), label)) == 0.5  # all ties: no information


def test_auroc_with_ties_by_hand():
    # Positives 0.8, 0.5, 0.5; negatives 0.5, 0.2. Pairs (pos, neg):
    # 0.8 beats both: 2; each 0.5 ties 0.5 (½) and beats 0.2 (1): 1.5 each. U = 5 of 6 pairs.
    score = jnp.array([0.8, 0.5, 0.5, 0.5, 0.2])
    label = jnp.array([True, True, True, False, False])
    np.testing.assert_allclose(float(auroc(score, label)), 5 / 6, rtol=1e-6)


def test_auroc_ignores_masked_entries():
    score = jnp.array([0.9, 0.1, 0.05, 0.99, 0.5])
    label = jnp.array([True, False, True, False, True])
    mask = jnp.array([True, True, False, False, True])
    # Left: positives 0.9, 0.5 against negative 0.1 → perfect, whatever the masked two are.
    assert float(auroc(score, label, mask)) == 1.0
    assert float(auroc(score, label, mask)) != float(auroc(score, label))


def test_auroc_is_nan_when_a_class_is_empty():
    score = jnp.array([0.3, 0.6, 0.9])
    assert np.isnan(float(auroc(score, jnp.ones(3, bool))))
    assert np.isnan(float(auroc(score, jnp.zeros(3, bool))))
    # Only the masked-in entries count: the one negative is masked out.
    assert np.isnan(float(auroc(score, jnp.array([True, False, True]),
                                jnp.array([True, False, True]))))
    assert np.isnan(float(auroc(score, jnp.array([True, False, True]), jnp.zeros(3, bool))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_a_pairwise_count_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n = 301
    # Scores on a coarse grid (many ties) and a few infinities, which the padding must not
    # confuse with the masked entries it pushes past the negatives.
    score = rng.integers(0, 12, n).astype(np.float32) / 11
    score[:3] = [np.inf, -np.inf, np.inf]
    label = rng.random(n) < 0.3 + 0.4 * score.clip(0, 1)
    mask = rng.random(n) < 0.8
    want = _pairwise_auroc(score, label, mask)
    np.testing.assert_allclose(float(auroc(score, label, mask)), want, rtol=1e-6)
    # Host numpy arrays in, and the default mask (every position).
    np.testing.assert_allclose(float(auroc(score, label)),
                               _pairwise_auroc(score, label, np.ones(n, bool)), rtol=1e-6)


def test_auroc_and_brier_under_jit():
    rng = np.random.default_rng(5)
    score = jnp.asarray(rng.random((4, 32)), jnp.float32)
    label = jnp.asarray(rng.random((4, 32)) < 0.5)
    mask = jnp.asarray(rng.random((4, 32)) < 0.7)

    @jax.jit
    def metrics(s_BxN, l_BxN, m_BxN):
        flat = (s_BxN.reshape(-1), l_BxN.reshape(-1), m_BxN.reshape(-1))
        return auroc(*flat), brier_score(*flat)

    got_auroc, got_brier = metrics(score, label, mask)
    chex.assert_shape([got_auroc, got_brier], ())
    chex.assert_type([got_auroc, got_brier], jnp.float32)
    s, lab, m = (np.asarray(x).reshape(-1) for x in (score, label, mask))
    np.testing.assert_allclose(float(got_auroc), _pairwise_auroc(s, lab, m), rtol=1e-6)
    np.testing.assert_allclose(float(got_brier), np.mean((s[m] - lab[m]) ** 2), rtol=1e-6)
    # One class only, under jit: NaN rather than an error or a number.
    assert np.isnan(float(metrics(score, jnp.ones_like(label), mask)[0]))


# ------------------------------------------------------------------------------------ Brier


def test_brier_score_by_hand():
    pred = jnp.array([0.9, 0.2, 0.5, 0.3])
    alpha = jnp.array([1.0, 0.0, 0.75, 0.1])
    mask = jnp.array([True, True, True, False])
    # (0.1² + 0.2² + 0.25²) / 3
    np.testing.assert_allclose(float(brier_score(pred, alpha, mask)), 0.1125 / 3, rtol=1e-6)
    # A binary label is cast to 0/1: (0.1² + 0.8² + 0.5² + 0.3²) / 4
    label = jnp.array([True, True, False, False])
    np.testing.assert_allclose(float(brier_score(pred, label)), 0.99 / 4, rtol=1e-6)
    assert float(brier_score(pred, pred, mask)) == 0.0
    assert float(brier_score(pred, alpha, jnp.zeros(4, bool))) == 0.0  # no position: 0


# ---------------------------------------------------------------------- reliability diagram


def test_reliability_bins_by_hand():
    pred = np.array([0.05, 0.15, 0.95, 0.92, 0.5, 1.0])
    target = np.array([0.0, 0.2, 1.0, 0.8, 0.0, 1.0])
    mask = np.array([True, True, True, True, False, True])
    got = reliability_bins(pred, target, 10, mask)
    np.testing.assert_allclose(got["edges"], np.linspace(0, 1, 11))
    # Bins 0, 1 and 9 (0.95, 0.92 and 1.0: the last bin includes 1); 0.5 is masked out.
    np.testing.assert_array_equal(got["count"], [1, 1, 0, 0, 0, 0, 0, 0, 0, 3])
    np.testing.assert_allclose(got["pred_mean"][[0, 1, 9]], [0.05, 0.15, 2.87 / 3])
    np.testing.assert_allclose(got["target_mean"][[0, 1, 9]], [0.0, 0.2, 2.8 / 3])
    assert np.isnan(got["pred_mean"][2:9]).all() and np.isnan(got["target_mean"][2:9]).all()


def test_reliability_bins_give_the_ece():
    rng = np.random.default_rng(7)
    pred = rng.random(500).astype(np.float32)
    pred[:20] = np.arange(20) / 10 % 1  # on the bin edges
    target = np.clip(pred + rng.normal(0, 0.2, 500), 0, 1)
    got = reliability_bins(pred, target, 10)
    filled = got["count"] > 0
    ece = np.sum(got["count"][filled] / 500 *
                 np.abs(got["pred_mean"][filled] - got["target_mean"][filled]))
    np.testing.assert_allclose(
        ece, float(expected_calibration_error(pred, target, np.ones(500, bool), 10)), rtol=1e-5)
    scores = calibration_scores(pred, target, 10)
    np.testing.assert_allclose(scores["ece"], ece, rtol=1e-5)
    np.testing.assert_allclose(scores["brier"], np.mean((pred - target) ** 2), rtol=1e-5)
    np.testing.assert_allclose(scores["auroc"],
                               _pairwise_auroc(pred, target >= 0.5, np.ones(500, bool)),
                               rtol=1e-6)


def test_plot_reliability_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(8)
    pred = rng.random(200)
    path = calibration.plot_reliability(pred, np.clip(pred + rng.normal(0, 0.1, 200), 0, 1),
                                        tmp_path / "sub" / "reliability.png", title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Everything in one bin (the easy task's picture), explicit scores with a NaN AUROC.
    path = calibration.plot_reliability(np.full(50, 0.997), np.ones(50), tmp_path / "one.png",
                                        scores={"ECE": 0.003, "AUROC": float("nan")})
    assert path.stat().st_size > 0
