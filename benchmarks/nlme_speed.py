"""NLME engine speed: popkin against plain SciPy/NumPy implementations of the same quantities.

What is measured (wall seconds, warm, on this machine's CPUs):

- `theophylline_focei`: a complete FOCE-I fit of the 1-compartment oral model of
  `popkin.models._model`'s docstring (tka=0.45, tcl=1.0, tv=3.45, diagonal Omega 0.6/0.3/0.1,
  additive sd 0.7) to `popkin.datasets.theophylline()`, `popkin.fit(..., "focei",
  covariance=None)`, end to end. `compile_s` is the first call minus the warm call. The SciPy
  version: NumPy closed-form predictions; per subject the EBE by `scipy.optimize.minimize`
  (BFGS, warm-started from the previous evaluation's EBEs, gradient `-J'r/V + Omega^-1 eta`
  from a central-difference Jacobian `J`, gtol 1e-6); the FOCE-I objective
  `sum_i [sum_j (r^2/V + log V) + eta' Omega^-1 eta + log|Omega| + log|J'J/V + Omega^-1|]`; and
  an outer BFGS with forward-difference gradients (step 1e-6) over the same unconstrained
  parameters as popkin (thetas, log Cholesky diagonal of Omega, log sd). Both OFVs are
  reported (popkin's convention: -2 log L without the N log 2 pi constant).
- `ebe_hessian_500`: all empirical Bayes estimates and the exact Hessians at the modes for 500
  subjects of the seed experiment 1 design (oral 1-cmt PK at fixed typical values driving
  three stimulatory turnover PD endpoints, 6 correlated random effects on the PD parameters,
  8/7/7 samples per endpoint, 100/200/400 mg once daily x 3, additive noise 5-14 % of
  baseline), data simulated with `popkin.simulate`. popkin: `popkin.nlme._fit._modes` (vmapped
  Gauss-Newton to a 1e-5 relative gradient, then Newton steps with the exact Hessian, by
  forward-over-forward AD, to 1e-9; the Hessian is exact at a point within `hess_xtol` of the
  returned mode, the distance being one Newton step from the hand-over), warm, from eta = 0,
  all subjects in one vmapped program on one thread (popkin's default; `--threads k` sets the
  opt-in `POPKIN_THREADS`, subjects in k chunks on a thread pool, see `popkin.nlme._chunks`).
  The ODE is solved by popkin's default `UnrolledTsit5` (diffrax's Tsit5, stages unrolled).
  SciPy: per subject piecewise `solve_ivp` predictions, `scipy.optimize.minimize` (BFGS,
  finite-difference gradient) from eta = 0, and a central-difference Hessian of the objective
  at the mode. SciPy's solver runs at rtol 1e-8 / atol 1e-10 (a central-difference Hessian with
  step 1e-3 amplifies solver error by ~1e6, so it needs them); popkin's at `POPKIN_RTOL` (its
  derivatives are those of the discrete solution, not differences of it). The SciPy loop runs
  on a subset and is scaled to 500 (`scipy_scaled`). Agreement with SciPy on that subset is
  reported: modes, Hessians and the inner objective at the modes (`max_abs_diff_f_subset`;
  `2 * sum |f difference| * 500 / subset` bounds the effect of popkin's tolerance on a
  500-subject OFV).

The machine may be shared: every popkin timing is the best of `--repeats` warm calls, and the
load average is recorded. Run: `.venv/bin/python benchmarks/nlme_speed.py [--quick] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.integrate
import scipy.optimize

import popkin
from popkin.models._ode import ODE
from popkin.nlme._chunks import n_chunks
from popkin.nlme._fit import _modes
from popkin.nlme._inner import find_mode
from popkin.nlme._objective import SubjectProblem
from popkin.params import default_params, pack
from popkin.priors import Gaussian
from popkin.simulate import predictor_for

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {
    "theophylline_focei": {"ratio": 30.0, "popkin_s": 1.0},
    "ebe_hessian_500": {"ratio": 50.0, "popkin_s": 3.0},
}


# == (a) Theophylline FOCE-I ====================================================================
class Theophylline(popkin.Model):
    theta = popkin.Params(tka=0.45, tcl=1.0, tv=3.45)
    omega = popkin.Omega(eta_ka=0.6, eta_cl=0.3, eta_v=0.1)
    sigma = popkin.Params(add_sd=popkin.Positive(0.7))
    dynamics = popkin.OneCmtOral()

    def individual(self, th, eta, cov):
        return dict(
            ka=jnp.exp(th.tka + eta.eta_ka),
            cl=jnp.exp(th.tcl + eta.eta_cl),
            v=jnp.exp(th.tv + eta.eta_v),
        )

    def observe(self, p, sol, sg):
        return {"cp": popkin.Normal(sol.central / p["v"], sg.add_sd)}


def _subjects_np(table: pd.DataFrame) -> list[tuple[np.ndarray, ...]]:
    """(dose times, dose amounts, observation times, DV) per subject."""
    out = []
    for _, g in table.groupby("ID", sort=False):
        d, o = g[g["EVID"] == 1], g[g["EVID"] == 0]
        out.append(tuple(x.to_numpy(float) for x in (d.TIME, d.AMT, o.TIME, o.DV)))
    return out


def _pred_oral(th, eta, subj) -> np.ndarray:
    """Closed-form 1-cmt oral concentrations, superposed over the doses."""
    t_dose, amt, t, _ = subj
    ka, cl, v = np.exp(th + eta)
    k = cl / v
    dt = t[:, None] - t_dose[None, :]
    pos = np.maximum(dt, 0.0)
    c = amt * ka / (v * (ka - k)) * (np.exp(-k * pos) - np.exp(-ka * pos))
    return np.sum(np.where(dt >= 0, c, 0.0), axis=1)


def _jac_oral(th, eta, subj, h=1e-6) -> np.ndarray:
    cols = []
    for j in range(eta.size):
        e = np.zeros(eta.size)
        e[j] = h
        cols.append((_pred_oral(th, eta + e, subj) - _pred_oral(th, eta - e, subj)) / (2 * h))
    return np.stack(cols, axis=1)


def _f_oral(eta, th, oinv, var, subj):
    r = subj[3] - _pred_oral(th, eta, subj)
    return 0.5 * (r @ r) / var + 0.5 * eta @ oinv @ eta


def _g_oral(eta, th, oinv, var, subj):
    r = subj[3] - _pred_oral(th, eta, subj)
    return -_jac_oral(th, eta, subj).T @ r / var + oinv @ eta


class ScipyFOCEI:
    """FOCE-I for the theophylline model in NumPy/SciPy (see the module docstring)."""

    def __init__(self, table: pd.DataFrame, inner_gtol: float = 1e-6, outer_eps: float = 1e-6):
        self.subjects = _subjects_np(table)
        self.inner_gtol = inner_gtol
        self.outer_eps = outer_eps
        self.eta = np.zeros((len(self.subjects), 3))
        self.n_eval = 0

    def ofv(self, u) -> float:
        th, omega, var = u[:3], np.diag(np.exp(2 * u[3:6])), np.exp(2 * u[6])
        oinv = np.linalg.inv(omega)
        logdet_omega = np.linalg.slogdet(omega)[1]
        total = 0.0
        for i, subj in enumerate(self.subjects):
            res = scipy.optimize.minimize(
                _f_oral,
                self.eta[i],
                args=(th, oinv, var, subj),
                jac=_g_oral,
                method="BFGS",
                options={"gtol": self.inner_gtol},
            )
            eta = self.eta[i] = res.x
            r = subj[3] - _pred_oral(th, eta, subj)
            J = _jac_oral(th, eta, subj)
            H = J.T @ J / var + oinv
            total += (
                (r @ r) / var
                + r.size * np.log(var)
                + eta @ oinv @ eta
                + logdet_omega
                + np.linalg.slogdet(H)[1]
            )
        self.n_eval += 1
        return float(total)

    def fit(self, u0, maxiter: int | None = None):
        self.eta[:] = 0.0
        self.n_eval = 0
        opts = {"eps": self.outer_eps} | ({"maxiter": maxiter} if maxiter else {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return scipy.optimize.minimize(self.ofv, u0, method="BFGS", options=opts)


def _best_warm(fn, repeats: int) -> tuple[float, float, object]:
    """(first call s, best warm s, last output); with repeats=0 the first call counts."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    warm = first if repeats == 0 else np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        warm = min(warm, time.perf_counter() - t0)
    return first, warm, out


