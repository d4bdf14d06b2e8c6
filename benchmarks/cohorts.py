"""Issue 6 evaluation: sample fidelity of generated virtual cohorts (synthetic and real data).

Protocol (leave-one-out, no samples of the target): for every individual i of a study, the
context is the study's other individuals (all their data); the model generates virtual
individuals under i's own dosing at i's own sampling times (and on a dense grid for NCA),
without seeing any sample of i (`popkin.generate`'s path: z_s ~ q(z_s | context),
z_i ~ p(z_i | z_s), residual error). Scales (T_s, A_s, C_s) come from the context only.

Compared, generated vs observed:
- classifier two-sample AUC and MMD (`popkin.diagnostics.classifier_auc` / `mmd`) on per-
  individual feature rows: log(y / C_s) and t / T_s at each sample (padded, with masks) and
  the route; each observed row is paired with one generated row of the same design, so the
  design carries no signal and only the concentrations can separate the classes. Samples
  below a study's LLOQ are set to the LLOQ in both (as the data record them).
  0.5 (AUC) / 0 (MMD^2) is ideal.
  synthetic: `sample_studies(PRNGKey(SEED), n, PriorConfig())`, every individual held out.
  real: the four bundled data sets, each one study.
- NCA (`nca_profile` of the module popkin.nca) of observed and generated profiles at the observed times
  (median of each summary), and of the generated individuals' noise-free profiles (PRED) on
  a dense grid after their last dose; `popkin.realism_check` of the observed and the dense
  generated cohorts against the literature table `popkin/data/pk_reference.csv`.
- VPC-style PNGs per real compound: observed 10/50/90 % percentiles per time bin against
  90 % intervals of the same percentiles over generated replicates of the whole cohort.

Run: `.venv/bin/python benchmarks/cohorts.py --model small [--decoder physics] [--quick]`.
Writes benchmarks/results/cohorts.json, cohorts.md and cohorts_<compound>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich.progress import track  # noqa: E402

import popkin  # noqa: E402
from popkin.amortized import PriorConfig, from_population, load_model, sample_studies  # noqa: E402
from popkin.amortized._forecast import _generate  # noqa: E402
from popkin.amortized._tokens import normalise, study_scales  # noqa: E402
from popkin.diagnostics import classifier_auc, mmd  # noqa: E402
from popkin.nca import nca_profile, realism_check  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 20240606
COMPOUNDS = ["theophylline", "indometacin", "phenobarbital", "quinidine"]
ROUTES = {0: "extravascular", 1: "iv", 2: "infusion"}
NCA_COLS = ["Cmax", "Tmax", "AUClast", "t_half"]
N_DENSE = 32
TARGETS = {"auc_synthetic_max": 0.55, "auc_real_max": 0.60, "published_auc": [0.52, 0.57]}


# == generation ===================================================================================
def _loo_one(net, study1, i, key, t_query, n_gen: int, decoder: str):
    """Leave-one-out generation for target i of one study (S = 1, original units).

    Returns (log y draws (n_gen, T), log PRED draws (n_gen, T)) in original units at t_query."""
    n = study1.ind_mask.shape[1]
    ctx = study1.ind_mask & (jnp.arange(n) != i)[None]
    scales = study_scales(study1, ctx)
    norm = normalise(study1, scales).take(0)
    m, y = _generate(net, norm, i, t_query / scales.time[0], key, n_gen, decoder)
    c = jnp.log(scales.conc[0])
    # log(y / C_s) clipped to [-50, 50] (popkin.generate caps at 50 too): keeps exp() finite
    return jnp.clip(y, -50.0, 50.0) + c, jnp.clip(m, -50.0, 50.0) + c


@eqx.filter_jit
def _loo_study(net, study1, keys, t_query, n_gen: int, decoder: str):
    """`_loo_one` for every individual of the study (vmapped): (N, n_gen, T) twice."""
    n = study1.ind_mask.shape[1]
    return jax.vmap(lambda i, k, tq: _loo_one(net, study1, i, k, tq, n_gen, decoder))(
        jnp.arange(n), keys, t_query
    )


def dense_grid(study1) -> np.ndarray:
    """Per individual: N_DENSE times from its last dose to max(last sample, last dose + 2 II or
    the single-dose horizon), quadratically spaced (dense early)."""
    n = study1.ind_mask.shape[1]
    out = np.zeros((n, N_DENSE), np.float32)
    u = np.linspace(0.0, 1.0, N_DENSE + 1)[1:] ** 2
    for i in range(n):
        dm = np.asarray(study1.dose_mask[0, i])
        dt = np.asarray(study1.dose_t[0, i])[dm]
        om = np.asarray(study1.obs_mask[0, i])
        last_dose = float(dt.max()) if len(dt) else 0.0
        last_obs = float(np.asarray(study1.obs_t[0, i])[om].max()) if om.any() else 24.0
        span = last_obs - last_dose
        if len(dt) > 1:
            span = max(span, 2.0 * float(np.median(np.diff(np.sort(dt)))))
        out[i] = last_dose + max(span, 1.0) * u
    return out


# == features and comparison ======================================================================
def features(t_norm, logy_norm, mask, route):
    """Rows [log y (T), t (T), route one-hot (3)] and masks (route always present)."""
    x = np.concatenate([logy_norm, t_norm, np.eye(3)[route]], axis=1)
    m = np.concatenate([mask, mask, np.ones((len(route), 3), bool)], axis=1)
    return x, m


def fidelity(xr, mr, xf, mf, gr, gf, key) -> dict:
    """Classifier AUC (folds by individual: a real row and its generated partners share a
    fold) and MMD^2 with its permutation p-value (labels permuted within individuals)."""
    k1, k2 = jax.random.split(key)
    folds = int(min(5, len(np.unique(gr))))
    auc = classifier_auc(xr, xf, k1, real_mask=mr, fake_mask=mf, real_groups=gr,
                         fake_groups=gf, folds=folds)  # fmt: skip
    m2, p = mmd(xr, xf, k2, x_mask=mr, y_mask=mf, x_groups=gr, y_groups=gf, n_perm=500)
    return dict(auc=auc, mmd=m2, mmd_p=p, n_real=len(xr), n_fake=len(xf))


def _nca_rows(t, y, mask, cens, dose_t, dose_amt, dose_mask, route, ss, ii):
    """NCA of each individual's profile (arrays (N, T) in original units)."""
    out = []
    for i in range(len(t)):
        om, dm = mask[i], dose_mask[i]
        if not om.any() or not dm.any():
            continue
        dii = np.where(ss[i], ii[i], 0.0) * np.ones(dm.sum())
        r = nca_profile(t[i][om], y[i][om], dose_t[i][dm], dose_amt[i][dm],
                        route=ROUTES[int(route[i])], cens=cens[i][om], ii=dii)  # fmt: skip
        out.append(dict(r, index=i))
    return pd.DataFrame(out)


