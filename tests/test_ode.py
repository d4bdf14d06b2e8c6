"""ODE dynamics (`popkin.models._ode`) against the closed-form linear models and SciPy.

Amounts in mg, times in h, clearances in L/h, volumes in L. To keep compile time low, every
linear scenario runs through one jitted, vmapped call of one hand-written linear ODE (doses
padded to `D`, records `TIMES`): the 2-compartment model with a depot covers 1-compartment
models with `q = 0` and IV models with doses into `central`.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import dataclasses  # noqa: E402
import functools  # noqa: E402

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from popkin.data._population import Doses, dose_kinds  # noqa: E402
from popkin.models import _linear as lin  # noqa: E402
from popkin.models._ode import ODE  # noqa: E402
from popkin.models._pd import (  # noqa: E402
    emax,
    linear_progression,
    pk_turnover_ode,
    turnover,
    turnover_baseline,
)
from popkin.models._rk import UnrolledTsit5  # noqa: E402

D = 4  # doses per subject after padding
TIMES = np.array(
    [0.0, 0.5, 0.8, 1.0, 2.0, 4.0, 8.0, 12.0, 12.5, 16.0, 24.0, 30.0, 36.0, 40.0, 48.0, 60.0]
)
INF = np.inf


def make_doses(rows: list[dict], n: int = D) -> Doses:
    """`Doses` from dicts (time, amt, cmt, rate, dur, ss, ii, end), padded to `n` entries."""
    default = dict(time=0.0, amt=0.0, cmt=0, rate=0.0, dur=0.0, ss=0, ii=0.0, end=INF)
    rows = [{**default, **r} for r in rows]
    pad = [dict(default)] * (n - len(rows))
    col = lambda k, dt: jnp.asarray(np.array([r[k] for r in rows + pad], dtype=dt))
    return Doses(
        time=col("time", float),
        amt=col("amt", float),
        cmt=col("cmt", np.int32),
        rate=col("rate", float),
        dur=col("dur", float),
        ss=col("ss", np.int32),
        ii=col("ii", float),
        end=col("end", float),
        mask=jnp.asarray(np.arange(n) < len(rows)),
    )


def inf_row(time, rate, dur, **kw) -> dict:
    """An infusion of `rate` (mg/h) for `dur` (h)."""
    return dict(time=time, amt=rate * dur, rate=rate, dur=dur, **kw)


def linear_rhs(t, s, p):
    """Depot -> central <-> peripheral, elimination from central; returns an array (mg/h)."""
    k10, k12, k21 = p["cl"] / p["v"], p["q"] / p["v"], p["q"] / p["vp"]
    absorbed = p["ka"] * s.depot
    central, peripheral = s["central"], s.array[2]
    return jnp.stack(
        [
            -absorbed,
            absorbed - (k10 + k12) * central + k21 * peripheral,
            k12 * central - k21 * peripheral,
        ]
    )


LINEAR_ODE = ODE(linear_rhs, ("depot", "central", "peripheral"))

ORAL1 = dict(ka=1.2, cl=2.0, v=10.0)
IV1 = dict(cl=3.0, v=15.0)
IV2 = dict(cl=3.0, v=15.0, q=4.0, vp=30.0)
ORAL2 = dict(ka=0.9, cl=3.0, v=15.0, q=4.0, vp=30.0)

# name: (closed-form model, parameters, dose rows in the closed form's CMT numbering, resets)
SCENARIOS = {
    "oral1_single": (lin.OneCmtOral(), ORAL1, [dict(amt=100.0)], []),
    "oral1_repeated": (
        lin.OneCmtOral(),
        ORAL1,
        [dict(time=t, amt=100.0) for t in (0.0, 12.0, 24.0, 36.0)],
        [],
    ),
    "oral1_lag_bioav": (
        lin.OneCmtOral(),
        {**ORAL1, "lag": 0.8, "bioav": 0.6},
        [dict(amt=100.0), dict(time=12.0, amt=50.0)],
        [],
    ),
    "oral1_ss1_lag": (
        lin.OneCmtOral(),
        {**ORAL1, "lag": 0.8, "bioav": 0.7},
        [dict(amt=100.0, ss=1, ii=12.0), dict(time=12.0, amt=100.0)],
        [],
    ),
    "oral1_reset": (
        lin.OneCmtOral(),
        ORAL1,
        [dict(amt=100.0, end=30.0), dict(time=24.0, amt=80.0, end=30.0), dict(time=36.0, amt=60.0)],
        [30.0],
    ),
    "oral1_ss2": (
        lin.OneCmtOral(),
        ORAL1,
        [dict(amt=100.0), dict(time=24.0, amt=50.0, ss=2, ii=8.0)],
        [],
    ),
    "oral1_infusion": (lin.OneCmtOral(), ORAL1, [inf_row(2.0, 25.0, 4.0)], []),
    "iv1_infusion": (
        lin.OneCmtIV(),
        IV1,
        [inf_row(0.0, 50.0, 2.0), dict(time=24.0, amt=100.0), inf_row(30.0, 20.0, 15.0)],
        [],
    ),
    "iv1_ss1_infusion": (
        lin.OneCmtIV(),
        IV1,
        [
            inf_row(0.0, 50.0, 2.0, ss=1, ii=12.0),
            inf_row(12.0, 50.0, 2.0),
            inf_row(24.0, 50.0, 2.0),
        ],
        [],
    ),
    "iv1_continuous_ss_reset": (
        lin.OneCmtIV(),
        IV1,
        [dict(amt=0.0, rate=10.0, dur=INF, ss=1, end=40.0), dict(time=48.0, amt=100.0)],
        [40.0],
    ),
    "iv1_ss1_then_ss1": (
        lin.OneCmtIV(),
        IV1,
        [dict(amt=100.0, ss=1, ii=12.0), dict(time=24.0, amt=40.0, ss=1, ii=6.0)],
        [],
    ),
    "iv2_multiple": (
        lin.TwoCmtIV(),
        IV2,
        [dict(amt=100.0), inf_row(12.0, 50.0, 2.0), dict(time=36.0, amt=100.0)],
        [],
    ),
    "iv2_ss1_ss2": (
        lin.TwoCmtIV(),
        IV2,
        [dict(amt=100.0, ss=1, ii=12.0), inf_row(24.0, 25.0, 4.0, ss=2, ii=24.0)],
        [],
    ),
    "oral2_lag_bioav": (
        lin.TwoCmtOral(),
        {**ORAL2, "lag": 0.5, "bioav": 0.8},
        [dict(time=t, amt=100.0) for t in (0.0, 12.0, 24.0)],
        [],
    ),
    "oral2_ss1_lag_reset": (
        lin.TwoCmtOral(),
        {**ORAL2, "lag": 0.5},
        [dict(amt=100.0, ss=1, ii=12.0, end=40.0), dict(time=12.0, amt=100.0, end=40.0)],
        [40.0],
    ),
    # Absurdly stiff (k10 = 1e9 /h): Tsit5 cannot finish within max_steps -> NaN, no exception.
    "stiff_failure": (lin.OneCmtIV(), dict(cl=1e10, v=10.0), [dict(amt=100.0)], []),
}


def ode_inputs(model: lin.LinearPK, p: dict, rows: list[dict], resets: list[float]):
    """Parameters, doses and resets for `LINEAR_ODE` equivalent to the closed-form model."""
    shift = 0 if model.oral else 1  # IV central is the ODE's state 1
    q = {"ka": 1.0, "q": 0.0, "vp": 1.0, "lag": 0.0, "bioav": 1.0, **p}
    doses = make_doses([{**r, "cmt": r.get("cmt", 0) + shift} for r in rows])
    return q, doses, jnp.asarray(np.array(resets + [INF] * (2 - len(resets)), float))


@functools.partial(jax.jit, static_argnames=("n_peripheral", "oral"))
def closed_form(p: dict, doses: Doses, times, n_peripheral: int, oral: bool):
    """Closed-form amounts (jitted: eager evaluation compiles every small op separately)."""
    p = {"lag": 0.0, "bioav": 1.0, **p}  # one pytree structure per model
    return lin.LinearPK(n_peripheral=n_peripheral, oral=oral).amounts(p, doses, times)


def reference(model: lin.LinearPK, p: dict, doses: Doses, times) -> np.ndarray:
    return np.asarray(closed_form(p, doses, jnp.asarray(times), model.n_peripheral, model.oral))


@jax.jit
def _batched_amounts(p, doses, resets):
    times = jnp.asarray(TIMES)
    return jax.vmap(lambda p, d, r: LINEAR_ODE.amounts(p, d, times, r))(p, doses, resets)


@functools.cache
def linear_results() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{scenario: (ODE amounts of the closed form's states, closed-form amounts, all ODE states)}.

    One jitted, vmapped ODE call for all scenarios.
    """
    inputs = [ode_inputs(m, p, rows, rs) for m, p, rows, rs in SCENARIOS.values()]
    stack = lambda *xs: jnp.stack(xs)
    p, doses, resets = jax.tree.map(stack, *inputs)
    out = np.asarray(_batched_amounts(p, doses, resets))
    results = {}
    for k, (name, (model, pp, rows, _)) in enumerate(SCENARIOS.items()):
        ref = reference(model, pp, make_doses(rows), TIMES)
        shift = 0 if model.oral else 1
        results[name] = (out[k][:, shift : shift + ref.shape[1]], ref, out[k])
    return results