def bench_theophylline(repeats: int, scipy_maxiter: int | None = None) -> dict:
    model = Theophylline()
    data = popkin.datasets.theophylline()
    first, warm, f = _best_warm(lambda: popkin.fit(model, data, "focei", covariance=None), repeats)
    u0 = np.asarray(pack(model, default_params(model)), float)
    sp = ScipyFOCEI(popkin.datasets.theophylline_table())
    t0 = time.perf_counter()
    res = sp.fit(u0, scipy_maxiter)
    scipy_s = time.perf_counter() - t0
    est = {
        "theta": [float(x) for x in res.x[:3]],
        "omega_diag": [float(x) for x in np.exp(2 * res.x[3:6])],
        "add_sd": float(np.exp(res.x[6])),
    }
    return {
        "popkin_s": warm,
        "scipy_s": scipy_s,
        "ratio": scipy_s / warm,
        "compile_s": first - warm,
        "popkin_first_call_s": first,
        "popkin_ofv": f.ofv,
        "scipy_ofv": float(res.fun),
        "popkin_status": str(f.status),
        "popkin_n_evaluations": f.n_evaluations,
        "scipy_n_objective_evaluations": sp.n_eval,
        "scipy_message": str(res.message),
        "scipy_estimates": est,
        "n_subjects": data.n_subjects,
        "n_observations": data.n_observations,
        "scipy_design": "inner BFGS (gtol 1e-6, central-difference J, warm start), "
        "outer BFGS with forward differences (eps 1e-6)",
    }