def _nca_summary(df: pd.DataFrame, data: str, cohort: str, model: str) -> list[dict]:
    rows = []
    for q in NCA_COLS:
        v = df[q].to_numpy(float) if len(df) else np.array([])
        v = v[np.isfinite(v)]
        rows.append(dict(data=data, model=model, cohort=cohort, quantity=q, n=int(len(v)),
                         median=float(np.median(v)) if len(v) else None,
                         q25=float(np.quantile(v, 0.25)) if len(v) else None,
                         q75=float(np.quantile(v, 0.75)) if len(v) else None))  # fmt: skip
    return rows


# == real compounds ===============================================================================
def real_compound(name, net, decoder, model_name, n_rep, key, log, out_dir):
    pop = getattr(popkin.datasets, name)()
    table = getattr(popkin.datasets, f"{name}_table")()
    st = from_population(pop)
    n = st.ind_mask.shape[1]
    k_own, k_dense, k_fid = jax.random.split(key, 3)
    t0 = time.perf_counter()
    y, _ = _loo_study(net, st, jax.random.split(k_own, n), st.obs_t[0], n_rep, decoder)
    grid = dense_grid(st)
    _, m_dense = _loo_study(net, st, jax.random.split(k_dense, n), jnp.asarray(grid), 1, decoder)
    y = np.asarray(y, float)  # (N, R, T) log y, original units
    m_dense = np.asarray(m_dense, float)[:, 0]
    secs = time.perf_counter() - t0
    if not np.all(np.isfinite(y)):
        raise FloatingPointError(f"{name}: non-finite generated concentrations")
    obs_t, obs_y = np.asarray(st.obs_t[0], float), np.asarray(st.obs_y[0], float)
    mask, cens = np.asarray(st.obs_mask[0]), np.asarray(st.obs_cens[0])
    keep = mask.any(1)
    route = np.asarray(st.dose_route[0, :, 0])
    # LLOQ as recorded (censored samples hold it): apply the same floor to generated values
    lloq = float(obs_y[cens & mask].min()) if (cens & mask).any() else 0.0
    fake_y = np.maximum(np.exp(y), lloq)
    scales = study_scales(st, st.ind_mask)
    t_s, c_s = float(scales.time[0]), float(scales.conc[0])
    xr, mr = features(obs_t / t_s, np.log(np.maximum(obs_y, 1e-12) / c_s), mask, route)
    xf, mf = features(obs_t / t_s, np.log(fake_y[:, 0] / c_s), mask, route)
    reps = max(1, math.ceil(40 / keep.sum()))  # at least ~40 generated rows for small sets
    xf = np.concatenate([features(obs_t / t_s, np.log(fake_y[:, r] / c_s), mask, route)[0][keep]
                         for r in range(reps)])  # fmt: skip
    mf = np.concatenate([mf[keep]] * reps)
    g = np.flatnonzero(keep)
    row = dict(data=name, model=model_name, decoder=decoder,
               **fidelity(xr[keep], mr[keep], xf, mf, g, np.tile(g, reps), k_fid),
               seconds=secs)  # fmt: skip
    log(f"{name}: AUC {row['auc']:.3f}  MMD^2 {row['mmd']:.4f} (p={row['mmd_p']:.3f})")
    # NCA: observed, generated at observed times (replicate 0), generated dense (PRED)
    args = (np.asarray(st.dose_t[0]), np.asarray(st.dose_amt[0]), np.asarray(st.dose_mask[0]),
            route, np.asarray(st.ss[0]), np.asarray(st.ii[0]))  # fmt: skip
    nca_obs = _nca_rows(obs_t, obs_y, mask, cens, *args)
    nca_gen = _nca_rows(obs_t, fake_y[:, 0], mask, cens, *args)
    dense_mask = np.ones_like(grid, bool)
    nca_dense = _nca_rows(grid, np.exp(m_dense), dense_mask, ~dense_mask, *args)
    ids = list(pop.ids)
    nca_rows = []
    for cohort, df in (
        ("observed", nca_obs),
        ("generated", nca_gen),
        ("generated dense", nca_dense),
    ):
        nca_rows += _nca_summary(df, name, cohort, model_name)
    # realism (weights per ID where the table has them; phenobarbital doses are per kg)
    wcol = next((c for c in ("WT", "WEIGHT") if c in table.columns), None)
    weights = dict(zip(table["ID"], table[wcol], strict=True)) if wcol else None
    realism = []
    for cohort, df in (("observed", nca_obs), ("generated dense", nca_dense)):
        df = df.assign(ID=[ids[i] for i in df["index"]])
        r = realism_check(df, name, weights=weights, per_kg=(name == "phenobarbital"))
        realism += [dict(r_, model=model_name, cohort=cohort) for r_ in r.to_dict("records")]
    vpc_png(name, obs_t, obs_y, mask, np.exp(y), model_name, out_dir)
    return row, nca_rows, realism


