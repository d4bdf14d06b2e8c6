"""The `popkin demo` workflow: theophylline fit, diagnostics and a simulated cohort band."""

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
    return files


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
