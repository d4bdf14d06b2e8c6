"""Simulation from a model over a population or design, in NONMEM layout."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .data._population import Population
from .models._model import Model, Predictor, endpoint_map
from .params import ModelParams, default_params
from .priors import Gaussian


def _one_replicate(pred: Predictor, params: ModelParams, prior, subjects, n_eta: int, key):
    """One replicate: etas from `prior`, residuals from the error models (all subjects)."""
    n = subjects.records.time.shape[0]
    k_eta, k_eps = jax.random.split(key)
    eta = prior.sample(k_eta, (n,)) if n_eta else jnp.zeros((n, 0))

    def subj(e, s, kk):
        # IPRED (at eta) with the log-transform flags from the same call; PRED (at eta = 0) as
        # a second call: batching the two into one call halves an ODE model's compile time but
        # doubled its run time (10k subjects of benchmarks/simulate.py's turnover model).
        loc, scale, _, ipred, logf = pred.distributions(params.theta, params.sigma, e, s, True)
        p0 = pred.distributions(params.theta, params.sigma, jnp.zeros_like(e), s)[3]
        z = loc + scale * jax.random.normal(kk, loc.shape)
        return jnp.where(logf, jnp.exp(z), z), p0, ipred

    y, p0, ipred = jax.vmap(subj)(eta, subjects, jax.random.split(k_eps, n))
    return eta, y, p0, ipred


@eqx.filter_jit
def _simulate_reps(pred, params, prior, subjects, n_eta: int, keys):
    """All replicates at once: `_one_replicate` vmapped over `keys`."""
    return jax.vmap(lambda k: _one_replicate(pred, params, prior, subjects, n_eta, k))(keys)


def predictor_for(model: Model, population: Population) -> Predictor:
    """The per-subject evaluator of `model` on `population`'s covariates and endpoints."""
    emap = endpoint_map(model, population.endpoints, population.covariates)
    return Predictor(model, population.covariates, emap)


def simulate(
    model: Model,
    population: Population,
    params: ModelParams | None = None,
    *,
    key: jax.Array,
    n_replicates: int = 1,
    prior=None,
) -> pd.DataFrame:
    """Simulate observations for every EVID 0 record of `population` (NONMEM layout).

    Random effects are drawn from `prior` (default: the model's prior, else `N(0, Omega)`),
    residuals from each endpoint's error model. Returns the population's table with DV replaced
    and `PRED` (eta = 0), `IPRED` and `ETA_<name>` columns added; with `n_replicates > 1` the
    table is repeated with new integer IDs and a `REP` column (1-based). The result reads back
    with `popkin.read_nonmem`.
    """
    params = default_params(model) if params is None else params
    prior = prior or model.prior or Gaussian(params.omega)
    pred = predictor_for(model, population)
    subjects = population.subjects
    n = population.n_subjects
    n_eta = len(model.eta_names)

    keys = jax.random.split(key, n_replicates)
    eta, y, p0, ipred = (
        np.asarray(a) for a in _simulate_reps(pred, params, prior, subjects, n_eta, keys)
    )  # (n_rep, S, ...) each
    base = population.table
    rows = np.asarray(subjects.records.row)
    mask = np.asarray(subjects.records.rec)
    sel = rows[mask]  # table rows of the records, in (subject, record) order
    evid = base["EVID"].to_numpy()
    is_obs = evid[sel] == 0
    dv0 = base["DV"].to_numpy(dtype=float, na_value=np.nan)
    T = len(base)
    dv = np.tile(dv0, (n_replicates, 1))
    dv[:, sel[is_obs]] = y[:, mask][:, is_obs]
    pcol = np.full((n_replicates, T), np.nan)
    icol = np.full((n_replicates, T), np.nan)
    pcol[:, sel] = p0[:, mask]
    icol[:, sel] = ipred[:, mask]
    id_pos = base["ID"].map({v: i for i, v in enumerate(population.ids)}).to_numpy()
    out = pd.DataFrame(np.tile(base.to_numpy(), (n_replicates, 1)), columns=base.columns)
    out = out.astype(base.dtypes.to_dict())
    out["DV"] = dv.reshape(-1)
    out["PRED"] = pcol.reshape(-1)
    out["IPRED"] = icol.reshape(-1)
    for j, name in enumerate(model.eta_names):
        out[f"ETA_{name}"] = eta[:, id_pos, j].reshape(-1)
    if n_replicates > 1:
        rep = np.repeat(np.arange(n_replicates), T)
        out["REP"] = rep + 1
        out["ID"] = np.tile(id_pos, n_replicates) + 1 + rep * n
    return out