# == (b) EBEs + exact Hessians, PK + 3 turnover endpoints =======================================
PK_TV = {"ka": 1.0, "cl": 5.0, "v": 50.0}
ENDPOINTS = ("prim", "ast", "alt")
PD_TV = {
    "prim": {"kin": 10.0, "kout": 0.2, "smax": 1.5, "sc50": 2.0},
    "ast": {"kin": 3.0, "kout": 0.1, "smax": 3.0, "sc50": 4.0},
    "alt": {"kin": 2.5, "kout": 0.1, "smax": 3.0, "sc50": 4.0},
}
SIGMA = {"prim": 2.5, "ast": 3.0, "alt": 3.5}  # 5 %, 10 %, 14 % of the baselines 50, 30, 25
ETAS = tuple(f"eta_{q}_{e}" for e in ENDPOINTS for q in ("kin", "sc50"))
SAMPLES = {
    "prim": (0.0, 2.0, 6.0, 12.0, 24.0, 48.0, 72.0, 96.0),
    "ast": (0.0, 4.0, 12.0, 24.0, 48.0, 72.0, 96.0),
    "alt": (0.0, 4.0, 12.0, 24.0, 48.0, 72.0, 96.0),
}
DOSES = (100.0, 200.0, 400.0)
N_DOSES, II = 3, 24.0
RTOL, ATOL = 1e-8, 1e-10  # SciPy (finite-difference Hessians)
POPKIN_RTOL, POPKIN_ATOL = 1e-6, 1e-8  # popkin (forward-mode derivatives of the solution)


