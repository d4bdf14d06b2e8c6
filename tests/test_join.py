"""Post-hoc joining: evaluators against closed forms, and the join workflow."""

from __future__ import annotations

import warnings

import equinox as eqx
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


class _SymmetricMixture(eqx.Module):
    """0.5 N((-a, 0), S) + 0.5 N((a, 0), S), S = diag(sa^2, sb^2): its origin is a saddle of
    the negative log joint when -d^2 log p / d eta_A^2 = -(a^2 - sa^2) / sa^4 outweighs the
    data curvature."""

    a: float = 1.0
    sa: float = 0.2
    sb: float = 0.7

    def _comps(self):
        return [popkin.Gaussian(jnp.diag(jnp.array([self.sa**2, self.sb**2])),
                                jnp.array([m, 0.0])) for m in (-self.a, self.a)]  # fmt: skip

    def log_prob(self, eta):
        lps = jnp.stack([c.log_prob(eta) for c in self._comps()])
        return jax.scipy.special.logsumexp(lps, axis=0) + jnp.log(0.5)

    def sample(self, key, shape=()):
        k1, k2 = jax.random.split(key)
        x = self._comps()[0].sample(k1, shape)
        flip = jax.random.bernoulli(k2, 0.5, shape)
        return x.at[..., 0].set(jnp.where(flip, -x[..., 0], x[..., 0]))


def test_saddle_of_prior_restarts_mode_search(fitted):
    """At a saddle of the negative log joint (the old evaluator stopped there: Laplace NaN,
    proposal ~10^4 too wide, ESS ~ 1), the mode search restarts down the negative curvature
    and lands on one of the two symmetric modes. The exact marginal is the mixture of two
    Gaussian marginals of equal value, so a one-mode Laplace is exact up to log 2 (the other
    mode's mass). Importance sampling around one mode is reliable only where its ESS is high
    (then it matches the one-mode mass); elsewhere the small ESS must say so."""
    fits, _ = fitted
    mu = [float(f.params.theta["mu"]) for f in fits]
    # Endpoint A observed exactly at its typical value: zero gradient at eta = 0 by symmetry.
    a = pd.DataFrame({"ID": [1, 1, 2, 2, 3, 3], "TIME": [0.0, 1.0] * 3, "DV": [mu[0]] * 6})
    b = pd.DataFrame({"ID": [1, 2, 3], "TIME": [0.0] * 3, "DV": [mu[1] - 0.5, mu[1], mu[1] + 1]})
    prior = _SymmetricMixture()
    joint = popkin.join(fits, prior)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Laplace undefined" warning expected
        ll = joint.log_likelihood([a, b], n_is=2000, key=jax.random.key(4))
    comps = prior._comps()
    per = []
    for c in comps:
        shifted = [a.assign(DV=a.DV - float(c.mean[0])), b.assign(DV=b.DV - float(c.mean[1]))]
        per.append(exact_ll(fits, shifted, np.asarray(c.cov)))
    exact = np.logaddexp(per[0], per[1]) + np.log(0.5)
    assert ll.laplace_defined.all()
    np.testing.assert_allclose(ll.ll_laplace, exact - np.log(2), atol=1e-6)
    # A one-mode Student-t proposal has full support, so IS targets the two-mode marginal; where
    # its tails reach the other mode a few huge weights dominate. Such estimates must be flagged
    # by a small ESS; where the ESS is high, IS agrees with the one-mode mass.
    ess, ll_is, one_mode = ll.ess.to_numpy(), ll.ll_is.to_numpy(), exact - np.log(2)
    good = ess > 1000
    assert good.any()
    np.testing.assert_allclose(ll_is[good], one_mode[good], atol=0.03)
    assert (ess[~good] < 50).all(), ess
    eta, cov, _ = joint.posterior([a, b])
    # mode of eta_A under the nearer component N(+-a, sa^2) and two samples of A at its typical
    # value (the other component's weight there is ~e^-30): the precision-weighted mean
    sd_a = float(fits[0].params.sigma["sd"])
    expected = (prior.a / prior.sa**2) / (1 / prior.sa**2 + 2 / sd_a**2)
    np.testing.assert_allclose(np.abs(eta[:, 0]), expected, atol=1e-4)
    assert np.all(np.linalg.eigvalsh(cov) > 0)


def test_undefined_laplace_is_reported_not_silent(fitted, monkeypatch):
    """When no PD mode is found, ll_laplace is NaN with a warning naming the subjects and
    `laplace_defined` False, and IS falls back to the Gauss-Newton curvature (here, for a
    Gaussian prior and a linear model, the exact curvature: IS stays on the closed form). The
    mode search is forced to report "not PD" to reach this path deterministically."""
    from popkin.join import _joint

    real = _joint._modes
    monkeypatch.setattr(_joint, "_modes", lambda *a: (real(*a)[0], np.zeros(4, bool)))
    fits, _ = fitted
    test = make_data(4, 5)
    cov = np.array([[0.5, 0.2], [0.2, 0.6]])
    joint = popkin.join(fits, popkin.Gaussian(cov))
    with pytest.warns(RuntimeWarning, match=r"Laplace approximation undefined .* 4 subject"):
        ll = joint.log_likelihood(test, n_is=2000, key=jax.random.key(2))
    assert not ll.laplace_defined.any() and ll.ll_laplace.isna().all()
    np.testing.assert_allclose(ll.ll_is, exact_ll(fits, test, cov), atol=0.03)
    assert (ll.ess > 1000).all()


def test_flow_validation_split_is_by_subject(fitted, monkeypatch):
    """`join(..., "flow")` hands flowjax the draws grouped by subject, so its train/validation
    split (along the first axis) keeps each subject's draws on one side."""
    import flowjax.train

    seen = {}
    real = flowjax.train.fit_to_data

    def spy(key, dist, data, **kw):
        seen["shape"] = data.shape
        seen["batch_size"] = kw["batch_size"]
        return real(key, dist, data, **kw)

    monkeypatch.setattr(flowjax.train, "fit_to_data", spy)
    fits, _ = fitted
    joint = popkin.join(fits, "flow", key=jax.random.key(0), n_samples=20, max_epochs=5)
    assert seen["shape"] == (60, 20, 2)
    # whole subjects per batch (256 draws // 20), capped at the 6 validation subjects
    assert seen["batch_size"] == min(256 // 20, 6)
    assert np.isfinite(joint.losses["val"]).all()


@pytest.mark.parametrize("whiten", ["full", "diag"])
def test_flow_starts_at_the_moment_matched_gaussian(whiten):
    """`fit_flow` whitens the draws and starts every coupling at the identity, so before any
    update (learning rate 0) the flow is exactly the Gaussian with the draws' mean and
    covariance ("full") or their per-coordinate variances ("diag")."""
    from popkin.join import fit_flow

    rng = np.random.default_rng(0)
    x = rng.multivariate_normal([1.0, -2.0, 0.5], [[1.0, 0.6, 0.2], [0.6, 2.0, -0.3],
                                                   [0.2, -0.3, 0.5]], 300)  # fmt: skip
    flow, _ = fit_flow(x, key=jax.random.key(0), max_epochs=1, learning_rate=0.0, whiten=whiten)
    cov = np.cov(x, rowvar=False, bias=False)
    if whiten == "diag":
        cov = np.diag(x.var(0))
    ref = popkin.Gaussian(jnp.asarray(cov), jnp.asarray(x.mean(0)))
    q = x[:25] + 0.3
    np.testing.assert_allclose(flow.log_prob(q), ref.log_prob(q), rtol=1e-9, atol=1e-9)
