"""Issue 5 evaluation: zero-shot in-context PK forecasts vs an NLME refit, same protocol.

Protocol (`popkin.amortized.loo_targets`, ../shared/DESIGN.md): per compound, leave one
individual out; condition on the other individuals (all their data), the held-out individual's
dosing and its first four samples at t > 0; score its later positive samples. Per individual:
log-RMSE = sqrt(mean (log forecast - log observed)^2) and the share of observations inside the
central 50 % / 90 % predictive intervals; rows report mean and SD over individuals.

Methods:
- in-context (attention / physics decoders, checkpoint "small"), and the ablation without the
  study latent z_s ("small_no_zs"): `popkin.amortized.evaluate_population`, seconds per forecast.
- NLME: per held-out individual, FOCE-I fits of a 1- and a 2-compartment model (oral for
  theophylline / quinidine, IV for indometacin / phenobarbital; log-normal CL, V (and ka),
  fixed Q, Vp; combined additive + proportional error) on the context, chosen by AIC
  (OFV + 2 x number of estimated parameters). The held-out individual stays in the table with
  its samples turned into EVID 2 records (same padded shapes, so one compiled program per model
  and compound); its contribution to the OFV is then exactly 0 (checked, `max_abs_ofv_heldout`).
  Then `popkin.fit(..., maxeval=0)` at the fitted estimates on the table where only its first
  four samples at t > 0 are observations gives its EBE and Laplace posterior covariance. Point
  forecast: IPRED at the EBE. Intervals: 2000 draws eta ~ N(EBE, posterior covariance) plus
  residual error from the fitted error model. `seconds_per_study` is the wall time of both fits
  and the EBE for one held-out individual, warm (the first individual, which compiles, is left
  out of the mean and reported as `nlme.<compound>.first_seconds`).
- issue 6: the flow-matching generator ("generator_small": predictive samples from the flow
  over individual PK parameter paths, decoded by exact physics) and the two baselines trained
  by the same loop ("transformer_small", "neural_ode_small"), through the same harness.
- issue 5: the same in-context model in the `cpu` config (d_model 32, one layer, batch 16,
  9,000 steps), trained on this machine's CPU within 2 h (benchmarks/results/pretrain_cpu_run.json).
- synthetic: `sample_studies(PRNGKey(SEED), N)` (N = --n-synthetic) evaluated with
  `evaluate_study(..., s=k)`.

Run: `.venv/bin/python benchmarks/realdata.py [--compounds a,b] [--skip-nlme] [--n-synthetic N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import popkin
from popkin.amortized import (
    evaluate_population,
    evaluate_study,
    from_population,
    load_model,
    loo_targets,
    sample_studies,
)
from popkin.simulate import predictor_for

RESULTS = Path(__file__).resolve().parent / "results"
COMPOUNDS = ["theophylline", "indometacin", "phenobarbital", "quinidine"]
ORAL = {"theophylline": True, "indometacin": False, "phenobarbital": False, "quinidine": True}
SEED = 20240605
N_EARLY = 4
AMORTIZED = [
    ("in-context (attention)", "small", "attention"),
    ("in-context (physics)", "small", "physics"),
    ("in-context, no z_s (attention)", "small_no_zs", "attention"),
    # issue 6: the flow-matching generator and the two baselines (decoder argument unused)
    ("generator (flow matching)", "generator_small", "attention"),
    ("plain transformer", "transformer_small", "attention"),
    ("latent neural ODE", "neural_ode_small", "attention"),
    # issue 5: the config trained on this 2-core CPU in under 2 h (configs/cpu.json)
    ("in-context, CPU-trained (attention)", "cpu", "attention"),
    ("in-context, CPU-trained (physics)", "cpu", "physics"),
]
PUBLISHED = {
    "source": "issue 5 'Targets' (PFF paper, same protocol)",
    "theophylline": {"PFF": 0.184, "AICMET": 0.274, "NLME": 0.732},
    "indometacin": {"PFF": 0.245, "AICMET": 0.536, "NLME": 0.582},
}
OURS_TARGETS = {
    "log_rmse_theophylline_max": 0.18,
    "log_rmse_indometacin_max": 0.24,
    "coverage90_real": [0.85, 0.95],
    "coverage90_synthetic": [0.88, 0.92],
    "seconds_per_forecast_max": 0.05,
    "speed_ratio_min": 1000.0,
}

# Initial values per compound (log scale): units as in `popkin.datasets` (CL L/h, V L; for
# phenobarbital per kg since doses are per kg). Q and Vp of the 2-compartment models.
INIT = {
    "theophylline": dict(tka=0.45, tcl=1.0, tv=3.45, tq=0.5, tvp=3.0, add=0.3, prop=0.1),
    "indometacin": dict(tcl=2.1, tv=2.3, tq=1.6, tvp=2.7, add=0.05, prop=0.1),
    "phenobarbital": dict(tcl=-5.3, tv=0.0, tq=-3.0, tvp=0.0, add=1.0, prop=0.1),
    "quinidine": dict(tka=-0.7, tcl=2.6, tv=5.4, tq=2.0, tvp=5.5, add=0.2, prop=0.2),
}


# == NLME models ==================================================================================
def nlme_models(compound: str) -> dict[str, type[popkin.Model]]:
    """1- and 2-compartment models for a compound, initial values from `INIT`."""
    v = INIT[compound]
    sig = popkin.Params(add_sd=popkin.Positive(v["add"]), prop_sd=popkin.Positive(v["prop"]))

    def obs(p, sol, sg):
        return {"cp": popkin.combined(sol.central / p["v"], sg.add_sd, sg.prop_sd)}

    if ORAL[compound]:

        class Oral1(popkin.Model):
            theta = popkin.Params(tka=v["tka"], tcl=v["tcl"], tv=v["tv"])
            omega = popkin.Omega(eta_ka=0.3, eta_cl=0.2, eta_v=0.1)
            sigma = sig
            dynamics = popkin.OneCmtOral()

            def individual(self, th, eta, cov):
                return dict(ka=jnp.exp(th.tka + eta.eta_ka), cl=jnp.exp(th.tcl + eta.eta_cl),
                            v=jnp.exp(th.tv + eta.eta_v))  # fmt: skip

            observe = staticmethod(obs)

        class Oral2(Oral1):
            theta = popkin.Params(tka=v["tka"], tcl=v["tcl"], tv=v["tv"], tq=v["tq"],
                                  tvp=v["tvp"])  # fmt: skip
            dynamics = popkin.TwoCmtOral()

            def individual(self, th, eta, cov):
                return dict(ka=jnp.exp(th.tka + eta.eta_ka), cl=jnp.exp(th.tcl + eta.eta_cl),
                            v=jnp.exp(th.tv + eta.eta_v), q=jnp.exp(th.tq),
                            vp=jnp.exp(th.tvp))  # fmt: skip

        return {"1-cmt oral": Oral1, "2-cmt oral": Oral2}

    class IV1(popkin.Model):
        theta = popkin.Params(tcl=v["tcl"], tv=v["tv"])
        omega = popkin.Omega(eta_cl=0.2, eta_v=0.1)
        sigma = sig
        dynamics = popkin.OneCmtIV()

        def individual(self, th, eta, cov):
            return dict(cl=jnp.exp(th.tcl + eta.eta_cl), v=jnp.exp(th.tv + eta.eta_v))

        observe = staticmethod(obs)

    class IV2(IV1):
        theta = popkin.Params(tcl=v["tcl"], tv=v["tv"], tq=v["tq"], tvp=v["tvp"])
        dynamics = popkin.TwoCmtIV()

        def individual(self, th, eta, cov):
            return dict(cl=jnp.exp(th.tcl + eta.eta_cl), v=jnp.exp(th.tv + eta.eta_v),
                        q=jnp.exp(th.tq), vp=jnp.exp(th.tvp))  # fmt: skip

    return {"1-cmt IV": IV1, "2-cmt IV": IV2}


def _hide(table: pd.DataFrame, rows) -> pd.DataFrame:
    """`table` with the observation rows `rows` turned into EVID 2 / MDV 1 records."""
    t = table.copy()
    t.loc[rows, ["EVID", "MDV"]] = [2, 1]
    t.loc[rows, "DV"] = np.nan
    return t


def _split(table: pd.DataFrame, sid) -> tuple[pd.Index, pd.Index, pd.Index]:
    """(all observation rows, first four at t > 0, later positive rows) of subject `sid`."""
    o = table[(table.ID == sid) & (table.EVID == 0) & (table.MDV == 0)]
    after = o[o.TIME > 0].sort_values("TIME", kind="stable")
    early = after.index[:N_EARLY]
    later = o[(o.TIME > after.TIME.iloc[N_EARLY - 1]) & (o.DV > 0)].index
    return o.index, early, later


def _predictive(fit, i: int, key, n: int = 2000):
    """IPRED at the EBE of subject i, and posterior-predictive draws (n, records)."""
    pred = predictor_for(fit.model, fit.population)
    s = jax.tree.map(lambda a: a[i], fit.population.subjects)
    th, sg = fit.params.theta, fit.params.sigma
    mode, cov = jnp.asarray(fit.eta[i]), jnp.asarray(fit.eta_cov[i])
    k1, k2 = jax.random.split(key)
    etas = jax.random.multivariate_normal(k1, mode, cov, (n,))

    def draw(e, k):
        loc, scale, _, _, logf = pred.distributions(th, sg, e, s, with_transforms=True)
        z = loc + scale * jax.random.normal(k, loc.shape)
        return jnp.where(logf, jnp.exp(z), z)

    ys = jax.jit(jax.vmap(draw))(etas, jax.random.split(k2, n))
    ipred = pred.distributions(th, sg, mode, s)[3]
    return np.asarray(ipred), np.asarray(ys), np.asarray(s.records.row)


def nlme_loo(compound: str, pop, targets, log) -> tuple[dict, list[dict]]:
    """NLME leave-one-out on `compound`: per-individual log-RMSE, coverage, seconds."""
    table = pop.table.copy().reset_index(drop=True)
    ids = list(pop.ids)
    models = nlme_models(compound)
    rmse, c50, c90, secs, chosen, ofv0, notes, bands = [], [], [], [], [], [], [], []
    for i, _, later_mask in targets:
        sid = ids[i]
        all_obs, early, later = _split(table, sid)
        if len(later) != int(later_mask.sum()):
            raise RuntimeError(f"{compound} ID {sid}: later samples disagree with loo_targets")
        context = _hide(table, all_obs)
        cond = _hide(table, all_obs.difference(early))
        t0 = time.perf_counter()
        fits = {}
        for name, cls in models.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f = popkin.fit(cls(), context, "focei", covariance=None)
            ofv0.append(abs(float(f.ofv_subjects[i])))
            if np.isfinite(f.ofv):
                fits[name] = (f, f.ofv + 2 * f.u_hat.size)
        if not fits:
            notes.append(f"ID {sid}: no finite fit")
            continue
        name = min(fits, key=lambda k: fits[k][1])
        f = fits[name][0]
        ebe = popkin.fit(f.model, cond, "focei", params=f.params, maxeval=0, covariance=None)
        ipred, ys, rows = _predictive(ebe, i, jax.random.PRNGKey(SEED + i))
        secs.append(time.perf_counter() - t0)
        chosen.append(name)
        pos = {r: j for j, r in enumerate(rows)}
        idx = [pos[r] for r in later]
        y = table.loc[later, "DV"].to_numpy(float)
        p = ipred[idx]
        if np.any(p <= 0) or not np.all(np.isfinite(p)):
            notes.append(f"ID {sid}: non-positive or non-finite forecast ({name})")
            continue
        q = np.quantile(ys[:, idx], [0.05, 0.25, 0.75, 0.95], axis=0)
        rmse.append(float(np.sqrt(np.mean((np.log(p) - np.log(y)) ** 2))))
        c50.append(float(np.mean((y >= q[1]) & (y <= q[2]))))
        c90.append(float(np.mean((y >= q[0]) & (y <= q[3]))))
        rec = [pos[r] for r in all_obs]
        qa = np.quantile(ys[:, rec], [0.05, 0.95], axis=0)
        bands.append(dict(index=i, time=table.loc[all_obs, "TIME"].to_numpy(float),
                          obs=table.loc[all_obs, "DV"].to_numpy(float),
                          early=np.isin(all_obs, early), later=np.isin(all_obs, later),
                          pred=ipred[rec], lo90=qa[0], hi90=qa[1]))  # fmt: skip
        log(f"  NLME {compound} ID {sid}: {name}, log-RMSE {rmse[-1]:.3f}, {secs[-1]:.1f} s")
    out = dict(
        log_rmse=np.array(rmse),
        coverage50=float(np.mean(c50)) if c50 else None,
        coverage90=float(np.mean(c90)) if c90 else None,
        seconds=np.array(secs[1:] if len(secs) > 1 else secs),  # the first one compiles
        first_seconds=secs[0] if secs else None,
        chosen={k: chosen.count(k) for k in models},
        max_abs_ofv_heldout=max(ofv0) if ofv0 else None,
        notes=notes,
    )
    return out, bands


# == rows, figures, output ========================================================================
def _row(compound, method, rmse, c50, c90, secs, **extra) -> dict:
    rmse = np.asarray(rmse, float)
    ok = rmse.size > 0
    return dict(
        compound=compound,
        method=method,
        log_rmse_mean=float(np.mean(rmse)) if ok else None,
        log_rmse_sd=float(np.std(rmse, ddof=1)) if rmse.size > 1 else None,
        coverage50=None if c50 is None or not np.isfinite(c50) else float(c50),
        coverage90=None if c90 is None or not np.isfinite(c90) else float(c90),
        n_individuals=int(rmse.size),
        seconds_per_study=float(np.mean(secs)) if len(secs) else None,
        **extra,
    )


def _figure(compound: str, panels: list[tuple[str, dict]], path: Path) -> None:
    """One forecast-band panel per method for the first scored individual."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from popkin.diagnostics import forecast_band

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (label, f) in zip(axes[0], panels, strict=True):
        m = np.asarray(f.get("obs_mask", np.ones_like(f["time"], bool)), bool)
        t = np.asarray(f["time"])[m]
        order = np.argsort(t, kind="stable")
        pred, lo, hi, obs, e, lt = (np.asarray(f[k])[m][order]
                                    for k in ("pred", "lo90", "hi90", "obs", "early", "later"))  # fmt: skip
        e, lt = e.astype(bool), lt.astype(bool)
        forecast_band(t[order], pred, lo, hi, observed=(t[order][e], obs[e]),
                      future=(t[order][lt], obs[lt]), ax=ax, label=label,
                      title=f"{compound}, individual {f['index']}: {label}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(x, nd=3) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    lines = [
        "| compound | method | log-RMSE (mean ± SD) | 50% cov. | 90% cov. | n | s / forecast |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sd = "" if r["log_rmse_sd"] is None else f" ± {r['log_rmse_sd']:.3f}"
        s = r["seconds_per_study"]
        lines.append(
            f"| {r['compound']} | {r['method']} | {_fmt(r['log_rmse_mean'])}{sd} | "
            f"{_fmt(r['coverage50'], 2)} | {_fmt(r['coverage90'], 2)} | {r['n_individuals']} | "
            f"{'n/a' if s is None else f'{s:.3g}'} |"
        )
    lines.append("")
    pub = result["published"]
    lines.append(
        "Published log-RMSE on the same protocol (PFF paper): "
        + "; ".join(
            f"{c} PFF {pub[c]['PFF']}, AICMET {pub[c]['AICMET']}, NLME {pub[c]['NLME']}"
            for c in ("theophylline", "indometacin")
        )
        + "."
    )
    ratios = ", ".join(
        f"{c} {v:.0f}x" for c, v in result["speed_ratio_nlme_vs_amortized"].items() if v
    )
    if ratios:
        lines.append(f"NLME refit time / in-context forecast time (same run): {ratios}.")
    for note in result.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compounds", default=",".join(COMPOUNDS))
    ap.add_argument("--skip-nlme", action="store_true")
    ap.add_argument("--nlme-only", action="store_true", help="no amortized rows (merge them)")
    ap.add_argument("--n-synthetic", type=int, default=30)
    ap.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="realdata.json files from other runs: their (compound, method) rows that this run "
        "did not produce are appended (e.g. NLME rows from a run without --skip-nlme)",
    )
    ap.add_argument(
        "--nlme-max-targets",
        type=int,
        default=None,
        help="NLME baseline on only the first N scored individuals (ID order); the row's n and "
        "a note say so (for compounds whose NLME leave-one-out does not fit the time)",
    )
    ap.add_argument(
        "--checkpoints",
        default=None,
        help="comma-separated: only the amortized rows of these checkpoints (merge the rest)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    amortized = [
        a for a in AMORTIZED if args.checkpoints is None or a[1] in args.checkpoints.split(",")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_all:7.1f} s] {msg}", flush=True)

    def write(complete: bool = False):
        """Write what is done so far (the run may be cut short)."""
        rank = {c: k for k, c in enumerate([*COMPOUNDS, "synthetic"])}
        result = dict(
            rows=sorted(rows, key=lambda r: rank.get(r["compound"], len(rank))),  # stable
            published=PUBLISHED,
            targets=OURS_TARGETS,
            speed_ratio_nlme_vs_amortized=ratio,
            nlme=nlme_info,
            notes=notes,
            protocol=__doc__.split("\n\n")[1],
            seed=SEED,
            machine=dict(
                platform=platform.platform(),
                cpus=os.cpu_count(),
                load_avg=os.getloadavg()[0],
                jax=jax.__version__,
            ),  # fmt: skip
            wall_s=time.perf_counter() - t_all,
            complete=complete,
            merged_from={str(p): json.loads(p.read_text())["wall_s"] for p in args.merge},
        )
        (args.out / "realdata.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "realdata.md").write_text(markdown(result))

    nets = {name: load_model(name) for _, name, _ in amortized}
    rows, notes, ratio, nlme_info = [], [], {}, {}
    for compound in filter(None, args.compounds.split(",")):
        pop = getattr(popkin.datasets, compound)()
        targets = loo_targets(from_population(pop))
        panels, sec_amort = [], None
        for method, ckpt, dec in [] if args.nlme_only else amortized:
            evaluate_population(pop, nets[ckpt], dec)  # warm-up: compile outside the timing
            r = evaluate_population(pop, nets[ckpt], dec, seed=SEED)
            rows.append(_row(compound, method, r["log_rmse"], r["coverage50"], r["coverage90"],
                             r["seconds"]))  # fmt: skip
            if method == amortized[0][0]:
                sec_amort = float(np.mean(r["seconds"]))
                panels.append((method, r["forecasts"][0]))
            log(f"{compound} {method}: {rows[-1]['log_rmse_mean']:.3f}")
        if args.skip_nlme:
            continue
        if args.nlme_max_targets is not None and len(targets) > args.nlme_max_targets:
            notes.append(f"NLME {compound}: first {args.nlme_max_targets} of {len(targets)} "
                         "scored individuals only (--nlme-max-targets)")  # fmt: skip
            targets = targets[: args.nlme_max_targets]
        try:
            r, bands = nlme_loo(compound, pop, targets, log)
        except Exception as e:  # reported, not hidden
            notes.append(f"NLME {compound} failed: {type(e).__name__}: {e}")
            rows.append(_row(compound, "NLME (FOCE-I, 1/2-cmt by AIC)", [], None, None, [],
                             note=notes[-1]))  # fmt: skip
            continue
        note = "; ".join(r["notes"]) or None
        rows.append(_row(compound, "NLME (FOCE-I, 1/2-cmt by AIC)", r["log_rmse"],
                         r["coverage50"], r["coverage90"], r["seconds"],
                         **({"note": note} if note else {})))  # fmt: skip
        nlme_info[compound] = {k: r[k] for k in ("chosen", "max_abs_ofv_heldout", "first_seconds")}
        if note:
            notes.append(f"NLME {compound}: {note}")
        if r["seconds"].size and sec_amort:
            ratio[compound] = float(np.mean(r["seconds"]) / sec_amort)
        if bands and panels:
            panels.append(
                (
                    "NLME (EBE)",
                    next((b for b in bands if b["index"] == panels[0][1]["index"]), bands[0]),
                )
            )
        if not args.nlme_only:
            _figure(compound, panels, args.out / f"realdata_{compound}.png")
        write()
        log(f"{compound} NLME: {rows[-1]['log_rmse_mean']}")

    if args.n_synthetic:
        studies = sample_studies(jax.random.PRNGKey(SEED), args.n_synthetic)
        for method, ckpt, dec in amortized:
            rm, c50, c90, sec = [], [], [], []
            for k in range(args.n_synthetic):
                r = evaluate_study(studies, nets[ckpt], dec, s=k, seed=SEED)
                n = r["log_rmse"].size
                rm += list(r["log_rmse"])
                c50 += [r["coverage50"]] * n
                c90 += [r["coverage90"]] * n
                sec += list(r["seconds"][1:] if k == 0 else r["seconds"])  # first call compiles
            rows.append(_row("synthetic", method, rm, float(np.mean(c50)), float(np.mean(c90)),
                             sec, n_studies=args.n_synthetic))  # fmt: skip
            log(f"synthetic {method}: {rows[-1]['log_rmse_mean']:.3f}")
            write()

    for path in args.merge:  # runs split over processes: append the rows this run lacks
        other = json.loads(path.read_text())
        have = {(r["compound"], r["method"]) for r in rows}
        rows += [r for r in other["rows"] if (r["compound"], r["method"]) not in have]
        for k, v in other["speed_ratio_nlme_vs_amortized"].items():
            ratio.setdefault(k, v)
        for k, v in other["nlme"].items():
            nlme_info.setdefault(k, v)
        notes += [n for n in other["notes"] if "not evaluated" not in n]

    missing = [c for c in COMPOUNDS if c not in {r["compound"] for r in rows}]
    notes += [f"{c}: not evaluated in this run (ran out of time)" for c in missing]
    nlme = {r["compound"] for r in rows if r["method"].startswith("NLME")}
    no_nlme = [c for c in COMPOUNDS if c not in missing and c not in nlme]
    notes += [f"{c}: NLME baseline not evaluated (not completed in time)" for c in no_nlme]
    write(complete=not missing and not no_nlme)
    log("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
