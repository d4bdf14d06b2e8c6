"""Several endpoints in one model, full Omega across them, and sequential PK -> PD."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import popkin
from popkin.models.library import OneCmtIVProp
from popkin.reference import RecordTimes

OMEGA = np.array([[0.5, 0.3], [0.3, 0.4]])


class TwoEndpointLinear(popkin.Model):
    """y_A = a + eta_A + eps_A (DVID 1), y_B = b + eta_B + eps_B (DVID 2), correlated etas."""

    theta = popkin.Params(a=1.0, b=-2.0)
    omega = popkin.Omega.block(["eta_a", "eta_b"], OMEGA)
    sigma = popkin.Params(sd_a=popkin.Positive(0.3), sd_b=popkin.Positive(0.5))
    dynamics = RecordTimes()

    def individual(self, th, eta, cov):
        return dict(ma=th.a + eta.eta_a, mb=th.b + eta.eta_b)

    def observe(self, p, sol, sg):
        z = 0.0 * sol.t
        return {
            "A": popkin.additive(p["ma"] + z, sg.sd_a),
            "B": popkin.additive(p["mb"] + z, sg.sd_b),
        }


def two_endpoint_data(n=25, seed=0):
    rng = np.random.default_rng(seed)
    eta = rng.multivariate_normal([0, 0], OMEGA, n)
    rows = []
    for i in range(n):
        for j in range(3):
            rows.append((i + 1, float(j), 1.0 + eta[i, 0] + rng.normal(0, 0.3), 1))
        for j in range(2):
            rows.append((i + 1, 3.0 + j, -2.0 + eta[i, 1] + rng.normal(0, 0.5), 2))
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "DVID"])


def exact_ofv(df):
    total = 0.0
    for _, g in df.groupby("ID"):
        Z = np.stack([(g.DVID == 1).to_numpy(), (g.DVID == 2).to_numpy()], 1).astype(float)
        mu = Z @ np.array([1.0, -2.0])
        R = np.diag(np.where(g.DVID == 1, 0.3**2, 0.5**2))
        C = Z @ OMEGA @ Z.T + R
        r = g.DV.to_numpy() - mu
        total += np.linalg.slogdet(C)[1] + r @ np.linalg.solve(C, r)
    return total


@pytest.mark.parametrize("method", ["foce", "laplace"])
def test_two_endpoints_full_omega_objective_is_exact(method):
    df = two_endpoint_data()
    fit = popkin.fit(TwoEndpointLinear(), df, method, maxeval=0, covariance=None)
    assert fit.ofv == pytest.approx(exact_ofv(df), abs=1e-8)


def test_endpoints_are_matched_to_dvid():
    df = two_endpoint_data()
    fit = popkin.fit(TwoEndpointLinear(), df, "foce", maxeval=0, covariance=None)
    pr = fit.predictions
    # PRED is a on DVID 1 rows and b on DVID 2 rows.
    np.testing.assert_allclose(pr.loc[pr.DVID == 1, "PRED"], 1.0)
    np.testing.assert_allclose(pr.loc[pr.DVID == 2, "PRED"], -2.0)


class EmaxFromIndividualPK(popkin.Model):
    """Direct Emax effect driven by the subject's individual PK (covariates PK_CL, PK_V)."""

    theta = popkin.Params(e0=popkin.Positive(10.0), emax=popkin.Positive(40.0),
                          ec50=popkin.Positive(2.0))  # fmt: skip
    omega = popkin.Omega(eta_e0=0.05, eta_ec50=0.1)
    sigma = popkin.Params(sd=popkin.Positive(1.0))
    dynamics = popkin.OneCmtIV()

    def individual(self, th, eta, cov):
        return dict(cl=cov.PK_CL, v=cov.PK_V, e0=th.e0 * jnp.exp(eta.eta_e0), emax=th.emax,
                    ec50=th.ec50 * jnp.exp(eta.eta_ec50))  # fmt: skip

    def observe(self, p, sol, sg):
        c = sol.central / p["v"]
        return {"effect": popkin.additive(p["e0"] + p["emax"] * c / (p["ec50"] + c), sg.sd)}


@pytest.mark.slow
def test_sequential_pk_then_pd_recovers_pd_parameters():
    n = 40
    rows = []
    for i in range(n):
        # A drug-free baseline sample, then the dose at 1 h, then samples over 24 h.
        rows.append((i + 1, 0.0, 0.0, 0.0, 0))
        rows.append((i + 1, 1.0, np.nan, 100.0, 1))
        for t in [1.5, 2, 3, 5, 9, 13, 25]:
            rows.append((i + 1, float(t), 0.0, 0.0, 0))
    design = pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID"])
    pk_truth = popkin.ModelParams(theta=dict(tcl=0.5, tv=2.5), omega=jnp.diag(jnp.array([0.09, 0.04])),
                                  sigma=dict(prop_sd=0.1))  # fmt: skip
    pk_data = popkin.simulate(OneCmtIVProp(), popkin.read_nonmem(design), pk_truth,
                              key=jax.random.key(0))  # fmt: skip
    # PK is sampled after the dose only (a zero prediction has zero proportional error SD).
    pk_data = pk_data[pk_data["TIME"] > 0][["ID", "TIME", "DV", "AMT", "EVID"]]
    pk_fit = popkin.fit(OneCmtIVProp(), pk_data, "focei")
    assert pk_fit.status in (popkin.FitStatus.SUCCESS, popkin.FitStatus.COVARIANCE_FAILED)
    pd_design = popkin.nlme.with_individual_parameters(design, pk_fit)
    assert {"PK_CL", "PK_V"} <= set(pd_design.columns)
    pd_truth = popkin.ModelParams(theta=dict(e0=10.0, emax=40.0, ec50=2.0),
                                  omega=jnp.diag(jnp.array([0.05, 0.1])), sigma=dict(sd=1.0))  # fmt: skip
    pd_data = popkin.simulate(EmaxFromIndividualPK(), popkin.read_nonmem(pd_design), pd_truth,
                              key=jax.random.key(1))  # fmt: skip
    pd_data = pd_data.drop(columns=["PRED", "IPRED", "ETA_eta_e0", "ETA_eta_ec50"])
    pd_fit = popkin.fit(EmaxFromIndividualPK(), pd_data, "focei", covariance=None)
    est = pd_fit.estimates.set_index("parameter")["estimate"]
    assert est["e0"] == pytest.approx(10.0, rel=0.1)
    assert est["emax"] == pytest.approx(40.0, rel=0.15)
    assert est["ec50"] == pytest.approx(2.0, rel=0.3)
    # fix_from carries shared typical values as FIXED parameters.
    fixed = popkin.nlme.fix_from(OneCmtIVProp(), pk_fit)
    assert fixed.theta.free_names == ()