def assert_close(got, ref, rtol=1e-6, floor=1e-6):
    """Relative error < rtol where |ref| > floor * max|ref| (per state); below, < floor * max."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert np.all(np.isfinite(got))
    scale = np.max(np.abs(ref), axis=0, keepdims=True)
    big = np.abs(ref) > floor * scale
    rel = np.abs(got - ref) / np.where(big, np.abs(ref), 1.0)
    assert np.max(np.where(big, rel, 0.0)) < rtol, np.max(np.where(big, rel, 0.0))
    assert np.all(np.abs(got - ref) <= rtol * np.abs(ref) + floor * scale)


@pytest.mark.parametrize("name", [k for k in SCENARIOS if k != "stiff_failure"])
def test_matches_closed_form(name):
    got, ref, full = linear_results()[name]
    assert_close(got, ref)
    model = SCENARIOS[name][0]
    if not model.oral:
        assert np.all(full[:, 0] == 0.0)  # IV: the depot stays empty
    if model.n_peripheral == 0:
        assert np.allclose(full[:, 2], 0.0)  # q = 0: the peripheral stays empty


def test_record_at_dose_time_sees_dose():
    got, ref, _ = linear_results()["iv1_ss1_then_ss1"]
    t24 = int(np.flatnonzero(TIMES == 24.0)[0])
    # SS=1 at 24 h replaces the state by the new steady state, then the bolus of 40 mg.
    assert got[t24, 0] > 40.0
    np.testing.assert_allclose(got[t24, 0], ref[t24, 0], rtol=1e-6)


def test_failed_solve_gives_nan():
    _, _, full = linear_results()["stiff_failure"]
    assert np.all(np.isnan(full))
    # The failing subject did not spoil the others in the same vmapped batch.
    assert all(
        np.all(np.isfinite(v[2])) for k, v in linear_results().items() if k != "stiff_failure"
    )


def test_steady_state_is_limit_of_repeated_doses():
    model, ii = lin.TwoCmtOral(), 12.0
    p = {**ORAL2, "lag": 0.5}
    n = 200
    many = make_doses([dict(time=k * ii, amt=100.0) for k in range(n)], n=n)
    t_ss = (n - 1) * ii
    times = t_ss + TIMES[TIMES < ii]
    ref = reference(model, p, many, times)
    ss = make_doses([dict(time=t_ss, amt=100.0, ss=1, ii=ii)], n=1)
    assert_close(reference(model, p, ss, times), ref, rtol=1e-9)
    # And the ODE's SS=1 equals the closed form's SS=1 (same dosing, shifted to t = 0).
    got, ref0, _ = linear_results()["oral2_ss1_lag_reset"]
    assert_close(got[TIMES < ii], np.asarray(ref)[: int(np.sum(TIMES < ii))])
    assert_close(got[TIMES < ii], ref0[TIMES < ii])


# -- turnover PD ---------------------------------------------------------------------------------

PD_THETA = dict(ka=1.1, cl=2.0, v=10.0, kin=5.0, kout=0.25, imax=0.9, ic50=1.5)
PD_DOSES = [(0.0, 100.0), (24.0, 100.0)]  # (time h, amt mg) into the depot


def scipy_turnover(p: dict, times: np.ndarray) -> np.ndarray:
    """Reference: Radau with tight tolerances, integrated piecewise between boluses."""

    def f(t, y):
        c = y[1] / p["v"]
        inh = 1 - p["imax"] * c / (p["ic50"] + c)
        return [
            -p["ka"] * y[0],
            p["ka"] * y[0] - p["cl"] / p["v"] * y[1],
            p["kin"] * inh - p["kout"] * y[2],
        ]

    y = np.array([0.0, 0.0, p["kin"] / p["kout"]])
    out = np.zeros((len(times), 3))
    bounds = [t for t, _ in PD_DOSES] + [np.inf]
    for (td, amt), t_next in zip(PD_DOSES, bounds[1:], strict=True):
        y = y + np.array([amt * p.get("bioav", 1.0), 0.0, 0.0])
        sel = (times >= td) & (times < t_next)
        t_end = min(t_next, times[-1]) if np.isfinite(t_next) else times[-1]
        sol = solve_ivp(
            f, (td, t_end), y, method="Radau", rtol=1e-10, atol=1e-10, dense_output=True
        )
        out[sel] = sol.sol(times[sel]).T
        y = sol.y[:, -1]
    return out


def test_turnover_matches_scipy_and_vmap():
    ode = pk_turnover_ode("oral1", kind="inhibit", on="kin")
    doses = make_doses([dict(time=t, amt=a) for t, a in PD_DOSES])
    times = TIMES[TIMES >= PD_DOSES[0][0]]
    subjects = [
        {**PD_THETA, "bioav": 0.0},  # no drug
        {**PD_THETA, "bioav": 1.0},
        {**PD_THETA, "ka": 0.5, "cl": 4.0, "kout": 0.1, "imax": 0.6, "ic50": 0.8, "bioav": 1.0},
    ]
    p = jax.tree.map(lambda *x: jnp.asarray(x), *subjects)
    out = jax.jit(jax.vmap(lambda q: ode.amounts(q, doses, jnp.asarray(times))))(p)
    out = np.asarray(out)
    assert out.shape == (3, len(times), 3)
    np.testing.assert_allclose(out[0][:, 2], PD_THETA["kin"] / PD_THETA["kout"], rtol=1e-12)
    np.testing.assert_allclose(out[0][:, :2], 0.0, atol=1e-12)
    for q, got in zip(subjects[1:], out[1:], strict=True):
        assert_close(got, scipy_turnover(q, times))
    assert not np.allclose(out[1], out[2])


def test_hessian_matches_finite_differences():
    names = ("ka", "cl", "v", "kin", "kout", "ic50")
    ode = pk_turnover_ode("oral1", kind="inhibit", on="kin", rtol=1e-10, atol=1e-12)
    doses = make_doses([dict(time=t, amt=a) for t, a in PD_DOSES])
    times = jnp.asarray(TIMES[1::2])
    theta0 = jnp.log(jnp.array([PD_THETA[k] for k in names]))

    def f(theta):
        p = {**dict(zip(names, jnp.exp(theta), strict=True)), "imax": PD_THETA["imax"]}
        a = ode.amounts(p, doses, times)
        return jnp.sum(jnp.log(a[:, 1] / p["v"])) + jnp.sum(a[:, 2] ** 2) / 100.0

    grad = jax.jacfwd(f)
    hess_and_grad = jax.jit(jax.vmap(jax.jacfwd(lambda t: (grad(t), grad(t)), has_aux=True)))
    h = 1e-4
    eye = jnp.eye(len(names))
    points = jnp.concatenate([theta0[None], theta0 + h * eye, theta0 - h * eye])
    H, g = hess_and_grad(points)
    H0 = np.asarray(H[0])
    assert np.all(np.isfinite(H0))
    np.testing.assert_allclose(H0, H0.T, rtol=1e-8, atol=1e-10 * np.abs(H0).max())
    fd = np.asarray((g[1 : 1 + len(names)] - g[1 + len(names) :]) / (2 * h)).T  # column i: d/dθ_i
    assert np.max(np.abs(fd - H0)) / np.abs(H0).max() < 1e-4


# -- PD building blocks ----------------------------------------------------------------------


def test_pd_functions():
    c = jnp.array([0.0, 1.0, 4.0])
    np.testing.assert_allclose(emax(c, 1.0, 10.0, 2.0), [1.0, 1 + 10 / 3, 1 + 40 / 6])
    np.testing.assert_allclose(emax(c, 0.0, 1.0, 2.0, hill=2.0), [0.0, 1 / 5, 16 / 20])
    assert np.all(np.isfinite(jax.grad(lambda h: emax(0.0, 0.0, 1.0, 2.0, h))(1.5)))
    kin, kout = 4.0, 0.5
    r0 = turnover_baseline(kin, kout)
    assert r0 == 8.0
    x = 2.0  # c = ic50 -> half effect
    common = dict(imax=0.6, ic50=2.0)
    stim = dict(smax=2.0, sc50=2.0)
    np.testing.assert_allclose(turnover(x, r0, kin, kout, on="kin", **common), kin * 0.7 - 4.0)
    np.testing.assert_allclose(turnover(x, r0, kin, kout, on="kout", **common), kin - 0.5 * 0.7 * 8)
    np.testing.assert_allclose(turnover(x, r0, kin, kout, on="kin", **stim), kin * 2.0 - 4.0)
    np.testing.assert_allclose(turnover(x, r0, kin, kout, on="kout", **stim), kin - 0.5 * 2.0 * 8)
    for on in ("kin", "kout"):
        for kw in (common, stim):
            assert turnover(0.0, r0, kin, kout, on=on, **kw) == 0.0  # baseline is an equilibrium
    with pytest.raises(ValueError):
        turnover(x, r0, kin, kout)
    assert linear_progression(2.0, 10.0, 0.5) == 11.0
    iv = pk_turnover_ode("iv1", kind="stimulate", on="kout")
    assert iv.states == ("central", "effect")
    p = dict(cl=1.0, v=2.0, kin=3.0, kout=0.5, smax=1.0, sc50=1.0)
    np.testing.assert_allclose(iv.init(p), [0.0, 6.0])
    np.testing.assert_allclose(
        iv.vector_field(0.0, jnp.array([2.0, 6.0]), p), [-1.0, 3 - 0.5 * 1.5 * 6]
    )


@pytest.mark.parametrize("name", ["oral1_repeated", "oral1_lag_bioav", "oral1_infusion"])
def test_known_dose_kinds_prune_events_without_changing_amounts(name):
    """`Doses.kinds` (static, from the data) drops event slots that cannot be active and the
    SS machinery: under jit (traced doses) the amounts equal those of the full event list."""
    _, p, rows, _ = SCENARIOS[name]
    dyn = ODE(linear_rhs, ("depot", "central", "peripheral"))
    par = {**p, "q": p.get("q", 0.0), "vp": p.get("vp", 1.0), "ka": p.get("ka", 1.0)}
    unknown = make_doses([{**r, "cmt": r.get("cmt", 0)} for r in rows])
    kinds = dose_kinds(unknown.mask, unknown.dur, unknown.rate, unknown.ss)
    assert ("infusion" in kinds) == (name == "oral1_infusion") and "ss" not in kinds
    known = dataclasses.replace(unknown, kinds=kinds)
    traced_ss = []

    @jax.jit
    def amounts(doses):
        traced_ss.append(dyn._use_steady_state(doses))
        return dyn.amounts(par, doses, jnp.asarray(TIMES))

    full, pruned = amounts(unknown), amounts(known)
    assert traced_ss == [True, False]
    np.testing.assert_allclose(np.asarray(pruned), np.asarray(full), rtol=1e-12, atol=1e-12)


def test_reader_sets_dose_kinds():
    import pandas as pd

    import popkin

    rows = [
        (1, 0.0, 0, 100.0, 1, 0, 0.0, 0),
        (1, 1.0, 5.0, 0.0, 0, 0, 0.0, 0),
        (2, 0.0, 0, 100.0, 1, 0, 50.0, 1),
        (2, 1.0, 5.0, 0.0, 0, 0, 0.0, 0),
    ]
    cols = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "RATE", "SS"]
    df = pd.DataFrame(rows, columns=cols).assign(II=lambda d: np.where(d.SS > 0, 12.0, 0.0))
    df["MDV"] = df["EVID"]
    assert popkin.read_nonmem(df).subjects.doses.kinds == frozenset({"infusion", "ss"})
    plain = df.assign(RATE=0.0, SS=0, II=0.0)
    assert popkin.read_nonmem(plain).subjects.doses.kinds == frozenset()


# -- solver ----------------------------------------------------------------------------------


@jax.jit
def _amounts_and_tangents(p, doses, resets):
    """Amounts and their derivative along all parameters (forward mode), for both solvers."""
    times = jnp.asarray(TIMES)
    ref = ODE(linear_rhs, LINEAR_ODE.states, solver=diffrax.Tsit5())

    def one(ode, p, d, r):
        tangent = jax.tree.map(lambda x: 0.1 * x, p)
        return jax.jvp(lambda q: ode.amounts(q, d, times, r), (p,), (tangent,))

    return [jax.vmap(functools.partial(one, ode))(p, doses, resets) for ode in (LINEAR_ODE, ref)]


def test_unrolled_tsit5_is_diffrax_tsit5():
    """The default solver is diffrax's Tsit5 with unrolled stages: same tableau (its last row
    of `a` is `b`, at c = 1, which the unrolled step relies on), so the same accepted steps,
    amounts and forward-mode derivatives up to rounding, on every scenario (infusions, SS
    periods with step clipping at jumps, resets)."""
    tab = UnrolledTsit5.tableau
    np.testing.assert_array_equal(tab.a_lower[-1], tab.b_sol[:-1])
    assert tab.c[-1] == 1.0 and tab.b_sol[-1] == 0.0
    assert isinstance(LINEAR_ODE.solver, UnrolledTsit5)
    names = [k for k in SCENARIOS if k != "stiff_failure"]
    inputs = [ode_inputs(m, p, rows, rs) for m, p, rows, rs in (SCENARIOS[k] for k in names)]
    p, doses, resets = jax.tree.map(lambda *xs: jnp.stack(xs), *inputs)
    (x, dx), (x_ref, dx_ref) = _amounts_and_tangents(p, doses, resets)
    for got, ref in ((x, x_ref), (dx, dx_ref)):
        got, ref = np.asarray(got), np.asarray(ref)
        assert np.all(np.isfinite(ref))
        scale = np.max(np.abs(ref), axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12 * scale.max())
