"""Goodness-of-fit panels, individual fits and observed-vs-simulated percentile bands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def gof(fit, path=None, *, dv_unit: str = "", time_unit: str = "h"):
    """Four GOF panels: DV vs PRED, DV vs IPRED, CWRES vs time, CWRES vs PRED (and |IWRES|)."""
    plt = _plt()
    pr = fit.predictions
    obs = pr[pr["MDV"] == 0]
    u = f" ({dv_unit})" if dv_unit else ""
    fig, ax = plt.subplots(2, 3, figsize=(13, 8))
    for a, col in [(ax[0, 0], "PRED"), (ax[0, 1], "IPRED")]:
        a.scatter(obs[col], obs["DV"], s=12, alpha=0.6, color="C0")
        lim = [0, max(obs["DV"].max(), obs[col].max()) * 1.05]
        a.plot(lim, lim, "k--", lw=1, label="identity")
        a.set_xlabel(f"{col}{u}")
        a.set_ylabel(f"observed DV{u}")
        a.set_title(f"DV vs {col}")
        a.legend(loc="upper left")
    for a, (x, xl) in [
        (ax[1, 0], ("TIME", f"time ({time_unit})")),
        (ax[1, 1], ("PRED", f"PRED{u}")),
    ]:
        a.scatter(obs[x], obs["CWRES"], s=12, alpha=0.6, color="C1")
        a.axhline(0, color="k", lw=1)
        for h in (-2, 2):
            a.axhline(h, color="grey", ls=":", lw=1)
        a.set_xlabel(xl)
        a.set_ylabel("CWRES (-)")
        a.set_title(f"CWRES vs {x}")
    a = ax[0, 2]
    a.scatter(obs["IPRED"], np.abs(obs["IWRES"]), s=12, alpha=0.6, color="C2")
    a.set_xlabel(f"IPRED{u}")
    a.set_ylabel("|IWRES| (-)")
    a.set_title("|IWRES| vs IPRED")
    a = ax[1, 2]
    a.hist(obs["CWRES"], bins=20, density=True, alpha=0.6, color="C1", label="CWRES")
    z = np.linspace(-4, 4, 200)
    a.plot(z, np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi), "k", lw=1, label="N(0,1)")
    a.set_xlabel("CWRES (-)")
    a.set_ylabel("density")
    a.set_title("CWRES distribution")
    a.legend()
    fig.suptitle(f"{fit.model.name}: {fit.method.upper()}, OFV {fit.ofv:.2f}")
    fig.tight_layout()
    return _save(fig, path)


def individual_fits(
    fit, path=None, *, max_subjects: int = 12, dv_unit: str = "", time_unit: str = "h"
):
    """Observed DV with IPRED and PRED lines, one panel per subject."""
    plt = _plt()
    pr = fit.predictions
    ids = list(dict.fromkeys(pr["ID"]))[:max_subjects]
    n = len(ids)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for a, i in zip(axes.flat, ids, strict=False):
        g = pr[pr["ID"] == i]
        o = g[g["MDV"] == 0]
        a.plot(o["TIME"], o["DV"], "o", ms=4, label="observed")
        a.plot(g["TIME"], g["IPRED"], "-", label="IPRED")
        a.plot(g["TIME"], g["PRED"], "--", label="PRED")
        a.set_title(f"ID {i}", fontsize=9)
        a.set_xlabel(f"time ({time_unit})")
        a.set_ylabel(f"DV{f' ({dv_unit})' if dv_unit else ''}")
    for a in list(axes.flat)[n:]:
        a.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def profiles_band(
    observed: pd.DataFrame,
    simulated: pd.DataFrame,
    path=None,
    *,
    bins=None,
    levels=(0.05, 0.5, 0.95),
    dv_unit: str = "",
    time_unit: str = "h",
    title: str = "",
    log: bool = False,
):
    """Observed profiles (lines) over the simulated median and 90% band, binned in time.

    Both tables are NONMEM layout; only EVID 0 / MDV 0 rows are used.
    """
    plt = _plt()

    def obs_rows(df):
        m = np.ones(len(df), bool)
        if "EVID" in df:
            m &= df["EVID"].to_numpy() == 0
        if "MDV" in df:
            m &= df["MDV"].to_numpy() == 0
        return df[m]

    o = obs_rows(observed)
    s = obs_rows(simulated)
    if bins is None:
        bins = np.unique(np.quantile(s["TIME"], np.linspace(0, 1, 13)))
    idx = np.clip(np.digitize(s["TIME"], bins[1:-1]), 0, len(bins) - 2)
    centers, q = [], []
    for b in range(len(bins) - 1):
        sel = s["DV"].to_numpy()[idx == b]
        if sel.size:
            centers.append(np.median(s["TIME"].to_numpy()[idx == b]))
            q.append(np.quantile(sel, levels))
    centers = np.asarray(centers)
    q = np.asarray(q)
    fig, a = plt.subplots(figsize=(7.5, 4.8))
    a.fill_between(
        centers,
        q[:, 0],
        q[:, -1],
        color="C0",
        alpha=0.25,
        label=f"simulated {round(100 * (levels[-1] - levels[0]))}% band",
    )
    a.plot(centers, q[:, len(levels) // 2], color="C0", lw=2, label="simulated median")
    for k, (_, g) in enumerate(o.groupby("ID")):
        a.plot(
            g["TIME"],
            g["DV"],
            "-o",
            color="k",
            ms=2.5,
            lw=0.7,
            alpha=0.6,
            label="observed" if k == 0 else None,
        )
    a.set_xlabel(f"time ({time_unit})")
    a.set_ylabel(f"concentration{f' ({dv_unit})' if dv_unit else ''}")
    if log:
        a.set_yscale("log")
    a.set_title(title or "observed profiles over simulated band")
    a.legend()
    fig.tight_layout()
    return _save(fig, path)


def joint_pairs(joint, path=None, *, n_samples: int = 3000, key=None, title: str = ""):
    """Pair plot of the random effects: EBEs (points) over samples of the joined prior
    (density shading) and of the independent prior (contour), one panel per pair."""
    import jax

    plt = _plt()
    key = jax.random.key(0) if key is None else key
    k1, k2 = jax.random.split(key)
    from ..join._joint import posterior_samples

    _, modes, _ = posterior_samples(joint.fits, 1, key=k1, target="modes")
    xs = np.asarray(joint.prior.sample(k1, (n_samples,)))
    xi = np.asarray(joint.independent.sample(k2, (n_samples,)))
    names = joint.eta_names
    d = len(names)
    fig, axes = plt.subplots(d, d, figsize=(2.6 * d + 1, 2.6 * d + 0.5), squeeze=False)
    for r in range(d):
        for c in range(d):
            a = axes[r, c]
            if r == c:
                a.hist(xs[:, r], bins=40, density=True, alpha=0.5, color="C1", label="joined prior")
                a.hist(modes[:, r], bins=20, density=True, alpha=0.5, color="C0", label="EBEs")
            elif r > c:
                a.hist2d(xs[:, c], xs[:, r], bins=40, cmap="Oranges")
                a.scatter(modes[:, c], modes[:, r], s=6, color="C0", label="EBEs")
            else:
                a.scatter(xi[:600, c], xi[:600, r], s=3, color="grey", alpha=0.4,
                          label="independent prior")  # fmt: skip
                a.scatter(modes[:, c], modes[:, r], s=6, color="C0", label="EBEs")
            if r == d - 1:
                a.set_xlabel(names[c])
            if c == 0:
                a.set_ylabel(names[r])
    axes[0, 0].legend(fontsize=7)
    if d > 1:
        axes[0, 1].legend(fontsize=7)
        axes[1, 0].set_title("joined prior (shading) + EBEs", fontsize=8)
    fig.suptitle(title or f"{joint.kind} joint prior over {d} random effects")
    fig.tight_layout()
    return _save(fig, path)