def omega_pd() -> np.ndarray:
    """6x6 covariance: sd 0.3 (kin) / 0.4 (sc50); AST-ALT r 0.75/0.7, primary-AST/ALT 0.3-0.35."""
    sd = np.array([0.3, 0.4] * 3)
    corr = np.eye(6)
    pairs = {(0, 2): 0.35, (0, 4): 0.30, (2, 4): 0.75, (1, 3): 0.30, (1, 5): 0.30, (3, 5): 0.70}
    for (i, j), r in pairs.items():
        corr[i, j] = corr[j, i] = r
    return corr * np.outer(sd, sd)


def _pkpd_rhs(t, s, p):
    cp = s.central / p["v"]
    d = {"depot": -p["ka"] * s.depot, "central": p["ka"] * s.depot - p["cl"] / p["v"] * s.central}
    for e in ENDPOINTS:
        stim = 1.0 + p[f"smax_{e}"] * cp / (cp + p[f"sc50_{e}"])
        d[e] = p[f"kin_{e}"] * stim - p[f"kout_{e}"] * s[e]
    return d


class PKThreeTurnover(popkin.Model):
    theta = popkin.Params(
        **{f"t{k}": popkin.Fixed(float(np.log(v))) for k, v in PK_TV.items()},
        **{f"t{q}_{e}": float(np.log(v)) for e in ENDPOINTS for q, v in PD_TV[e].items()},
    )
    omega = popkin.Omega.block(ETAS, omega_pd())
    sigma = popkin.Params(**{f"sd_{e}": popkin.Positive(v) for e, v in SIGMA.items()})
    dynamics = ODE(
        _pkpd_rhs,
        states=("depot", "central", *ENDPOINTS),
        init=lambda p: {e: p[f"kin_{e}"] / p[f"kout_{e}"] for e in ENDPOINTS},
        rtol=POPKIN_RTOL,
        atol=POPKIN_ATOL,
    )

    def individual(self, th, eta, cov):
        p = {k: jnp.exp(th[f"t{k}"]) for k in PK_TV}
        for e in ENDPOINTS:
            for q in PD_TV[e]:
                name = f"eta_{q}_{e}"
                p[f"{q}_{e}"] = jnp.exp(th[f"t{q}_{e}"] + (eta[name] if name in ETAS else 0.0))
        return p

    def observe(self, p, sol, sg):
        return {e: popkin.additive(sol[e], sg[f"sd_{e}"]) for e in ENDPOINTS}


def pkpd_design(n: int, seed: int = 0) -> pd.DataFrame:
    """NONMEM table: one dose row (random amount, ADDL) and the PD samples, DVID 1-3."""
    rng = np.random.default_rng(seed)
    amounts = rng.choice(DOSES, size=n)
    obs = sorted((t, k + 1) for k, e in enumerate(ENDPOINTS) for t in SAMPLES[e])
    rows = []
    for i in range(n):
        rows.append((i + 1, 0.0, np.nan, amounts[i], 1, 1, 1, N_DOSES - 1, II, 1))
        rows += [(i + 1, t, 0.0, 0.0, 0, 0, 2 + dvid, 0, 0.0, dvid) for t, dvid in obs]
    cols = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "ADDL", "II", "DVID"]
    return pd.DataFrame(rows, columns=cols)


def _pkpd_np_rhs(t, x, p):
    cp = x[1] / p["v"]
    dx = np.empty(5)
    dx[0] = -p["ka"] * x[0]
    dx[1] = p["ka"] * x[0] - p["cl"] / p["v"] * x[1]
    for k, e in enumerate(ENDPOINTS):
        stim = 1.0 + p[f"smax_{e}"] * cp / (cp + p[f"sc50_{e}"])
        dx[2 + k] = p[f"kin_{e}"] * stim - p[f"kout_{e}"] * x[2 + k]
    return dx


