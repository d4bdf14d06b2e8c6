"""Simulation throughput: `popkin.simulate` against a plain SciPy `solve_ivp` loop.

What is measured (individuals simulated per second, warm, on this machine's CPUs):

- `closed_form`: 1-compartment oral PK, 100 mg every 12 h x 6 doses (one dose row with
  ADDL=5, II=12), 12 samples per subject, log-normal IIV on ka, cl, v, proportional error.
  popkin uses its closed-form superposition (`OneCmtOral`); the SciPy loop integrates the ODE of
  the same model (depot, central) with `solve_ivp`, one call per dose interval.
- `turnover_ode`: 1-compartment IV bolus PK (same dosing) driving a stimulatory indirect
  response, `R' = kin (1 + smax Cp / (Cp + sc50)) - kout R`, `R(0) = kin / kout`; two states,
  both observed (concentration and response, 12 samples each), IIV on cl, v, kin, sc50.
  popkin solves it with its `ODE` dynamics (`UnrolledTsit5`); SciPy with `solve_ivp` (RK45), both at
  rtol 1e-6 / atol 1e-9.

Design choices:

- The design is built as a NONMEM DataFrame and read with `popkin.read_nonmem` (not timed; its
  time is reported as `read_nonmem_s`).
- Both sides produce the same quantities per subject: random effects, PRED (eta = 0), IPRED and
  a noisy DV, so the SciPy loop solves each subject twice (PRED and IPRED).
- popkin: call once (compile), then time further calls; the best of `--repeats` is reported
  (the machine is shared, so the minimum is the least disturbed). The seconds of that call are
  split into tracing/compilation (from `jax.monitoring` events), the model evaluation (the same
  program jitted once with the data as arguments: `kernel_s`) and the rest (pandas assembly
  and Python overhead).
- SciPy: timed on a subset of subjects (`scipy_subjects`) and scaled linearly to `n_subjects`
  (`scipy_scaled: true`): the loop is per subject, so its cost is linear in n.
- Agreement: for a few subjects, the SciPy solution at popkin's drawn random effects is
  compared with popkin's noise-free IPRED and PRED (max relative difference).

Run: `.venv/bin/python benchmarks/simulate.py [--n 10000] [--quick] [--out DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.integrate

import popkin
from popkin.models._ode import ODE
from popkin.params import default_params
from popkin.priors import Gaussian
from popkin.simulate import _one_replicate, predictor_for

RESULTS = Path(__file__).resolve().parent / "results"
TIMES = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 12.0, 24.0, 36.0, 60.0, 62.0, 66.0, 84.0])
DOSE, N_DOSES, II = 100.0, 6, 12.0
RTOL, ATOL = 1e-6, 1e-9
TARGET_CLOSED_FORM = 50_000.0  # individuals / s on 2 CPU cores

# Typical values (natural scale) and IIV variances shared by popkin and SciPy.
PK = {"ka": 1.0, "cl": 4.0, "v": 30.0}
PK_OMEGA = {"ka": 0.09, "cl": 0.09, "v": 0.04}
PK_PROP = 0.1
TO = {"cl": 4.0, "v": 30.0, "kin": 10.0, "kout": 0.1, "smax": 2.0, "sc50": 1.0}
TO_OMEGA = {"cl": 0.09, "v": 0.04, "kin": 0.04, "sc50": 0.16}
TO_PROP_CP, TO_ADD_R = 0.1, 3.0


# -- models ------------------------------------------------------------------------------------
class OralPK(popkin.Model):
    theta = popkin.Params(**{f"t{k}": float(np.log(v)) for k, v in PK.items()})
    omega = popkin.Omega(**{f"eta_{k}": w for k, w in PK_OMEGA.items()})
    sigma = popkin.Params(prop=popkin.Positive(PK_PROP))
    dynamics = popkin.OneCmtOral()

    def individual(self, th, eta, cov):
        return {k: jnp.exp(th[f"t{k}"] + eta[f"eta_{k}"]) for k in PK}

    def observe(self, p, sol, sg):
        return {"cp": popkin.proportional(sol.central / p["v"], sg.prop)}


def _turnover_rhs(t, s, p):
    cp = s.central / p["v"]
    stim = 1.0 + p["smax"] * cp / (cp + p["sc50"])
    return {"central": -p["cl"] / p["v"] * s.central, "resp": p["kin"] * stim - p["kout"] * s.resp}


class Turnover(popkin.Model):
    theta = popkin.Params(**{f"t{k}": float(np.log(v)) for k, v in TO.items()})
    omega = popkin.Omega(**{f"eta_{k}": w for k, w in TO_OMEGA.items()})
    sigma = popkin.Params(prop=popkin.Positive(TO_PROP_CP), add=popkin.Positive(TO_ADD_R))
    dynamics = ODE(
        _turnover_rhs,
        states=("central", "resp"),
        init=lambda p: {"resp": p["kin"] / p["kout"]},
        rtol=RTOL,
        atol=ATOL,
        steady_state=False,  # no SS doses (keeps the jitted kernel below free of the SS solver)
    )

    def individual(self, th, eta, cov):
        return {k: jnp.exp(th[f"t{k}"] + (eta[f"eta_{k}"] if k in TO_OMEGA else 0.0)) for k in TO}

    def observe(self, p, sol, sg):
        return {
            "cp": popkin.proportional(sol.central / p["v"], sg.prop),
            "resp": popkin.additive(sol.resp, sg.add),
        }


# -- design ------------------------------------------------------------------------------------
def design(n: int, dose_cmt: int, obs: list[tuple[int, int]]) -> pd.DataFrame:
    """NONMEM table: per subject one dose row (ADDL) and one row per (CMT, DVID) and time."""
    rows_t = [0.0]
    cols = {"EVID": [1], "AMT": [DOSE], "CMT": [dose_cmt], "ADDL": [N_DOSES - 1], "II": [II]}
    cols["DVID"] = [obs[0][1]]
    for t in TIMES:
        for cmt, dvid in obs:
            rows_t.append(t)
            for k, v in (("EVID", 0), ("AMT", 0.0), ("CMT", cmt), ("ADDL", 0), ("II", 0.0)):
                cols[k].append(v)
            cols["DVID"].append(dvid)
    m = len(rows_t)
    evid = np.tile(cols["EVID"], n)
    df = pd.DataFrame(
        {
            "ID": np.repeat(np.arange(1, n + 1), m),
            "TIME": np.tile(rows_t, n),
            "DV": np.where(evid == 1, np.nan, 0.0),
            "AMT": np.tile(cols["AMT"], n),
            "EVID": evid,
            "MDV": evid,
            "CMT": np.tile(cols["CMT"], n),
            "ADDL": np.tile(cols["ADDL"], n),
            "II": np.tile(cols["II"], n),
            "DVID": np.tile(cols["DVID"], n),
        }
    )
    return df


# -- popkin ------------------------------------------------------------------------------------
#: The model evaluation inside `popkin.simulate` (one replicate), jitted once with the data as
#: arguments (`n_eta` static).
_kernel = jax.jit(_one_replicate, static_argnums=(0, 4))


class _CompileClock:
    """Sums JAX's tracing / lowering / compilation durations reported while active."""

    def __init__(self):
        self.seconds = 0.0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **_):
        if self.active and event.startswith("/jax/core/compile/"):
            self.seconds += duration

    def time(self, fn):
        self.seconds, self.active = 0.0, True
        t0 = time.perf_counter()
        try:
            out = fn()
        finally:
            self.active = False
        return time.perf_counter() - t0, self.seconds, out


