"""Forecast bands: a predictive mean/median with a central interval over time."""

from __future__ import annotations

import numpy as np

from ._plots import _plt, _save


def forecast_band(times, mean, lo, hi, observed=None, *, future=None, path=None,
                  level: float = 0.9, label: str = "forecast", dv_unit: str = "",
                  time_unit: str = "h", ylabel: str = "concentration", title: str = "", ax=None,
                  log: bool = False):  # fmt: skip
    """Plot a forecast: `mean` (line) and the central `level` interval `[lo, hi]` (band) at
    `times`; `observed` = (times, values) conditioned on (black points) and `future` =
    (times, values) held out (open circles). Returns the Figure (of `ax` when given)."""
    t = np.asarray(times, float)
    m, lo, hi = (np.asarray(v, float) for v in (mean, lo, hi))
    if not (t.shape == m.shape == lo.shape == hi.shape) or t.ndim != 1:
        raise ValueError(
            f"times, mean, lo, hi must be 1-D of the same length, got shapes "
            f"{t.shape}, {m.shape}, {lo.shape}, {hi.shape}"
        )
    if np.any(lo > hi):
        raise ValueError("forecast_band: some lo values exceed hi")
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4.2))
    else:
        fig = ax.figure
    ax.fill_between(t, lo, hi, color="C0", alpha=0.25, label=f"{label} {100 * level:.0f}% interval")
    ax.plot(t, m, color="C0", lw=2, label=label)
    if observed is not None:
        ot, oy = (np.asarray(v, float) for v in observed)
        ax.plot(ot, oy, "o", color="k", ms=5, label="observed (conditioned on)")
        if ot.size:
            ax.axvline(ot.max(), color="0.6", ls=":", lw=1, label="forecast origin")
    if future is not None:
        ft, fy = (np.asarray(v, float) for v in future)
        ax.plot(ft, fy, "o", mfc="none", color="C3", ms=6, label="held out (not seen)")
    ax.set_xlabel(f"time ({time_unit})")
    ax.set_ylabel(f"{ylabel}{f' ({dv_unit})' if dv_unit else ''}")
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