class ScipyPKPD:
    """Per-subject objective of the PK + 3 turnover model with `solve_ivp` (numpy only)."""

    def __init__(self, table: pd.DataFrame, method: str = "DOP853"):
        self.method = method
        self.omega_inv = np.linalg.inv(omega_pd())
        self.sd = np.array([SIGMA[e] for e in ENDPOINTS])
        self.subjects = []
        for _, g in table.groupby("ID", sort=False):
            d, o = g[g["EVID"] == 1].iloc[0], g[g["EVID"] == 0]
            doses = float(d.TIME) + II * np.arange(int(d.ADDL) + 1)
            t, dvid = o.TIME.to_numpy(float), o.DVID.to_numpy(int) - 1
            self.subjects.append((doses, float(d.AMT), t, dvid, o.DV.to_numpy(float)))

    def params(self, eta) -> dict:
        p = dict(PK_TV)
        for e in ENDPOINTS:
            for q, v in PD_TV[e].items():
                name = f"eta_{q}_{e}"
                p[f"{q}_{e}"] = v * (np.exp(eta[ETAS.index(name)]) if name in ETAS else 1.0)
        return p

    def predict(self, eta, i) -> np.ndarray:
        doses, amt, t, dvid, _ = self.subjects[i]
        p = self.params(eta)
        x = np.array([0.0, 0.0, *(p[f"kin_{e}"] / p[f"kout_{e}"] for e in ENDPOINTS)])
        edges = np.append(doses, max(t[-1], doses[-1]))
        states = np.empty((t.size, 5))
        for k in range(doses.size):
            a, b = edges[k], edges[k + 1]
            x[0] += amt
            last = k == doses.size - 1
            sel = (t >= a) & ((t < b) | (last & (t <= b)))
            t_eval = np.unique(np.append(t[sel], b))
            sol = scipy.integrate.solve_ivp(
                _pkpd_np_rhs, (a, b), x, self.method, t_eval, args=(p,), rtol=RTOL, atol=ATOL
            )
            states[sel] = sol.y[:, np.searchsorted(t_eval, t[sel])].T
            x = sol.y[:, -1].copy()
        return states[np.arange(t.size), 2 + dvid]

    def f(self, eta, i) -> float:
        _, _, _, dvid, dv = self.subjects[i]
        z = (dv - self.predict(eta, i)) / self.sd[dvid]
        return 0.5 * z @ z + 0.5 * eta @ self.omega_inv @ eta

    def hessian(self, eta, i, h=1e-3) -> np.ndarray:
        """Central-difference Hessian of `f` (4-point cross terms)."""
        n = eta.size
        H = np.empty((n, n))
        f0 = self.f(eta, i)
        E = np.eye(n) * h
        for a in range(n):
            H[a, a] = (self.f(eta + E[a], i) - 2 * f0 + self.f(eta - E[a], i)) / h**2
            for b in range(a):
                s = [self.f(eta + sa * E[a] + sb * E[b], i) for sa in (1, -1) for sb in (1, -1)]
                H[a, b] = H[b, a] = (s[0] - s[1] - s[2] + s[3]) / (4 * h**2)
        return H

    def mode(self, i) -> tuple[np.ndarray, np.ndarray, float]:
        res = scipy.optimize.minimize(self.f, np.zeros(len(ETAS)), args=(i,), method="BFGS")
        return res.x, self.hessian(res.x, i), float(res.fun)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _piece(problem, which, params, eta, subjects):
    """One vmapped building block of `find_mode` over all subjects."""
    prior = Gaussian(params.omega)
    fns = {
        "f": lambda e, s: problem.f(params, prior, e, s),
        "grad_and_gauss_newton": lambda e, s: problem.grad_and_gn(params, prior, e, s),
        "exact_hessian": lambda e, s: problem.exact_hessian(params, prior, e, s),
    }
    return jax.vmap(fns[which])(eta, subjects)


def breakdown(problem, params, eta, subjects) -> dict:
    """Warm seconds of one pass of each building block over all subjects, at the modes."""
    out = {}
    for which in ("f", "grad_and_gauss_newton", "exact_hessian"):
        run = lambda w=which: jax.block_until_ready(_piece(problem, w, params, eta, subjects))
        out[f"{which}_s"] = _best_warm(run, 2)[1]
    return out


