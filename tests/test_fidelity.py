"""Sample-fidelity metrics: classifier two-sample AUC and MMD (popkin.diagnostics)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from popkin.diagnostics import classifier_auc, mmd
from popkin.diagnostics._fidelity import rank_auc

N, D = 200, 8


def _samples(seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(N, D)), shift + scale * rng.normal(size=(N, D))


def test_rank_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    p = rng.normal(1, 1, 30)
    n = np.r_[rng.normal(0, 1, 25), p[:3]]  # with ties
    pairs = (p[:, None] > n[None]).mean() + 0.5 * (p[:, None] == n[None]).mean()
    assert rank_auc(p, n) == pytest.approx(pairs, abs=1e-12)


def test_identical_distributions_give_chance_auc_and_zero_mmd():
    """Null: the held-out AUC of each fold has SD sqrt((n1+n2+1)/(12 n1 n2)) ~ 0.065 for
    40 + 40 held-out rows; the 5-fold mean (folds nearly independent) has SD ~ 0.03, so
    |AUC - 0.5| < 0.12 is a 4-SD band. The unbiased MMD^2 has mean 0 and, for 200 + 200 rows,
    SD of order 1e-3 (permutation spread), so |MMD^2| < 0.01; p-values are not small."""
    real, fake = _samples(1)
    auc = classifier_auc(real, fake, jax.random.PRNGKey(0))
    assert abs(auc - 0.5) < 0.12
    m2, p = mmd(real, fake, jax.random.PRNGKey(1), n_perm=200)
    assert abs(m2) < 0.01 and p > 0.01


def test_different_distributions_are_detected():
    real, fake = _samples(2, shift=1.5)
    assert classifier_auc(real, fake, jax.random.PRNGKey(0)) > 0.97
    m2, p = mmd(real, fake, jax.random.PRNGKey(1), n_perm=200)
    assert m2 > 0.1 and p == pytest.approx(1 / 201)  # no permutation reaches the observed
    # a variance-only difference needs the hidden layer (logistic regression cannot see it)
    real, fake = _samples(3, scale=2.5)
    assert classifier_auc(real, fake, jax.random.PRNGKey(0)) > 0.85
    assert classifier_auc(real, fake, jax.random.PRNGKey(0), hidden=0) < 0.65


def test_masks_padding_and_determinism():
    """Padded rows: masked entries are ignored (garbage there changes nothing); the same key
    gives the same result."""
    real, fake = _samples(4)
    mask = np.ones_like(real, bool)
    mask[::2, -3:] = False  # the same padding pattern in both samples
    junk_r, junk_f = real.copy(), fake.copy()
    junk_r[~mask], junk_f[~mask] = 1e6, np.nan
    k = jax.random.PRNGKey(5)
    a = classifier_auc(real, fake, k, real_mask=mask, fake_mask=mask)
    b = classifier_auc(junk_r, junk_f, k, real_mask=mask, fake_mask=mask)
    assert a == b
    m_a = mmd(real, fake, k, x_mask=mask, y_mask=mask, n_perm=50)
    assert m_a == mmd(junk_r, junk_f, k, x_mask=mask, y_mask=mask, n_perm=50)
    # a different padding pattern alone is a real difference (where samples exist): half the
    # real rows are padded and recognisable, the rest are not, so the ideal AUC is 0.75
    other = np.ones_like(mask)
    auc = classifier_auc(real, fake, k, real_mask=mask, fake_mask=other)
    assert 0.65 < auc <= 0.8


def test_bad_input():
    real, fake = _samples(6)
    with pytest.raises(ValueError, match="NaN"):
        classifier_auc(np.where(real > 2, np.nan, real), fake, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="features"):
        mmd(real, fake[:, :3])
    with pytest.raises(ValueError, match="mask shape"):
        mmd(real, fake, x_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match="at least 5 rows"):
        classifier_auc(real[:3], fake, jax.random.PRNGKey(0))
    assert np.isnan(mmd(real, fake)[1])  # no key: no permutation p-value
