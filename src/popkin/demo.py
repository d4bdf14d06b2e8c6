"""The `popkin demo` workflow: theophylline fit, diagnostics, a simulated cohort band, a
two-biomarker join, and the HTML report (`out/demo/report.html`)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np


def run_demo(out, *, seed: int = 0, console=None) -> list[Path]:
    """Fit theophylline by FOCE-I, write GOF / individual-fit PNGs, the parameter table, and
    observed profiles over a 90% band of 100 subjects simulated at the estimates."""
    from . import datasets
    from .diagnostics import gof, individual_fits, profiles_band
    from .models.library import Theophylline
    from .nlme import fit
    from .simulate import simulate

    say = console.print if console is not None else print
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    pop = datasets.theophylline()
    say(f"theophylline: {pop}")
    say("fitting 1-compartment oral model by FOCE-I (first run compiles, ~30 s) ...")
    f = fit(Theophylline(), pop, "focei", progress=console is not None)
    say(f.summary())
    files.append(f.save(out / "theophylline_fit.json"))
    est = f.estimates
    (out / "parameters.md").write_text(_markdown(est, f))
    est.to_csv(out / "parameters.csv", index=False)
    files += [out / "parameters.md", out / "parameters.csv"]
    gof(f, out / "gof.png", dv_unit="mg/L")
    individual_fits(f, out / "individual_fits.png", dv_unit="mg/L")
    files += [out / "gof.png", out / "individual_fits.png"]
    say("simulating 100 virtual subjects at the estimates ...")
    sim = simulate(Theophylline(), pop, f.params, key=jax.random.key(seed), n_replicates=9)
    sim = sim[sim["ID"] <= 100]
    sim.to_csv(out / "simulated.csv", index=False)
    profiles_band(
        pop.table,
        sim,
        out / "observed_vs_simulated.png",
        dv_unit="mg/L",
        title="Theophylline: observed profiles over 90% band of 100 simulated subjects",
    )
    files += [out / "simulated.csv", out / "observed_vs_simulated.png"]
    join_files, joint, join_table = _join_demo(out, seed=seed, say=say)
    files += join_files
    amortized_files, amortized_sections = _amortized_demo(out, seed=seed, say=say)
    files += amortized_files
    files.append(_report(out, f, joint, join_table, seed=seed, say=say, extra=amortized_sections))
    return files


def _amortized_demo(out: Path, *, seed: int, say) -> tuple[list[Path], list]:
    """Zero-shot forecast of theophylline subject 1 from the 11 others and its first four
    samples, and a virtual cohort under a regimen the context never saw (4 doses every 12 h)."""
    import numpy as np

    from . import datasets
    from .amortized import forecast, generate
    from .diagnostics import forecast_band

    say("zero-shot forecast with the shipped in-context model (one forward pass) ...")
    table = datasets.theophylline_table()
    target = table[table.ID == 1]
    obs = target[(target.EVID == 0) & (target.TIME > 0)]
    early, later = obs.iloc[:4], obs.iloc[4:]
    given = target[(target.EVID == 1) | target.index.isin(early.index)]
    times = np.linspace(0.0, 25.0, 101)
    fc = forecast(table[table.ID != 1], given, times, seed=seed)
    fig = forecast_band(fc.TIME, fc.PRED, fc.LO90, fc.HI90, observed=(early.TIME, early.DV),
                        future=(later.TIME, later.DV), dv_unit="mg/L", label="in-context forecast",
                        title="Theophylline subject 1: zero-shot forecast from 4 early samples",
                        path=out / "forecast_theophylline.png")  # fmt: skip
    say("virtual cohort: 100 individuals, 4 doses every 12 h (context: single dose) ...")
    dose = target[target.EVID == 1].iloc[0]
    regimen = table.iloc[:0].reindex(range(4)).assign(
        ID=1, TIME=[0.0, 12.0, 24.0, 36.0], AMT=float(dose.AMT), EVID=1, MDV=1, CMT=1,
        DV=np.nan, WT=float(dose.WT),
    )  # fmt: skip
    t_cohort = np.linspace(0.0, 60.0, 121)
    cohort = generate(table, regimen, 100, t_cohort, decoder="physics", seed=seed)
    wide = cohort.pivot(index="ID", columns="TIME", values="DV").to_numpy()
    q05, q50, q95 = np.percentile(wide, [5, 50, 95], axis=0)
    fig2 = forecast_band(t_cohort, q50, q05, q95, dv_unit="mg/L", label="virtual cohort median",
                         title="Theophylline: 100 generated individuals, 4 doses every 12 h (90% band)",
                         path=out / "virtual_cohort.png")  # fmt: skip
    cohort.to_csv(out / "virtual_cohort.csv", index=False)
    files = [
        out / "forecast_theophylline.png",
        out / "virtual_cohort.png",
        out / "virtual_cohort.csv",
    ]
    sections = [("Zero-shot forecast (in-context model, theophylline subject 1)", fig),
                ("Virtual cohort under a new regimen (in-context model)", fig2)]  # fmt: skip
    return files, sections


def _report(out: Path, f, joint, join_table, *, seed: int, say, extra=()) -> Path:
    """`out/report.html`: the theophylline fit's report plus the joining study's sections."""
    from .diagnostics import eta_pairs
    from .report import report

    say("writing report.html (pcVPC and NPDE simulate 200 replicates) ...")
    extra = [
        ("Joining: held-out log-likelihood (two biomarkers, 60 test subjects)", join_table),
        ("Joining: EBEs of the independent fits and the joined Gaussian prior",
         eta_pairs(joint, seed=seed)),
        *extra,
    ]  # fmt: skip
    return report(f, out / "report.html", extra_sections=extra, seed=seed, dv_unit="mg/L",
                  title="popkin demo: theophylline (FOCE-I) and a two-biomarker join")  # fmt: skip


def _join_demo(out: Path, *, seed: int, say) -> tuple[list[Path], object, object]:
    """Two biomarkers simulated with correlated random effects, fitted independently, joined
    post hoc; held-out log-likelihood against the independent prior; the joined prior's pairs."""
    import pandas as pd

    from .data._reader import read_nonmem
    from .diagnostics import joint_pairs
    from .join import join
    from .models.library import Biomarker, BiomarkerPair
    from .nlme import fit
    from .simulate import simulate

    say("joining: two biomarkers, 120 training + 60 test subjects, weekly for 12 weeks ...")
    weeks = np.arange(0.0, 13.0)
    rows = [(i + 1, t, 0.0, dvid) for i in range(180) for t in weeks for dvid in (1, 2)]
    design = read_nonmem(pd.DataFrame(rows, columns=["ID", "TIME", "DV", "DVID"]))
    sim = simulate(BiomarkerPair(), design, key=jax.random.key(seed + 1))
    sim = sim[["ID", "TIME", "DV", "DVID"]]
    split = {"train": sim[sim.ID <= 120], "test": sim[sim.ID > 120]}
    by_ep = {k: [d[d.DVID == e].assign(DVID=1) for e in (1, 2)] for k, d in split.items()}
    fits = [fit(Biomarker(), d, "focei", covariance=None) for d in by_ep["train"]]
    joint = join(fits, "gaussian", key=jax.random.key(seed))
    test = [read_nonmem(d) for d in by_ep["test"]]
    ll_j = joint.log_likelihood(test)["ll_laplace"].sum()
    ll_i = joint.log_likelihood(test, joint.independent)["ll_laplace"].sum()
    say(f"held-out log-likelihood: joined {ll_j:.1f}, independent {ll_i:.1f} "
        f"(gain {ll_j - ll_i:.1f} nats over 60 subjects)")  # fmt: skip
    joint_pairs(joint, out / "joined_prior_pairs.png",
                title="Biomarkers A and B: EBEs of independent fits and the joined Gaussian prior")  # fmt: skip
    (out / "join.md").write_text(
        "| prior | held-out log-likelihood (60 subjects) |\n|---|---|\n"
        f"| independent | {ll_i:.2f} |\n| joined Gaussian | {ll_j:.2f} |\n"
    )
    table = pd.DataFrame(
        {"prior": ["independent", "joined Gaussian"],
         "held-out log-likelihood (Laplace, 60 subjects)": [ll_i, ll_j]}
    )  # fmt: skip
    return [out / "joined_prior_pairs.png", out / "join.md"], joint, table


def _markdown(est, f) -> str:
    lines = [
        f"# {f.model.name} — {f.method.upper()}",
        "",
        f"OFV {f.ofv:.4f} (-2LL without N log 2π); status: {f.status.value}",
        "",
        "| parameter | estimate | SE | RSE% |",
        "|---|---|---|---|",
    ]
    for _, r in est.iterrows():
        se = f"{r.se:.4g}" if np.isfinite(r.se) else "-"
        rse = f"{r.rse_pct:.1f}" if np.isfinite(r.rse_pct) else "-"
        lines.append(f"| {r.parameter} | {r.estimate:.5g} | {se} | {rse} |")
    return "\n".join(lines) + "\n"
