"""Post-hoc joining: evaluators against closed forms, and the join workflow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import popkin
from popkin.reference import LinearEndpoint

SD = {"A": 0.4, "B": 0.3}
TRUE_OMEGA = np.array([[0.5, 0.35], [0.35, 0.6]])


Endpoint = LinearEndpoint


def make_data(n, seed, k=(4, 3)):
    rng = np.random.default_rng(seed)
    eta = rng.multivariate_normal([0, 0], TRUE_OMEGA, n)
    out = []
    for j, (name, mu) in enumerate([("A", 1.0), ("B", -1.0)]):
        rows = [(i + 1, float(t), mu + eta[i, j] + rng.normal(0, SD[name]))
                for i in range(n) for t in range(k[j])]  # fmt: skip
        out.append(pd.DataFrame(rows, columns=["ID", "TIME", "DV"]))
    return out


def exact_ll(fits, data, cov):
    """Closed-form marginal log-likelihood per subject under N(0, cov) over (eta_A, eta_B)."""
    mus = [float(f.params.theta["mu"]) for f in fits]
    sds = [float(f.params.sigma["sd"]) for f in fits]
    lls = []
    for i in sorted(set(data[0].ID)):
        ys = [d[d.ID == i].DV.to_numpy() for d in data]
        Z = np.zeros((sum(len(y) for y in ys), 2))
        Z[: len(ys[0]), 0] = 1
        Z[len(ys[0]) :, 1] = 1
        R = np.diag(np.r_[np.full(len(ys[0]), sds[0] ** 2), np.full(len(ys[1]), sds[1] ** 2)])
        C = Z @ cov @ Z.T + R
        r = np.r_[ys[0] - mus[0], ys[1] - mus[1]]
        lls.append(
            -0.5
            * (np.linalg.slogdet(C)[1] + r @ np.linalg.solve(C, r) + len(r) * np.log(2 * np.pi))
        )
    return np.array(lls)


@pytest.fixture(scope="module")
def fitted():
    train = make_data(60, 0)
    fits = [popkin.fit(Endpoint(), d, "focei", covariance=None) for d in train]
    return fits, train


def test_laplace_and_importance_sampling_match_closed_form(fitted):
    fits, _ = fitted
    test = make_data(15, 1)
    joint = popkin.join(fits, "gaussian", key=jax.random.key(0))
    for prior, cov in [(joint.prior, np.asarray(joint.prior.cov)), (joint.independent, None)]:
        if cov is None:
            cov = np.diag([float(f.params.omega[0, 0]) for f in fits])
        if prior is joint.prior:
            assert np.allclose(np.asarray(joint.prior.mean), 0, atol=0.2)
            # exact_ll assumes a zero-mean prior; shift the data by the prior mean instead.
            prior = popkin.Gaussian(prior.cov)
        ll = joint.log_likelihood(test, prior, n_is=4000, key=jax.random.key(1))
        ref = exact_ll(fits, test, cov)
        np.testing.assert_allclose(ll.ll_laplace, ref, atol=1e-6)
        # IS with a heavier-tailed proposal: unbiased in the weights; Monte Carlo error small.
        np.testing.assert_allclose(ll.ll_is, ref, atol=0.02)
        assert (ll.ess > 500).all() and ll.converged.all()


def test_gaussian_join_recovers_cross_endpoint_correlation(fitted):
    fits, _ = fitted
    joint = popkin.join(fits, "gaussian", key=jax.random.key(0))
    c = np.asarray(joint.prior.cov)
    corr = c[0, 1] / np.sqrt(c[0, 0] * c[1, 1])
    true_corr = TRUE_OMEGA[0, 1] / np.sqrt(TRUE_OMEGA[0, 0] * TRUE_OMEGA[1, 1])
    assert corr == pytest.approx(true_corr, abs=0.15)
    modes_only = popkin.join(fits, "gaussian", target="modes", key=jax.random.key(0))
    # Modes are shrunk: their spread is smaller than the expected posterior's.
    assert np.all(np.diag(modes_only.prior.cov) < np.diag(joint.prior.cov))
    # Joining improves held-out likelihood over the independent prior.
    test = make_data(40, 2)
    ll_joint = joint.log_likelihood(test).ll_laplace.sum()
    ll_ind = joint.log_likelihood(test, joint.independent).ll_laplace.sum()
    assert ll_joint > ll_ind


def test_conditional_prediction_uses_the_other_endpoint(fitted):
    """Observing endpoint A moves the prediction of unobserved B (only through the prior)."""
    fits, _ = fitted
    joint = popkin.join(fits, "gaussian", key=jax.random.key(0))
    a = pd.DataFrame(
        {"ID": [1, 1, 2, 2], "TIME": [0.0, 1.0, 0.0, 1.0], "DV": [3.0, 3.2, -1.0, -0.8]}
    )
    b = pd.DataFrame({"ID": [1, 2], "TIME": [0.0, 0.0], "DV": [np.nan, np.nan], "MDV": [1, 1]})
    pa, pb = joint.predict([a, b], key=jax.random.key(3))
    _, pb_ind = joint.predict([a, b], joint.independent, key=jax.random.key(3))
    # Subject 1 is high on A (positive correlation): B predicted above its typical value -1.
    assert pb.MEDIAN.iloc[0] > pb_ind.MEDIAN.iloc[0] + 0.3
    assert pb.MEDIAN.iloc[1] < pb_ind.MEDIAN.iloc[1]
    assert (pb.LOWER < pb.MEDIAN).all() and (pb.MEDIAN < pb.UPPER).all()
    assert pb_ind.MEDIAN.to_numpy() == pytest.approx(-1.0 + 0 * pb_ind.MEDIAN.to_numpy(), abs=0.15)


def test_flow_prior_learns_and_plugs_in(fitted):
    fits, _ = fitted
    joint = popkin.join(fits, "flow", key=jax.random.key(0), max_epochs=60)
    x = joint.prior.sample(jax.random.key(1), (2000,))
    assert x.shape == (2000, 2)
    c = np.corrcoef(np.asarray(x).T)[0, 1]
    assert c > 0.3
    lp = joint.prior.log_prob(jnp.zeros(2))
    assert np.isfinite(float(lp))
    test = make_data(10, 3)
    ll = joint.log_likelihood(test, n_is=500)
    assert np.all(np.isfinite(ll.ll_laplace)) and np.all(np.isfinite(ll.ll_is))
    # Laplace and IS agree closely (near-Gaussian posteriors).
    np.testing.assert_allclose(ll.ll_laplace, ll.ll_is, atol=0.1)


def test_join_rejects_disjoint_subjects(fitted):
    fits, _ = fitted
    other = make_data(5, 9)[0]
    other["ID"] += 1000
    f2 = popkin.fit(Endpoint(), other, "focei", maxeval=0, covariance=None)
    with pytest.raises(ValueError, match="share no subject"):
        popkin.join([fits[0], f2])
