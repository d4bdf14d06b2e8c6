r"""Prediction-corrected visual predictive check (Bergstrand et al. 2011).

Observations and simulations are binned in time per endpoint; within bin $b$ each value is
corrected to the bin's median population prediction,
$pcY_{ij} = Y_{ij}\,\mathrm{median}_b(PRED) / PRED_{ij}$ (lower bound 0; records with PRED = 0,
e.g. pre-dose samples, are left as they are and the median is over PRED > 0), or additively
$Y_{ij} + \mathrm{median}_b(PRED) - PRED_{ij}$ when some PRED < 0 (e.g. change from baseline).
The observed percentiles of pcY are compared with the distribution over simulated replicates
of the same percentiles (median and central `ci` interval).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ._plots import _plt, _save
from ._sim import endpoint_label, replicates, resolve_key


def _bin_edges(t: np.ndarray, bins) -> np.ndarray:
    if bins is None:
        k = int(min(8, max(1, np.unique(t).size)))
        edges = np.unique(np.quantile(t, np.linspace(0, 1, k + 1)))
    elif np.isscalar(bins):
        edges = np.unique(np.quantile(t, np.linspace(0, 1, int(bins) + 1)))
    else:
        edges = np.asarray(bins, float)
    if edges.size < 2:
        edges = np.array([t.min(), t.max() + 1e-9])
    return edges


def _assign(t: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time: [e0, e1], (e1, e2], ... (the first bin closed)."""
    return np.clip(np.searchsorted(edges, t, side="left") - 1, 0, edges.size - 2)


def pcvpc_table(
    fit,
    n: int = 200,
    *,
    key=None,
    seed: int = 0,
    bins=None,
    levels=(0.05, 0.5, 0.95),
    ci: float = 0.95,
    stratify: bool = True,
    pred_correct: bool = True,
    _sim=None,
) -> pd.DataFrame:
    """The numbers behind `pcvpc`: one row per (endpoint, time bin, percentile level).

    Columns: DVID, bin, t_lo, t_hi, t_mid (median observed time), n_obs, level, observed,
    sim_median, sim_lo, sim_hi (the `ci` interval over `n` replicates), correction.
    `bins`: None (up to 8 quantile bins), a number of quantile bins, or explicit edges.
    """
    table, ysim = _sim if _sim is not None else replicates(fit, n, resolve_key(key, seed))
    levels = np.asarray(levels, float)
    a = (1 - ci) / 2
    strata = sorted(table["DVID"].unique()) if stratify else [None]
    rows = []
    for s in strata:
        m = np.ones(len(table), bool) if s is None else (table["DVID"] == s).to_numpy()
        t = table["TIME"].to_numpy(float)[m]
        y = table["DV"].to_numpy(float)[m]
        pred = table["PRED"].to_numpy(float)[m]
        ys = ysim[:, m]
        edges = _bin_edges(t, bins)
        b = _assign(t, edges)
        kind = "none"
        if pred_correct:
            kind = "proportional" if np.all(pred >= 0) else "additive"
        for k in range(edges.size - 1):
            sel = b == k
            if not sel.any():
                continue
            f, d = _correction(pred[sel], kind)
            yo, yk = y[sel] * f + d, ys[:, sel] * f + d
            q_obs = np.quantile(yo, levels)
            q_sim = np.quantile(yk, levels, axis=1)  # (levels, n)
            for j, lv in enumerate(levels):
                rows.append(
                    {
                        "DVID": s if s is not None else "all",
                        "bin": k,
                        "t_lo": edges[k],
                        "t_hi": edges[k + 1],
                        "t_mid": float(np.median(t[sel])),
                        "n_obs": int(sel.sum()),
                        "level": lv,
                        "observed": q_obs[j],
                        "sim_median": np.median(q_sim[j]),
                        "sim_lo": np.quantile(q_sim[j], a),
                        "sim_hi": np.quantile(q_sim[j], 1 - a),
                        "correction": kind,
                    }
                )
    return pd.DataFrame(rows)