def bench_ebe(n: int, n_scipy: int, repeats: int, with_breakdown: bool = True) -> dict:
    model = PKThreeTurnover()
    design = popkin.read_nonmem(pkpd_design(n))
    print(f"[ebe] simulating {n} subjects with popkin.simulate ...", flush=True)
    t0 = time.perf_counter()
    sim = popkin.simulate(model, design, key=jax.random.key(2026))
    sim_s = time.perf_counter() - t0
    population = popkin.read_nonmem(sim)
    problem = SubjectProblem(predictor_for(model, population), "laplace")
    u = pack(model, default_params(model), True)
    eta0 = jnp.zeros((n, len(ETAS)))
    run = lambda: jax.block_until_ready(_modes(problem, True, u, eta0, population.subjects, None))
    print("[ebe] popkin _modes (compile, then warm) ...", flush=True)
    first, warm, res = _best_warm(run, repeats)
    eta_pk, H_pk = np.asarray(res.eta), np.asarray(res.hessian)
    pieces = {}
    if with_breakdown:
        print("[ebe] popkin building blocks ...", flush=True)
        pieces = breakdown(problem, default_params(model), res.eta, population.subjects)

    print(f"[ebe] SciPy loop on {n_scipy} subjects ...", flush=True)
    sp = ScipyPKPD(sim)
    sp.f(np.zeros(len(ETAS)), 0)  # warm-up
    t0 = time.perf_counter()
    modes = [sp.mode(i) for i in range(n_scipy)]
    scipy_sub = time.perf_counter() - t0
    scipy_s = scipy_sub * n / n_scipy
    d_eta = max(float(np.max(np.abs(m[0] - eta_pk[i]))) for i, m in enumerate(modes))
    d_hess = max(
        float(np.max(np.abs(m[1] - H_pk[i])) / np.max(np.abs(H_pk[i]))) for i, m in enumerate(modes)
    )
    # popkin's f = SciPy's f (0.5 z'z + 0.5 eta' Omega^-1 eta) + sum log sd + 0.5 log|2 pi Omega|.
    const = 0.5 * np.linalg.slogdet(2 * np.pi * omega_pd())[1]
    f_pk = np.asarray(res.f)
    d_f = max(
        abs(m[2] + const + np.sum(np.log(sp.sd[sp.subjects[i][3]])) - f_pk[i])
        for i, m in enumerate(modes)
    )
    true_eta = sim.groupby("ID", sort=False)[[f"ETA_{e}" for e in ETAS]].first().to_numpy()
    shrink = 1.0 - np.std(eta_pk, axis=0) / np.sqrt(np.diag(omega_pd()))
    return {
        "popkin_s": warm,
        "scipy_s": scipy_s,
        "ratio": scipy_s / warm,
        "compile_s": first - warm,
        "popkin_first_call_s": first,
        "n_subjects": n,
        "n_eta": len(ETAS),
        "observations_per_subject": population.n_observations // n,
        "scipy_subjects": n_scipy,
        "scipy_scaled": True,
        "scipy_measured_s": scipy_sub,
        "scipy_ode_method": f"solve_ivp {sp.method} rtol {RTOL} atol {ATOL}",
        "popkin_ode": f"popkin UnrolledTsit5 (diffrax Tsit5, stages unrolled) rtol {POPKIN_RTOL} atol {POPKIN_ATOL}",
        "popkin_converged": int(np.asarray(res.converged).sum()),
        "popkin_max_iterations": int(np.asarray(res.iterations).max()),
        "max_abs_diff_eta_subset": d_eta,
        "max_rel_diff_hessian_subset": d_hess,
        "max_abs_diff_f_subset": d_f,
        "ofv_tolerance_effect_bound": 2 * d_f * n,
        "eta_shrinkage_mean": float(np.mean(shrink)),
        "corr_ebe_true_eta_mean": float(
            np.mean([np.corrcoef(eta_pk[:, k], true_eta[:, k])[0, 1] for k in range(len(ETAS))])
        ),
        "simulate_first_call_s": sim_s,
        "popkin_one_pass_over_all_subjects": pieces,
        "find_mode_defaults": {
            k: v.default
            for k, v in inspect.signature(find_mode).parameters.items()
            if v.default is not inspect.Parameter.empty
        },
    }


