"""Shared helpers: replicate simulation of a fit's design, endpoint labels."""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd


def resolve_key(key, seed: int):
    """An explicit `jax.random` key, or one made from `seed`."""
    return jax.random.key(seed) if key is None else key


def observed_mask(table: pd.DataFrame) -> np.ndarray:
    """Rows that enter the likelihood as uncensored observations (EVID 0, MDV 0, CENS 0)."""
    m = np.ones(len(table), bool)
    for col in ("EVID", "MDV", "CENS"):
        if col in table:
            m &= table[col].to_numpy() == 0
    return m


def replicates(fit, n: int, key) -> tuple[pd.DataFrame, np.ndarray]:
    """`n` replicates of the fit's own design simulated at its estimates (`popkin.simulate`).

    Returns the observed rows (ID, TIME, DVID, DV, PRED with PRED the eta = 0 prediction) and
    the simulated DV at those rows, shape `(n, n_obs)`.
    """
    from ..simulate import simulate

    if n < 2:
        raise ValueError(f"need at least 2 simulated replicates, got n={n}")
    base = fit.population.table
    obs = observed_mask(base)
    if not obs.any():
        raise ValueError("the fit's data has no uncensored observations (EVID 0, MDV 0)")
    sim = simulate(fit.model, fit.population, fit.params, key=key, n_replicates=n, prior=fit.prior)
    T = len(base)
    ysim = sim["DV"].to_numpy(float).reshape(n, T)[:, obs]
    pred = sim["PRED"].to_numpy(float).reshape(n, T)[0, obs]
    cols = ["ID", "TIME", "DV"] + (["DVID"] if "DVID" in base else [])
    table = base.loc[obs, cols].reset_index(drop=True)
    if "DVID" not in table:
        table["DVID"] = 1
    table["PRED"] = pred
    if not (np.all(np.isfinite(ysim)) and np.all(np.isfinite(pred))):
        raise FloatingPointError(
            "simulation at the fit's estimates produced non-finite values; check the model"
        )
    return table, ysim


def endpoint_label(fit, dvid) -> str:
    """`DVID k (name)` using the model's endpoint names where they line up with the data."""
    try:
        names = fit.model.endpoints(fit.population.covariates)
        k = list(fit.population.endpoints).index(dvid)
        return f"DVID {dvid} ({names[k]})"
    except Exception:  # noqa: BLE001 - a label only
        return f"DVID {dvid}"
