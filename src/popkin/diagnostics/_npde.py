r"""Normalised prediction distribution errors (Brendel et al. 2006; Comets et al. 2008).

For subject $i$ with observations $y_i$ and $K$ simulated replicates $y_i^{(k)}$ of its design at
the estimates: $E_i$ and $V_i$ are the simulated mean and covariance; with $V_i = L_i L_i^T$,
$y^*_i = L_i^{-1}(y_i - E_i)$ and $y^{*(k)}_i = L_i^{-1}(y^{(k)}_i - E_i)$ (decorrelation);
$pde_{ij} = \frac1K \sum_k 1[y^{*(k)}_{ij} < y^*_{ij}]$, clipped to $[1/(2K), 1 - 1/(2K)]$;
$npde_{ij} = \Phi^{-1}(pde_{ij})$. Under the model, npde ~ N(0, 1) independently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._plots import _plt, _save
from ._sim import observed_mask, replicates, resolve_key


def npde_table(fit, n: int = 1000, *, key=None, seed: int = 0, _sim=None) -> pd.DataFrame:
    """Per observation: ID, TIME, DVID, DV, PRED, EPRED (simulated mean), PDE, NPDE.

    `df.attrs["tests"]` holds the global tests: mean (t-test), variance (chi-square, = 1) and
    normality (Shapiro-Wilk) with their p-values.
    """
    from scipy import stats

    if _sim is None:
        t = fit.population.table
        most = int(t[observed_mask(t)].groupby("ID").size().max())
        if n <= most:
            raise ValueError(
                f"NPDE needs more simulated replicates (n={n}) than observations of one subject "
                f"({most}); use n >= {10 * most}"
            )
    table, ysim = _sim if _sim is not None else replicates(fit, n, resolve_key(key, seed))
    K = ysim.shape[0]
    ids = table["ID"].to_numpy()
    y = table["DV"].to_numpy(float)
    epred = ysim.mean(axis=0)
    pde = np.empty(len(table))
    for i in pd.unique(ids):
        m = ids == i
        ni = int(m.sum())
        if K <= ni:
            raise ValueError(
                f"NPDE needs more simulated replicates (n={K}) than observations of one subject "
                f"(ID {i} has {ni}); use n >= {10 * ni}"
            )
        ys = ysim[:, m] - epred[m]
        V = ys.T @ ys / (K - 1)
        try:
            L = np.linalg.cholesky(V)
        except np.linalg.LinAlgError:
            raise FloatingPointError(
                f"NPDE: the simulated covariance of ID {i}'s observations is singular "
                "(identical simulated values?); check the error model"
            ) from None
        zo = np.linalg.solve(L, y[m] - epred[m])
        zs = np.linalg.solve(L, ys.T).T
        pde[m] = (zs < zo).mean(axis=0)
    pde = np.clip(pde, 1 / (2 * K), 1 - 1 / (2 * K))
    out = table[["ID", "TIME", "DVID", "DV", "PRED"]].copy()
    out["EPRED"] = epred
    out["PDE"] = pde
    out["NPDE"] = stats.norm.ppf(pde)
    z = out["NPDE"].to_numpy()
    nz = z.size
    var = z.var(ddof=1) if nz > 1 else np.nan
    chi = (nz - 1) * var
    out.attrs["tests"] = {
        "n": int(nz),
        "mean": float(z.mean()),
        "mean_p": float(stats.ttest_1samp(z, 0.0).pvalue) if nz > 1 else np.nan,
        "variance": float(var),
        "variance_p": float(2 * min(stats.chi2.cdf(chi, nz - 1), stats.chi2.sf(chi, nz - 1))),
        "shapiro_p": float(stats.shapiro(z).pvalue) if 3 <= nz <= 5000 else np.nan,
    }
    return out


def npde_plot(table: pd.DataFrame, path=None, *, dv_unit: str = "", time_unit: str = "h",
              title: str = ""):  # fmt: skip
    """Three panels: NPDE quantiles vs N(0, 1) quantiles, NPDE vs time, NPDE vs PRED."""
    from scipy import stats

    plt = _plt()
    z = table["NPDE"].to_numpy()
    fig, ax = plt.subplots(1, 3, figsize=(14, 4.4))
    a = ax[0]
    qs = np.sort(z)
    th = stats.norm.ppf((np.arange(1, z.size + 1) - 0.5) / z.size)
    a.plot(th, qs, "o", ms=3, color="C0", alpha=0.7, label="NPDE")
    lim = [min(th.min(), qs.min()) - 0.2, max(th.max(), qs.max()) + 0.2]
    a.plot(lim, lim, "k--", lw=1, label="identity (N(0,1))")
    a.set_xlabel("N(0, 1) quantile (-)")
    a.set_ylabel("NPDE quantile (-)")
    a.set_title("QQ plot vs N(0, 1)")
    a.legend(fontsize=8, loc="upper left")
    u = f" ({dv_unit})" if dv_unit else ""
    for a, col, xl in [(ax[1], "TIME", f"time ({time_unit})"), (ax[2], "PRED", f"PRED{u}")]:
        for k, (dv, g) in enumerate(table.groupby("DVID")):
            lab = f"NPDE, DVID {dv}" if table["DVID"].nunique() > 1 else "NPDE"
            a.scatter(g[col], g["NPDE"], s=10, alpha=0.6, color=f"C{k}", label=lab)
        a.axhline(0, color="k", lw=1)
        for h in (-1.96, 1.96):
            a.axhline(h, color="grey", ls=":", lw=1, label="±1.96" if h > 0 else None)
        a.set_xlabel(xl)
        a.set_ylabel("NPDE (-)")
        a.set_title(f"NPDE vs {col}")
    t = table.attrs.get("tests")
    sub = ""
    if t:
        sub = (f"mean {t['mean']:.3f} (p={t['mean_p']:.2g}), variance {t['variance']:.3f} "
               f"(p={t['variance_p']:.2g}), Shapiro-Wilk p={t['shapiro_p']:.2g}")  # fmt: skip
    fig.suptitle((title or "NPDE") + (f"\n{sub}" if sub else ""), fontsize=11)
    handles, labels = ax[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.67, 0.0),
               ncol=len(labels), fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(fig, path)


def npde(fit, n: int = 1000, path=None, *, key=None, seed: int = 0, dv_unit: str = "",
         time_unit: str = "h"):  # fmt: skip
    """NPDE of a fit from `n` replicates simulated at its estimates (`popkin.simulate`).

    Returns `(table, figure)`: the `npde_table` DataFrame and the `npde_plot` Figure.
    """
    table = npde_table(fit, n, key=key, seed=seed)
    fig = npde_plot(table, path, dv_unit=dv_unit, time_unit=time_unit,
                    title=f"{fit.model.name}: NPDE from {n} simulated replicates")  # fmt: skip
    return table, fig