# == driver =====================================================================================
def source_state() -> dict:
    """The commit measured and whether src/ had uncommitted edits (read-only git queries)."""
    root = Path(__file__).resolve().parents[1]
    try:
        git = lambda *a: subprocess.run(
            ["git", *a], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = git("status", "--porcelain", "src")
        return {"commit": git("rev-parse", "HEAD"), "src_modified": dirty.splitlines()}
    except (OSError, subprocess.CalledProcessError):
        return {}


def markdown(results: dict) -> str:
    lines = [
        "# NLME engine speed (warm wall seconds)",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}; "
        f"load average {results['machine']['loadavg_start']} (start) / "
        f"{results['machine']['loadavg_end']} (end).",
        "",
        "| task | popkin (s) | SciPy (s) | ratio | compile (s) | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, target in TARGETS.items():
        r = results[name]
        lines.append(
            f"| {name} | {r['popkin_s']:.3f} | {r['scipy_s']:.1f} | {r['ratio']:.0f} "
            f"| {r['compile_s']:.1f} | ratio >= {target['ratio']:.0f}, "
            f"popkin < {target['popkin_s']:.0f} s |"
        )
    a, b = results["theophylline_focei"], results["ebe_hessian_500"]
    lines += [
        "",
        f"Theophylline OFV: popkin {a['popkin_ofv']:.4f}, SciPy {a['scipy_ofv']:.4f}. "
        f"EBE/Hessian: SciPy timed on {b['scipy_subjects']} subjects and scaled to "
        f"{b['n_subjects']}; on those, max |eta difference| {b['max_abs_diff_eta_subset']:.1e}, "
        f"max relative Hessian difference {b['max_rel_diff_hessian_subset']:.1e}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="subjects in the EBE/Hessian task")
    ap.add_argument("--scipy-n", type=int, default=20, help="subjects timed in the SciPy loop")
    ap.add_argument(
        "--repeats", type=int, default=5, help="warm popkin calls, best kept (0: first call)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (compile-bound)")
    ap.add_argument("--out", type=Path, default=None, help="output directory")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="POPKIN_THREADS for the run (1, the default: one program; k > 1: per-subject "
        "chunks on k threads, opt-in in popkin, see popkin.nlme._chunks)",
    )
    args = ap.parse_args(argv)
    os.environ["POPKIN_THREADS"] = str(args.threads)
    if args.quick:
        args.n, args.scipy_n, args.repeats = 4, 1, 0
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print("[theophylline] popkin.fit and the SciPy FOCE-I ...", flush=True)
    results = {"theophylline_focei": bench_theophylline(args.repeats, 2 if args.quick else None)}
    results["ebe_hessian_500"] = bench_ebe(args.n, args.scipy_n, args.repeats, not args.quick)
    results["targets"] = TARGETS
    results["timing"] = (
        "warm: best of repeats after a compiling call; time.perf_counter"
        if args.repeats
        else "quick: first calls (include compilation); SciPy theophylline fit cut at 2 iterations"
    )
    results["machine"] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "scipy": scipy.__version__,
        # popkin splits per-subject work into this many thread-parallel chunks (--threads,
        # opt-in; >= 64 subjects each; theophylline's 12 subjects run as one); SciPy is one loop
        "popkin_threads_ebe_500": n_chunks(args.n),
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }
    results["quick"] = args.quick
    results["source"] = source_state()
    (out_dir / "nlme_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (out_dir / "nlme_speed.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'nlme_speed.json'}")
    return results


if __name__ == "__main__":
    main()