def pcvpc(
    fit,
    n: int = 200,
    path=None,
    *,
    key=None,
    seed: int = 0,
    bins=None,
    levels=(0.05, 0.5, 0.95),
    ci: float = 0.95,
    stratify: bool = True,
    pred_correct: bool = True,
    dv_unit: str = "",
    time_unit: str = "h",
    log: bool = False,
):
    """Prediction-corrected VPC: observed 5/50/95th percentiles (lines) over the simulated
    percentiles' `ci` intervals (shaded), one panel per endpoint (DVID). `n` replicates of the
    fit's design are simulated at its estimates with `popkin.simulate`. Returns the Figure."""
    plt = _plt()
    sim = replicates(fit, n, resolve_key(key, seed))
    tab = pcvpc_table(fit, n, bins=bins, levels=levels, ci=ci, stratify=stratify,
                      pred_correct=pred_correct, _sim=sim)  # fmt: skip
    obs_table, _ = sim
    strata = list(dict.fromkeys(tab["DVID"]))
    fig, axes = plt.subplots(1, len(strata), figsize=(6.4 * len(strata), 5.4), squeeze=False)
    u = f" ({dv_unit})" if dv_unit else ""
    levels = sorted(set(tab["level"]))
    mid = min(levels, key=lambda v: abs(v - 0.5))
    outer = " / ".join(f"{100 * v:g}th" for v in levels if v != mid) + " percentiles"
    names = {v: (_pct(v) if v == mid else outer) for v in levels}
    for a, s in zip(axes.flat, strata, strict=True):
        g = tab[tab["DVID"] == s]
        o = obs_table if s == "all" else obs_table[obs_table["DVID"] == s]
        pc = _pc_points(o, g)
        a.plot(o["TIME"], pc, "o", ms=2.5, color="0.55", alpha=0.6, label="observations (pc)")
        for lv in levels:
            h = g[g["level"] == lv].sort_values("t_mid")
            color = "C3" if lv == mid else "C0"
            a.fill_between(h["t_mid"], h["sim_lo"], h["sim_hi"], color=color, alpha=0.22,
                           label=f"simulated {100 * ci:.0f}% CI of {names[lv]}"
                           if lv in (mid, levels[0]) else None)  # fmt: skip
            a.plot(h["t_mid"], h["observed"], "-" if lv == mid else "--", color=color, lw=1.8,
                   label=f"observed {names[lv]}" if lv in (mid, levels[0]) else None)  # fmt: skip
        for e in np.unique(np.concatenate([g["t_lo"], g["t_hi"]])):
            a.axvline(e, color="0.85", lw=0.6, zorder=0)
        a.set_xlabel(f"time ({time_unit})")
        kind = g["correction"].iloc[0]
        ylab = "prediction-corrected DV" if kind != "none" else "DV"
        a.set_ylabel(f"{ylab}{u}")
        if log:
            a.set_yscale("log")
        title = "all endpoints" if s == "all" else endpoint_label(fit, s)
        a.set_title(f"{title}: n = {n} replicates", fontsize=10)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2 if len(strata) == 1 else 3,
               fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(f"{fit.model.name}: prediction-corrected VPC")
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    return _save(fig, path)


def _pct(level: float) -> str:
    p = 100 * level
    return f"{p:.0f}th percentile" if float(p).is_integer() else f"{p:g}th percentile"


def _pc_points(o: pd.DataFrame, g: pd.DataFrame) -> np.ndarray:
    """Prediction-corrected observations, bins and correction as in the table `g`."""
    t = o["TIME"].to_numpy(float)
    y = o["DV"].to_numpy(float)
    pred = o["PRED"].to_numpy(float)
    kind = g["correction"].iloc[0]
    if kind == "none":
        return y
    edges = np.unique(np.concatenate([g["t_lo"], g["t_hi"]]))
    b = _assign(t, edges)
    out = y.copy()
    for k in np.unique(b):
        sel = b == k
        f, d = _correction(pred[sel], kind)
        out[sel] = y[sel] * f + d
    return out


def _correction(pred: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per record (factor, shift) so that pcY = Y * factor + shift within one bin."""
    one, zero = np.ones_like(pred), np.zeros_like(pred)
    if kind == "proportional":
        pos = pred > 0
        if not pos.any():
            return one, zero
        pb = np.median(pred[pos])
        return np.where(pos, pb / np.where(pos, pred, 1.0), 1.0), zero
    if kind == "additive":
        return one, np.median(pred) - pred
    return one, zero