def vpc_png(name, t, y, mask, fake, model_name, out_dir, n_bins: int = 6):
    """Observed percentiles per time bin vs 90 % intervals of generated percentiles."""
    tt, yy = t[mask], y[mask]
    edges = np.unique(np.quantile(tt, np.linspace(0, 1, n_bins + 1)))
    b = np.clip(np.searchsorted(edges, tt, side="right") - 1, 0, len(edges) - 2)
    mid = np.array([np.median(tt[b == k]) for k in range(len(edges) - 1)])
    qs = (10, 50, 90)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter(tt, yy, s=8, color="0.5", alpha=0.6, label="observed")
    colors = {10: "tab:blue", 50: "tab:red", 90: "tab:blue"}
    for q in qs:
        obs_q = [np.percentile(yy[b == k], q) for k in range(len(mid))]
        gen_q = np.array([[np.percentile(fake[:, r][mask][b == k], q) for k in range(len(mid))]
                          for r in range(fake.shape[1])])  # fmt: skip
        lo, hi = np.percentile(gen_q, [5, 95], axis=0)
        ax.fill_between(mid, lo, hi, color=colors[q], alpha=0.2,
                        label="generated 90 % PI" if q == 50 else None)  # fmt: skip
        ax.plot(mid, obs_q, color=colors[q], lw=1.5, label=f"observed P{q}")
    ax.set_yscale("log")
    lo_y, hi_y = yy[yy > 0].min() / 10.0, yy.max() * 10.0  # generated extremes run off the plot
    ax.set_ylim(lo_y, hi_y)
    fv = np.moveaxis(fake, 1, 2)[mask]  # (samples, replicates)
    share = np.mean((fv < lo_y) | (fv > hi_y))
    ax.text(0.01, 0.01, f"{100 * share:.1f} % of generated values outside the axis",
            transform=ax.transAxes, fontsize=7, color="0.3")  # fmt: skip
    ax.set_xlabel("time (h)")
    ax.set_ylabel("concentration")
    ax.set_title(f"{name}: observed vs generated ({model_name}, leave-one-out)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(Path(out_dir) / f"cohorts_{name}.png", dpi=110)
    plt.close(fig)


# == synthetic ====================================================================================
def synthetic(n_studies, net, decoder, model_name, key, log):
    studies = sample_studies(jax.random.PRNGKey(SEED), n_studies, PriorConfig())
    xr, mr, xf, mf, nca_o, nca_g, groups = [], [], [], [], [], [], []
    t0 = time.perf_counter()
    for s in track(range(n_studies), description="synthetic studies"):
        st = studies.take(slice(s, s + 1))
        n = st.ind_mask.shape[1]
        y, _ = _loo_study(net, st, jax.random.split(jax.random.fold_in(key, s), n),
                          st.obs_t[0], 1, decoder)  # fmt: skip
        y = np.asarray(y, float)[:, 0]
        if not np.all(np.isfinite(y)):
            raise FloatingPointError(f"synthetic study {s}: non-finite generated values")
        ind = np.asarray(st.ind_mask[0])
        obs_t, obs_y = np.asarray(st.obs_t[0], float), np.asarray(st.obs_y[0], float)
        mask, cens = np.asarray(st.obs_mask[0]), np.asarray(st.obs_cens[0])
        lloq = float(obs_y[cens & mask].min()) if (cens & mask).any() else 0.0
        fake = np.maximum(np.exp(y), lloq)
        sc = study_scales(st, st.ind_mask)
        t_s, c_s = float(sc.time[0]), float(sc.conc[0])
        route = np.asarray(st.dose_route[0, :, 0])
        a, am = features(obs_t / t_s, np.log(np.maximum(obs_y, 1e-12) / c_s), mask, route)
        b, bm = features(obs_t / t_s, np.log(fake / c_s), mask, route)
        xr.append(a[ind]), mr.append(am[ind]), xf.append(b[ind]), mf.append(bm[ind])
        groups.append(s * 1000 + np.flatnonzero(ind))
        args = (np.asarray(st.dose_t[0]), np.asarray(st.dose_amt[0]),
                np.asarray(st.dose_mask[0]), route, np.asarray(st.ss[0]), np.asarray(st.ii[0]))  # fmt: skip
        nca_o.append(_nca_rows(obs_t[ind], obs_y[ind], mask[ind], cens[ind],
                               *(x[ind] for x in args)))  # fmt: skip
        nca_g.append(_nca_rows(obs_t[ind], fake[ind], mask[ind], cens[ind],
                               *(x[ind] for x in args)))  # fmt: skip
    secs = time.perf_counter() - t0
    xr, mr, xf, mf, g = (np.concatenate(v) for v in (xr, mr, xf, mf, groups))
    row = dict(data="synthetic", model=model_name, decoder=decoder,
               **fidelity(xr, mr, xf, mf, g, g, jax.random.fold_in(key, 10_000)),
               seconds=secs)  # fmt: skip
    log(f"synthetic ({n_studies} studies): AUC {row['auc']:.3f}  MMD^2 {row['mmd']:.4f} "
        f"(p={row['mmd_p']:.3f})")  # fmt: skip
    # NCA: ratio generated / observed per individual (same design), median over individuals
    o, g = pd.concat(nca_o, ignore_index=True), pd.concat(nca_g, ignore_index=True)
    nca_rows = _nca_summary(o, "synthetic", "observed", model_name)
    nca_rows += _nca_summary(g, "synthetic", "generated", model_name)
    for q in NCA_COLS:
        r = g[q].to_numpy(float) / o[q].to_numpy(float)
        r = r[np.isfinite(r) & (r > 0)]
        if len(r):
            nca_rows.append(dict(data="synthetic", model=model_name, cohort="log ratio gen/obs",
                                 quantity=q, n=int(len(r)), median=float(np.median(np.log(r))),
                                 q25=float(np.quantile(np.log(r), 0.25)),
                                 q75=float(np.quantile(np.log(r), 0.75))))  # fmt: skip
    return row, nca_rows


# == output =======================================================================================
def _fmt(v, nd=3):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):  # missing
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}g}" if abs(v) >= 1000 or abs(v) < 0.001 and v != 0 else f"{v:.{nd}f}"
    return str(v)