def time_popkin(model, population, repeats: int, clock: _CompileClock) -> dict:
    params = default_params(model)
    run = lambda i: popkin.simulate(model, population, key=jax.random.key(i))
    first_s, first_compile, out = clock.time(lambda: run(0))
    best = (first_s, first_compile) if repeats == 0 else (np.inf, 0.0)
    for r in range(repeats):
        s, c, _ = clock.time(lambda r=r: run(r + 1))
        best = min(best, (s, c))
    # The same evaluation compiled once (what simulate costs without tracing/compiling/pandas).
    pred = predictor_for(model, population)
    prior = Gaussian(params.omega)
    args = (pred, params, prior, population.subjects, len(model.eta_names))
    jax.block_until_ready(_kernel(*args, jax.random.key(0)))
    kernel = np.inf
    for r in range(max(repeats, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(_kernel(*args, jax.random.key(r + 1)))
        kernel = min(kernel, time.perf_counter() - t0)
    n = population.n_subjects
    return {
        "popkin_s": best[0],
        "popkin_first_call_s": first_s,
        "popkin_compile_in_warm_call_s": best[1],
        "popkin_kernel_s": kernel,
        "popkin_other_s": max(best[0] - best[1] - kernel, 0.0),
        "popkin_ind_per_s": n / best[0],
        "popkin_kernel_ind_per_s": n / kernel,
        "first_output": out,
    }


# -- SciPy -------------------------------------------------------------------------------------
def _oral_rhs(t, x, ka, k):
    return np.array([-ka * x[0], ka * x[0] - k * x[1]])


def _turnover_np_rhs(t, x, p):
    cp = x[0] / p["v"]
    stim = 1.0 + p["smax"] * cp / (cp + p["sc50"])
    return np.array([-p["cl"] / p["v"] * x[0], p["kin"] * stim - p["kout"] * x[1]])


def _piecewise(rhs, x0, dose_state, args, rtol, atol):
    """States at TIMES: one `solve_ivp` per dose interval, bolus added at each dose."""
    doses = II * np.arange(N_DOSES)
    edges = np.append(doses, TIMES[-1])
    out = np.empty((TIMES.size, x0.size))
    x = np.array(x0, float)
    for k in range(N_DOSES):
        a, b = edges[k], edges[k + 1]
        x[dose_state] += DOSE
        last = k == N_DOSES - 1
        sel = (TIMES >= a) & ((TIMES < b) | (last & (TIMES <= b)))
        t_eval = np.unique(np.append(TIMES[sel], b))
        sol = scipy.integrate.solve_ivp(
            rhs, (a, b), x, t_eval=t_eval, args=args, rtol=rtol, atol=atol
        )
        out[sel] = sol.y[:, : sel.sum()].T
        x = sol.y[:, -1].copy()
    return out


def scipy_closed_form_pred(eta, rtol=RTOL, atol=ATOL):
    p = {k: PK[k] * np.exp(e) for k, e in zip(PK, eta, strict=True)}
    amounts = _piecewise(_oral_rhs, np.zeros(2), 0, (p["ka"], p["cl"] / p["v"]), rtol, atol)
    return amounts[:, 1] / p["v"]  # (12,)


def scipy_turnover_pred(eta, rtol=RTOL, atol=ATOL):
    p = dict(TO)
    for k, e in zip(TO_OMEGA, eta, strict=True):
        p[k] = TO[k] * np.exp(e)
    x0 = np.array([0.0, p["kin"] / p["kout"]])
    amounts = _piecewise(_turnover_np_rhs, x0, 0, (p,), rtol, atol)
    return np.stack([amounts[:, 0] / p["v"], amounts[:, 1]], axis=1).ravel()  # (12*2,) rows


def scipy_loop(n: int, omega: dict, predict, noise, seed: int = 0) -> tuple[float, dict]:
    """Per subject: draw eta, solve at eta (IPRED) and at 0 (PRED), add residual noise."""
    rng = np.random.default_rng(seed)
    sd = np.sqrt(np.array(list(omega.values())))
    predict(np.zeros(sd.size))  # warm-up (imports, first-call overheads)
    t0 = time.perf_counter()
    etas = rng.standard_normal((n, sd.size)) * sd
    ipred, pred, dv = [], [], []
    for i in range(n):
        f = predict(etas[i])
        ipred.append(f)
        pred.append(predict(np.zeros(sd.size)))
        dv.append(noise(f, rng))
    out = {"eta": etas, "ipred": np.array(ipred), "pred": np.array(pred), "dv": np.array(dv)}
    return time.perf_counter() - t0, out


def _pk_noise(f, rng):
    return f * (1.0 + PK_PROP * rng.standard_normal(f.shape))


def _turnover_noise(f, rng):
    z = rng.standard_normal(f.shape)
    cp = np.arange(f.size) % 2 == 0
    return np.where(cp, f * (1.0 + TO_PROP_CP * z), f + TO_ADD_R * z)


# -- one benchmark case ------------------------------------------------------------------------
def run_case(name, model, table, predict, omega, noise, n_scipy, repeats, clock) -> dict:
    t0 = time.perf_counter()
    population = popkin.read_nonmem(table)
    read_s = time.perf_counter() - t0
    n = population.n_subjects
    print(f"[{name}] popkin.simulate on {n} subjects ...", flush=True)
    res = time_popkin(model, population, repeats, clock)
    out = res.pop("first_output")
    print(f"[{name}] SciPy loop on {n_scipy} subjects ...", flush=True)
    scipy_s, _ = scipy_loop(n_scipy, omega, predict, noise)
    scipy_ind = n_scipy / scipy_s
    # Agreement on noise-free predictions at popkin's own random effects.
    obs = out[out["EVID"] == 0]
    eta_cols = [f"ETA_eta_{k}" for k in omega]
    rel = {"ipred": 0.0, "pred": 0.0}
    ids = population.ids[:5]
    for sid in ids:
        rows = obs[obs["ID"] == sid]
        eta = rows[eta_cols].to_numpy()[0]
        for col, e in (("ipred", eta), ("pred", np.zeros_like(eta))):
            ref = predict(e, rtol=1e-10, atol=1e-12)
            got = rows[col.upper()].to_numpy()
            rel[col] = max(rel[col], float(np.max(np.abs(got - ref) / np.abs(ref))))
    return {
        "n_subjects": n,
        "samples_per_subject": int(len(obs) // n),
        "popkin_ind_per_s": res["popkin_ind_per_s"],
        "scipy_ind_per_s": scipy_ind,
        "ratio": res["popkin_ind_per_s"] / scipy_ind,
        "popkin_s": res["popkin_s"],
        "scipy_s": scipy_s * n / n_scipy,
        "scipy_subjects": n_scipy,
        "scipy_scaled": True,
        "scipy_measured_s": scipy_s,
        "popkin_first_call_s": res["popkin_first_call_s"],
        "popkin_compile_in_warm_call_s": res["popkin_compile_in_warm_call_s"],
        "popkin_kernel_s": res["popkin_kernel_s"],
        "popkin_other_s": res["popkin_other_s"],
        "popkin_kernel_ind_per_s": res["popkin_kernel_ind_per_s"],
        "kernel_ratio": res["popkin_kernel_ind_per_s"] / scipy_ind,
        "read_nonmem_s": read_s,
        "max_rel_diff_ipred": rel["ipred"],
        "max_rel_diff_pred": rel["pred"],
        "agreement_subjects": len(ids),
        "agreement_reference": "solve_ivp RK45 rtol 1e-10 atol 1e-12 at popkin's drawn etas",
    }


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
        "# Simulation throughput (individuals / second, warm)",
        "",
        f"Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}; "
        f"load average {results['machine']['loadavg_start']} (start) / "
        f"{results['machine']['loadavg_end']} (end).",
        "",
        "| case | n | popkin.simulate | popkin kernel only | SciPy loop | ratio | kernel ratio "
        "| max rel diff (IPRED) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("closed_form", "turnover_ode"):
        r = results[name]
        lines.append(
            f"| {name} | {r['n_subjects']} | {r['popkin_ind_per_s']:,.0f} "
            f"| {r['popkin_kernel_ind_per_s']:,.0f} | {r['scipy_ind_per_s']:,.1f} "
            f"| {r['ratio']:,.0f} | {r['kernel_ratio']:,.0f} | {r['max_rel_diff_ipred']:.1e} |"
        )
    lines += [
        "",
        "popkin.simulate: the public function, best of the warm calls (a warm call's seconds "
        "split into compile {cf:.2f} s / {ct:.2f} s, kernel {kf:.3f} s / {kt:.3f} s and "
        "other {of:.3f} s / {ot:.3f} s for closed_form / turnover_ode). Kernel only: the same "
        "model evaluation jitted once with the data as arguments. SciPy: `solve_ivp` (RK45, "
        "rtol 1e-6, atol 1e-9) per dose interval per subject, timed on a subset and scaled.".format(
            cf=results["closed_form"]["popkin_compile_in_warm_call_s"],
            ct=results["turnover_ode"]["popkin_compile_in_warm_call_s"],
            kf=results["closed_form"]["popkin_kernel_s"],
            kt=results["turnover_ode"]["popkin_kernel_s"],
            of=results["closed_form"]["popkin_other_s"],
            ot=results["turnover_ode"]["popkin_other_s"],
        ),
        f"Target: closed form >= {TARGET_CLOSED_FORM:,.0f} individuals/s on 2 CPU cores.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="subjects simulated by popkin")
    ap.add_argument("--scipy-n", type=int, default=500, help="subjects timed in the SciPy loop")
    ap.add_argument(
        "--repeats", type=int, default=3, help="warm popkin calls, best kept (0: first call)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (< 60 s)")
    ap.add_argument("--out", type=Path, default=None, help="output directory")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.scipy_n, args.repeats = 200, 10, 0
    out_dir = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    clock = _CompileClock()
    load0 = os.getloadavg()

    results = {
        "closed_form": run_case(
            "closed_form",
            OralPK(),
            design(args.n, dose_cmt=1, obs=[(2, 1)]),
            scipy_closed_form_pred,
            PK_OMEGA,
            _pk_noise,
            args.scipy_n,
            args.repeats,
            clock,
        ),
        "turnover_ode": run_case(
            "turnover_ode",
            Turnover(),
            design(args.n, dose_cmt=1, obs=[(1, 1), (2, 2)]),
            scipy_turnover_pred,
            TO_OMEGA,
            _turnover_noise,
            args.scipy_n,
            args.repeats,
            clock,
        ),
        "target_closed_form_ind_per_s": TARGET_CLOSED_FORM,
        "timing": (
            "warm: first call excluded; best of repeats; time.perf_counter"
            if args.repeats
            else "quick: first call (includes compilation)"
        ),
        "scipy_method": f"solve_ivp RK45 rtol {RTOL} atol {ATOL}, one call per dose interval",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()],
            "loadavg_start": [round(x, 2) for x in load0],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        },
        "quick": args.quick,
        "source": source_state(),
    }
    (out_dir / "simulate.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (out_dir / "simulate.md").write_text(md)
    print(md)
    print(f"wrote {out_dir / 'simulate.json'}")
    return results


if __name__ == "__main__":
    main()
