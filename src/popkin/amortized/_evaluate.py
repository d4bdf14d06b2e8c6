"""The real-data forecasting protocol (../shared/DESIGN.md) for the in-context model.

For each individual i of a study with at least four samples at t > 0 and one more positive,
uncensored sample after them: the context is every other individual (all their data); the
target sees its dosing and its first four samples at t > 0; its later positive samples are
forecast. Per individual: RMSE between log(point forecast) and log(observed) over those samples,
and whether each observation lies in the central 50 % / 90 % predictive intervals.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from popkin.amortized._forecast import load_model, predict_normalised
from popkin.amortized._prior import Studies
from popkin.amortized._tokens import from_population, normalise, study_scales
from popkin.amortized._train import early_mask

N_EARLY = 4


def loo_targets(study: Studies, s: int = 0, n_early: int = N_EARLY):
    """[(i, early mask, later mask)] of the individuals of study s that the protocol scores."""
    out = []
    for i in range(study.ind_mask.shape[1]):
        if not bool(study.ind_mask[s, i]):
            continue
        om, ot = study.obs_mask[s, i], study.obs_t[s, i]
        early = early_mask(ot, om, n_early)
        if int(early.sum()) < n_early:
            continue
        t_last = float(jnp.max(jnp.where(early, ot, -jnp.inf)))
        later = om & ~early & (ot > t_last) & ~study.obs_cens[s, i] & (study.obs_y[s, i] > 0)
        if int(later.sum()) == 0:
            continue
        out.append((i, early, later))
    return out


def evaluate_study(study: Studies, model="small", decoder: str = "attention", s: int = 0,
                   n_samples: int = 200, seed: int = 0) -> dict:  # fmt: skip
    """Leave-one-out forecasts of study s: per-individual log-RMSE, coverage, seconds."""
    net = load_model(model) if isinstance(model, str) else model
    n = study.ind_mask.shape[1]
    rmse, c50, c90, secs, preds = [], [], [], [], []
    for i, early, later in loo_targets(study, s):
        context = study.ind_mask[s : s + 1] & (jnp.arange(n) != i)[None]
        one = study.take(slice(s, s + 1))
        scales = study_scales(one, context)
        norm = normalise(one, scales).take(0)
        t0 = time.perf_counter()
        mean, q = predict_normalised(net, norm, jnp.int32(i), early, norm.obs_t[i],
                                     jax.random.PRNGKey(seed + i), n_samples, decoder)  # fmt: skip
        mean = np.asarray(jax.block_until_ready(mean))
        secs.append(time.perf_counter() - t0)
        q = np.asarray(q)
        keep = np.asarray(later)
        ly = np.log(np.maximum(np.asarray(norm.obs_y[i]), 1e-30))[keep]  # keep: y > 0
        rmse.append(float(np.sqrt(np.mean((mean[keep] - ly) ** 2))))
        c50.append(np.mean((ly >= q[1][keep]) & (ly <= q[2][keep])))
        c90.append(np.mean((ly >= q[0][keep]) & (ly <= q[3][keep])))
        c = float(scales.conc[0])
        preds.append(dict(index=i, time=np.asarray(study.obs_t[s, i]), obs=np.asarray(study.obs_y[s, i]),
                          obs_mask=np.asarray(study.obs_mask[s, i]), early=np.asarray(early), later=keep,
                          pred=c * np.exp(mean), lo90=c * np.exp(q[0]), hi90=c * np.exp(q[3])))  # fmt: skip
    return dict(
        log_rmse=np.array(rmse),
        coverage50=float(np.mean(c50)) if c50 else float("nan"),
        coverage90=float(np.mean(c90)) if c90 else float("nan"),
        seconds=np.array(secs),
        forecasts=preds,
    )


def evaluate_population(pop, model="small", decoder: str = "attention", **kw) -> dict:
    """`evaluate_study` on a validated `Population` taken as one study."""
    return evaluate_study(from_population(pop), model, decoder, **kw)
