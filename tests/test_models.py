"""Closed-form compartment models, parameter blocks, and simulation."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import expm

import popkin
from popkin.data._population import Doses
from popkin.models.library import Theophylline, TwoCmtOralComb


def doses(time, amt, cmt=0, rate=0.0, dur=0.0, ss=0, ii=0.0, end=np.inf):
    n = len(time)

    def f(x, dt=float):
        return jnp.broadcast_to(jnp.asarray(x, dt), (n,))

    return Doses(
        time=f(time), amt=f(amt), cmt=f(cmt, jnp.int32), rate=f(rate), dur=f(dur),
        ss=f(ss, jnp.int32), ii=f(ii), end=f(end), mask=f(True, bool),
    )  # fmt: skip


T = jnp.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0])
P2 = dict(cl=2.0, v=10.0, q=3.0, vp=20.0, ka=1.2)
P3 = dict(cl=2.0, v=10.0, q=3.0, vp=20.0, q2=0.5, vp2=50.0, ka=0.8)


def rate_matrix(p, n_per, oral):
    """Amount-based rate matrix K of a mammillary model (reference for expm)."""
    ks = [p["q"] / p["v"], p["q2"] / p["v"]][:n_per]
    kb = [p["q"] / p["vp"], p["q2"] / p["vp2"]][:n_per]
    m = 1 + n_per
    K = np.zeros((m, m))
    K[0, 0] = -(p["cl"] / p["v"] + sum(ks))
    for i in range(n_per):
        K[0, i + 1] = kb[i]
        K[i + 1, 0] = ks[i]
        K[i + 1, i + 1] = -kb[i]
    if not oral:
        return K
    Ko = np.zeros((m + 1, m + 1))
    Ko[0, 0] = -p["ka"]
    Ko[1, 0] = p["ka"]
    Ko[1:, 1:] = K
    return Ko


@pytest.mark.parametrize("n_per", [0, 1, 2])
@pytest.mark.parametrize("oral", [False, True])
def test_bolus_matches_matrix_exponential(n_per, oral):
    p = P3
    model = popkin.LinearPK(n_peripheral=n_per, oral=oral)
    got = np.asarray(model.amounts(p, doses([0.0], [100.0]), T, None))
    K = rate_matrix(p, n_per, oral)
    x0 = np.zeros(K.shape[0])
    x0[0] = 100.0
    ref = np.array([expm(K * t) @ x0 for t in np.asarray(T)])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-10)


def test_one_cmt_oral_analytic_with_lag_and_bioavailability():
    p = dict(ka=1.5, cl=2.0, v=10.0, lag=0.3, bioav=0.7)
    got = popkin.OneCmtOral().amounts(p, doses([0.0], [100.0]), T, None)[:, 1] / p["v"]
    k = p["cl"] / p["v"]
    te = np.maximum(np.asarray(T) - p["lag"], 0)
    ref = 0.7 * 100 * 1.5 / (10 * (1.5 - k)) * (np.exp(-k * te) - np.exp(-1.5 * te))
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_infusion_matches_analytic():
    p = dict(cl=2.0, v=10.0)
    rate, dur = 50.0, 2.0
    got = popkin.OneCmtIV().amounts(p, doses([0.0], [100.0], rate=rate, dur=dur), T, None)[:, 0]
    k = 0.2
    t = np.asarray(T)
    during = rate / k * (1 - np.exp(-k * t))
    after = rate / k * (1 - np.exp(-k * dur)) * np.exp(-k * (t - dur))
    np.testing.assert_allclose(got, np.where(t <= dur, during, after), rtol=1e-10)


@pytest.mark.parametrize(
    "model, p, kw",
    [
        (popkin.OneCmtIV(), dict(cl=2.0, v=10.0), {}),
        (popkin.OneCmtOral(), dict(ka=1.0, cl=2.0, v=10.0, lag=0.5), {}),
        (popkin.TwoCmtIV(), P2, dict(rate=50.0, dur=2.0)),
        (popkin.TwoCmtOral(), dict(P2, bioav=0.6), {}),
    ],
)
def test_steady_state_is_limit_of_repeated_doses(model, p, kw):
    tau = 12.0
    t = jnp.array([0.0, 0.3, 1.0, 3.0, 6.0, 11.9])
    ss = model.amounts(p, doses([0.0], [100.0], ss=1, ii=tau, **kw), t, None)
    n = 300
    many = model.amounts(p, doses(np.arange(-n + 1, 1) * tau, np.full(n, 100.0), **kw), t, None)
    np.testing.assert_allclose(ss, many, rtol=1e-8, atol=1e-10)


def test_reset_stops_a_dose_and_ss1_resets_earlier_doses():
    m = popkin.OneCmtIV()
    p = dict(cl=2.0, v=10.0)
    t = jnp.array([1.0, 4.9, 5.0, 6.0])
    a = m.amounts(p, doses([0.0], [100.0], end=5.0), t, None)[:, 0]
    assert a[0] > 0 and a[1] > 0 and a[2] == 0 and a[3] == 0
    # An SS=1 dose at t=5 replaces the history: same as the SS dose alone.
    both = m.amounts(p, doses([0.0, 5.0], [100.0, 50.0], ss=[0, 1], ii=[0.0, 12.0]), t, None)
    alone = m.amounts(p, doses([5.0], [50.0], ss=1, ii=12.0), t, None)
    np.testing.assert_allclose(both[2:], alone[2:], rtol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    amts=st.lists(st.floats(0.1, 1000.0), min_size=1, max_size=4),
    times=st.lists(st.floats(0.0, 20.0), min_size=4, max_size=4),
    scale=st.floats(0.01, 100.0),
    n_per=st.integers(0, 2),
)
def test_superposition_is_linear_in_dose(amts, times, scale, n_per):
    m = popkin.LinearPK(n_peripheral=n_per, oral=True)
    tt = jnp.asarray(sorted(times[: len(amts)]))
    t = jnp.linspace(0.0, 30.0, 13)
    whole = m.amounts(P3, doses(tt, amts), t, None)
    scaled = m.amounts(P3, doses(tt, np.asarray(amts) * scale), t, None)
    parts = sum(
        m.amounts(P3, doses(tt[i : i + 1], amts[i : i + 1]), t, None) for i in range(len(amts))
    )
    np.testing.assert_allclose(scaled, scale * whole, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(parts, whole, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kinds", [frozenset(), frozenset({"infusion"}), frozenset({"ss"})])
def test_superposition_skips_only_dose_kinds_that_do_not_occur(kinds):
    """With the static `Doses.kinds` saying which special doses occur, the closed form traces
    only those terms; on data of those kinds it equals the general expression (kinds None)."""
    m = popkin.LinearPK(n_peripheral=1, oral=True)
    tt = jnp.array([0.0, 5.0, 12.0])
    kw = {}
    if "infusion" in kinds:
        kw = dict(rate=jnp.array([0.0, 40.0, 0.0]), dur=jnp.array([0.0, 2.5, 0.0]))
    if "ss" in kinds:
        kw = dict(ss=jnp.array([1, 0, 0], jnp.int32), ii=jnp.array([12.0, 0.0, 0.0]))
    d = doses(tt, [100.0, 100.0, 50.0], **kw)
    t = jnp.linspace(0.0, 30.0, 31)
    general = m.amounts(P2, d, t, None)
    specific = m.amounts(P2, dataclasses.replace(d, kinds=kinds), t, None)
    np.testing.assert_allclose(specific, general, rtol=1e-13, atol=1e-13)
    if kinds:  # the data exercise the special terms: dropping them changes the amounts
        bolus_only = m.amounts(P2, dataclasses.replace(d, kinds=frozenset()), t, None)
        assert np.max(np.abs(np.asarray(bolus_only) - np.asarray(general))) > 1.0


def test_params_and_omega_transforms_round_trip():
    th = popkin.Params(a=1.5, b=popkin.Positive(2.0), c=popkin.Bounded(0.3, 0.0, 1.0),
                       d=popkin.Fixed(7.0))  # fmt: skip
    u = th.to_unconstrained(th.init_natural())
    assert u.shape == (3,)
    back = th.to_natural(u)
    for k, v in th.init_natural().items():
        assert float(back[k]) == pytest.approx(v, rel=1e-12)
    om = popkin.Omega.block(["x", "y"], [[0.2, 0.05], [0.05, 0.1]])
    om = popkin.Omega.combine(om, popkin.Omega(z=0.3))
    M = om.matrix_init()
    np.testing.assert_allclose(om.to_natural(om.to_unconstrained(M)), M, rtol=1e-12)
    with pytest.raises(ValueError, match="positive initial value"):
        popkin.Positive(-1.0)
    with pytest.raises(ValueError, match="not positive definite"):
        popkin.Omega.block(["x", "y"], [[0.1, 0.2], [0.2, 0.1]])


def test_model_replace_is_immutable():
    m = Theophylline()
    m2 = m.replace(theta=m.theta.fix(tcl=1.0))
    assert "tcl" not in m2.theta.free_names and "tcl" in m.theta.free_names


def test_simulate_round_trip_and_determinism(tmp_path):
    pop = popkin.datasets.theophylline()
    model = Theophylline()
    sim = popkin.simulate(model, pop, key=jax.random.key(1))
    again = popkin.simulate(model, pop, key=jax.random.key(1))
    pd.testing.assert_frame_equal(sim, again)
    path = tmp_path / "sim.csv"
    sim.to_csv(path, index=False)
    back = popkin.read_nonmem(path)
    assert back.covariates == pop.covariates  # PRED/IPRED/ETA_* are not covariates
    for a, b in zip(jax.tree.leaves(back.subjects.doses), jax.tree.leaves(pop.subjects.doses),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
    r0, r1 = pop.subjects.records, back.subjects.records
    for name in ["time", "obs", "rec", "endpoint", "cens", "cov", "row"]:
        np.testing.assert_array_equal(getattr(r0, name), getattr(r1, name))
    obs = np.asarray(r1.obs)
    np.testing.assert_allclose(
        np.asarray(r1.dv)[obs], sim["DV"].to_numpy()[np.asarray(r1.row)[obs]]
    )
    assert not np.allclose(np.asarray(r0.dv)[obs], np.asarray(r1.dv)[obs])


def test_simulated_eta_follow_omega():
    pop = popkin.datasets.theophylline()
    model = TwoCmtOralComb()
    sim = popkin.simulate(model, pop, key=jax.random.key(3), n_replicates=300)
    etas = sim.groupby("ID")[[f"ETA_{n}" for n in model.eta_names]].first().to_numpy()
    # 3600 draws: sample variance within ~5 standard errors of the truth.
    np.testing.assert_allclose(etas.var(axis=0), np.diag(model.omega.matrix_init()), rtol=0.12)
    assert sim["ID"].nunique() == 3600 and sim["REP"].max() == 300


def test_sample_before_a_dose_at_the_same_time_does_not_see_it():
    """NONMEM row order: a trough sampled on the row before a dose at the same time is pre-dose;
    an ADDL dose at a sample's time comes after the sample."""
    rows = [
        (1, 0.0, 0.0, 0.0, 0, 0, 0),  # baseline sample before the dose at t=0
        (1, 0.0, np.nan, 100.0, 1, 2, 12.0),  # dose at 0, then at 12 and 24 (ADDL)
        (1, 0.0, 0.0, 0.0, 0, 0, 0),  # sample after the dose row at t=0
        (1, 12.0, 0.0, 0.0, 0, 0, 0),  # trough at the time of the first ADDL dose
    ]
    df = pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "ADDL", "II"])
    sim = popkin.simulate(popkin.models.library.OneCmtIVProp(), popkin.read_nonmem(df),
                          key=jax.random.key(0))  # fmt: skip
    ipred = sim.loc[sim.EVID == 0, "PRED"].to_numpy()
    v = np.exp(2.0)
    assert ipred[0] == 0.0
    assert ipred[1] == pytest.approx(100.0 / v)
    assert ipred[2] == pytest.approx(100.0 / v * np.exp(-12.0 * 1.0 / v))
