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


def test_paired_rows_need_group_folds():
    """Real and fake rows in pairs sharing a design feature (here a per-pair offset, as a
    sampling design would be): with plain folds a held-out row's partner trains with the other
    label and the AUC falls below 0.5 (anti-learning); folds by pair restore ~0.5."""
    rng = np.random.default_rng(7)
    design = rng.normal(size=(60, 4)) * 3.0
    real = np.c_[design, rng.normal(size=(60, 2))]
    fake = np.c_[design, rng.normal(size=(60, 2))]
    k = jax.random.PRNGKey(3)
    pairs = np.arange(60)
    grouped = classifier_auc(real, fake, k, real_groups=pairs, fake_groups=pairs)
    assert abs(grouped - 0.5) < 0.15  # 5 folds of 12 + 12: SD ~ 0.12 / sqrt(5) ~ 0.055
    assert classifier_auc(real, fake, k) < grouped - 0.1  # plain folds: anti-learning
    with pytest.raises(ValueError, match="both"):
        classifier_auc(real, fake, k, real_groups=pairs)
    # MMD: permuting within pairs is the paired null; a real shift is still found
    _, p_pairs = mmd(real, fake, k, x_groups=pairs, y_groups=pairs, n_perm=200)
    assert p_pairs > 0.01
    _, p_shift = mmd(real, fake + 1.0, k, x_groups=pairs, y_groups=pairs, n_perm=200)
    assert p_shift == pytest.approx(1 / 201)


@pytest.mark.slow
def test_cohorts_benchmark_quick(tmp_path):
    """`benchmarks/cohorts.py --quick` end to end on the shipped model (writes to tmp)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "cohorts.py"
    spec = importlib.util.spec_from_file_location("cohorts_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick", "--model", "small", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "cohorts_quick.json").read_text())
    assert [r["data"] for r in out["rows"]] == ["synthetic", "theophylline", "indometacin"]
    for r in out["rows"]:
        assert 0.0 <= r["auc"] <= 1.0 and np.isfinite(r["mmd"]) and 0.0 < r["mmd_p"] <= 1.0
    assert {r["compound"] for r in out["realism"]} == {"theophylline", "indometacin"}
    assert any(r["cohort"] == "generated dense" and r["n"] > 0 for r in out["realism"])
    assert (tmp_path / "cohorts_theophylline.png").stat().st_size > 10_000
    assert "classifier AUC" in (tmp_path / "cohorts_quick.md").read_text()
