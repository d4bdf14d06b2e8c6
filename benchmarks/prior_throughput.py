"""Throughput of the synthetic PK prior (`popkin.amortized.sample_studies`) on this machine's CPUs.

Individuals per second, warm, counting only real (unpadded) individuals; studies of 5-15
individuals, up to 16 samples and 16 doses each, OU knots, steady state and censoring as in the
default `PriorConfig`. Baseline in the same process: the same studies' concentrations computed
one individual at a time by a plain NumPy/SciPy loop over event intervals (`scipy.linalg.expm`
of the same linear system), timed on a subset and scaled linearly, so the ratio says what
vectorisation buys. The target of issue 5 is >= 50,000 individuals/s on 2 CPU cores.

Run: `.venv/bin/python benchmarks/prior_throughput.py [--studies 2000] [--repeats 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

import popkin  # noqa: F401  (config)
from popkin.amortized import sample_studies

OUT = Path(__file__).parent / "results"


def _numpy_conc(theta, knot_t, dose_t, amt, route, dur, dmask, obs_t):
    """One individual by expm over event intervals (no SS, as the reference for non-SS studies)."""
    events = sorted(
        [(t, 0, k) for k, t in enumerate(knot_t) if k > 0]
        + [(t, 1, d) for d, t in enumerate(dose_t) if dmask[d]]
        + [(t + dur[d], 2, d) for d, t in enumerate(dose_t) if dmask[d] and route[d] == 2]
        + [(t, 3, j) for j, t in enumerate(obs_t)]
    )
    x = np.zeros(5)  # depot, central, p1, p2, infusion-rate "state"
    knot, t_prev, out = 0, 0.0, np.zeros(len(obs_t))
    for t, kind, i in events:
        ka, cl, v1, q2, v2, q3, v3 = theta[knot]
        a = np.zeros((5, 5))
        a[0, 0] = -ka
        a[1, 0] = ka
        a[1, 1] = -(cl + q2 + q3) / v1
        a[1, 2], a[2, 1], a[2, 2] = q2 / v2, q2 / v1, -q2 / v2
        a[1, 3], a[3, 1], a[3, 3] = q3 / v3, q3 / v1, -q3 / v3
        a[1, 4] = 1.0
        x = scipy.linalg.expm(a * max(t - t_prev, 0.0)) @ x
        t_prev = max(t, t_prev)
        if kind == 0:
            knot = i
        elif kind == 1:
            if route[i] == 0:
                x[0] += amt[i]
            elif route[i] == 1:
                x[1] += amt[i]
            else:
                x[4] += amt[i] / dur[i]
        elif kind == 2:
            x[4] -= amt[i] / dur[i]
        else:
            out[i] = x[1] / v1
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-individuals", type=int, default=200)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    s = sample_studies(jax.random.PRNGKey(0), a.studies)
    jax.block_until_ready(s.obs_y)
    compile_s = time.perf_counter() - t0
    best = np.inf
    for r in range(a.repeats):
        t0 = time.perf_counter()
        s = sample_studies(jax.random.PRNGKey(1 + r), a.studies)
        jax.block_until_ready(s.obs_y)
        best = min(best, time.perf_counter() - t0)
    n_ind = int(np.asarray(s.ind_mask).sum())
    rate = n_ind / best

    # baseline on non-SS individuals (the loop has no steady-state branch), noise-free conc.
    th, kt = np.asarray(s.theta, float), np.asarray(s.knot_t, float)
    dt, am, ro = (
        np.asarray(s.dose_t, float),
        np.asarray(s.dose_amt, float),
        np.asarray(s.dose_route),
    )
    du, dm, ot = np.asarray(s.dose_dur, float), np.asarray(s.dose_mask), np.asarray(s.obs_t, float)
    lag, ss, im = np.asarray(s.lag, float), np.asarray(s.ss), np.asarray(s.ind_mask)
    picks = [(i, j) for i, j in zip(*np.nonzero(im & ~ss & (lag == 0)), strict=True)]
    picks = picks[: a.baseline_individuals]
    t0 = time.perf_counter()
    ref = [_numpy_conc(th[i, j], kt[i, j], dt[i, j], am[i, j], ro[i, j], du[i, j], dm[i, j], ot[i, j])
           for i, j in picks]  # fmt: skip
    base_s = time.perf_counter() - t0
    base_rate = len(picks) / base_s
    # agreement of the vectorised float32 simulator with the float64 loop (noise-free)
    from popkin.amortized import concentrations

    errs = []
    for (i, j), r in zip(picks[:50], ref[:50], strict=False):
        args = [jnp.asarray(x[i, j]) for x in (th, kt, dt, am, ro, du, dm, ot)]
        args = [x.astype(jnp.float32) if x.dtype == jnp.float64 else x for x in args]
        c = np.asarray(concentrations(*args))
        m = np.asarray(s.obs_mask[i, j]) & (r > 1e-6 * r.max())
        errs.append(np.max(np.abs(c[m] - r[m]) / r[m]) if m.any() else 0.0)
    res = dict(
        individuals_per_s=rate,
        studies=a.studies,
        individuals=n_ind,
        best_s=best,
        compile_s=compile_s,
        baseline_individuals_per_s=base_rate,
        baseline_individuals=len(picks),
        ratio=rate / base_rate,
        max_rel_diff_vs_baseline=float(np.max(errs)),
        target_individuals_per_s=50_000,
        machine=dict(
            cpus=os.cpu_count(),
            platform=platform.platform(),
            load_start=load0,
            load_end=os.getloadavg(),
        ),  # fmt: skip
    )
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "prior_throughput.json").write_text(json.dumps(res, indent=1))
    md = (
        "| quantity | value |\n|---|---|\n"
        f"| synthetic prior, individuals / s (warm, best of {a.repeats}) | {rate:,.0f} |\n"
        f"| NumPy/SciPy expm loop, individuals / s | {base_rate:,.0f} |\n"
        f"| ratio | {rate / base_rate:,.0f} |\n"
        f"| max relative difference vs the loop (noise-free) | {float(np.max(errs)):.1e} |\n"
        f"| compile (s) | {compile_s:.1f} |\n\n"
        f"{a.studies} studies, {n_ind} individuals per call; {os.cpu_count()} CPUs, load average "
        f"{load0[0]:.1f} at start. Target: 50,000 individuals / s on 2 CPU cores.\n"
    )
    (a.out / "prior_throughput.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