def clean(v):
    """JSON-safe copy: non-finite floats become null."""
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    return v


def write_md(out: dict) -> str:
    lines = [
        f"Sample fidelity of leave-one-out virtual cohorts, model `{out['model']}` "
        f"(decoder {out['decoder']}); targets: AUC <= {TARGETS['auc_synthetic_max']} synthetic, "
        f"<= {TARGETS['auc_real_max']} real (0.5 ideal; published PFF {TARGETS['published_auc']}).",
        "",
        "| data | n real | n generated | classifier AUC | MMD^2 | MMD p | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(f"| {r['data']} | {r['n_real']} | {r['n_fake']} | {r['auc']:.3f} | "
                     f"{_fmt(r['mmd'], 4)} | {r['mmd_p']:.3f} | {r['seconds']:.1f} |")  # fmt: skip
    lines += ["", "NCA summaries, median [IQR] over individuals with a value (n):", "",
              "| data | cohort | " + " | ".join(NCA_COLS) + " |",
              "|---|---|" + "---|" * len(NCA_COLS)]  # fmt: skip
    by = {}
    for r in out["nca"]:
        by.setdefault((r["data"], r["cohort"]), {})[r["quantity"]] = r
    for (data, cohort), qs in by.items():
        cells = []
        for q in NCA_COLS:
            r = qs.get(q)
            cells.append("–" if r is None or r["n"] == 0 else
                         f"{_fmt(r['median'])} [{_fmt(r['q25'])}, {_fmt(r['q75'])}] ({r['n']})")  # fmt: skip
        lines.append(f"| {data} | {cohort} | " + " | ".join(cells) + " |")
    lines += ["", "Realism: share of individuals inside the literature range "
              "(`popkin/data/pk_reference.csv`; sources there):", "",
              "| compound | cohort | quantity | range | n | inside | median |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in out["realism"]:
        lines.append(f"| {r['compound']} | {r['cohort']} | {r['quantity']} ({r['route']}) | "
                     f"{_fmt(r['low'])}-{_fmt(r['high'])} {r['unit']} | {r['n']} | "
                     f"{_fmt(r['inside'], 2)} | {_fmt(r['median'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small", help="checkpoint name or folder")
    ap.add_argument("--decoder", default="physics", choices=["physics", "attention"])
    ap.add_argument("--quick", action="store_true", help="few studies, two compounds")
    ap.add_argument("--n-synthetic", type=int, default=None)
    ap.add_argument("--compounds", default=None, help="comma-separated (default: all four)")
    ap.add_argument(
        "--n-rep", type=int, default=50, help="generated replicates per real individual"
    )
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--plots-only", action="store_true",
                    help="only the real compounds' PNGs (no synthetic part, no JSON / md)")  # fmt: skip
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_syn = args.n_synthetic or (8 if args.quick else 100)
    compounds = (args.compounds.split(",") if args.compounds else
                 (["theophylline", "indometacin"] if args.quick else COMPOUNDS))  # fmt: skip
    n_rep = 20 if args.quick else args.n_rep
    net = load_model(args.model)
    key = jax.random.PRNGKey(SEED)
    t_start = time.perf_counter()
    rows, nca_rows, realism = [], [], []
    if not args.plots_only:
        row, nr = synthetic(n_syn, net, args.decoder, args.model, jax.random.fold_in(key, 1), print)
        rows.append(row)
        nca_rows += nr
    for j, name in enumerate(track(compounds, description="real compounds")):
        row, nr, rr = real_compound(name, net, args.decoder, args.model, n_rep,
                                    jax.random.fold_in(key, 100 + j), print, out_dir)  # fmt: skip
        rows.append(row)
        nca_rows += nr
        realism += rr
    if args.plots_only:
        return 0
    out = dict(
        model=args.model, decoder=args.decoder, quick=args.quick, seed=SEED,
        n_synthetic_studies=n_syn, n_rep=n_rep, targets=TARGETS, rows=rows, nca=nca_rows,
        realism=realism, total_seconds=time.perf_counter() - t_start,
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                     jax=jax.__version__, device=str(jax.devices()[0])),
    )  # fmt: skip
    stem = "cohorts_quick" if args.quick else "cohorts"
    (out_dir / f"{stem}.json").write_text(json.dumps(clean(out), indent=1))
    (out_dir / f"{stem}.md").write_text(write_md(out))
    print(write_md(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
