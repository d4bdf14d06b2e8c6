"""Zero-shot forecasting and virtual individuals from a pre-trained in-context model.

`forecast(context, target_early, times)`: the study's other individuals (`context`), and one
new individual's dosing and first samples (`target_early`), in one forward pass give the
predictive distribution of that individual's concentrations at `times`:

    z_s ~ q(z_s | context),  z_i ~ q(z_i | early samples of i, z_s),
    log(y / C_s) ~ N(mu(t; z_i, z_s, doses), sigma^2(t; ...))   (Monte Carlo over z and y)

The point forecast is exp(E[mu]) C_s (the predictive geometric mean); intervals are quantiles of
the sampled log y. `generate(context, dosing, n)` draws z_i from p(z_i | z_s) (no samples of
the new individuals) and returns virtual profiles.

The shipped checkpoints (`popkin/amortized/checkpoints/<name>/`) were trained by
`popkin pretrain` on the synthetic prior; `load_model(name_or_path)` reads one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from popkin.amortized._model import InContextPK
from popkin.amortized._prior import Studies
from popkin.amortized._tokens import Scales, from_population, normalise, study_scales
from popkin.amortized._train import _ind, load_checkpoint

F32 = jnp.float32
CHECKPOINTS = Path(__file__).parent / "checkpoints"
DECODERS = ("attention", "physics")


@functools.lru_cache(maxsize=8)
def load_model(name: str = "small") -> InContextPK:
    """A shipped checkpoint by name (e.g. "small") or a checkpoint folder path."""
    path = Path(name)
    if not path.exists():
        path = CHECKPOINTS / name
        if not path.exists():
            shipped = sorted(p.name for p in CHECKPOINTS.iterdir() if p.is_dir())
            raise FileNotFoundError(f"no checkpoint {name!r}: shipped ones are {shipped}")
    model, _, _, _, _ = load_checkpoint(path, with_optimizer=True)
    return model


def _draws(model, study: Studies, target, obs_mask_target, query_t, key, n_samples, decoder,
           use_obs: bool = True, prior_from=None):  # fmt: skip
    """Samples of (mu, log y) at query_t for the target of one normalised (unbatched) study."""
    n = study.ind_mask.shape[0]
    idx = jnp.arange(n)
    inds = jax.vmap(lambda j: _ind(study, j))(idx)
    h = jax.vmap(model.encode_individual)(inds)
    context = study.ind_mask & (idx != target)
    mu_s, ls_s = model.study_posterior(h, context)
    tgt = _ind(study, target)
    tgt = dict(tgt, obs_mask=obs_mask_target if use_obs else jnp.zeros_like(obs_mask_target))
    if prior_from is None:
        h_e = model.encode_individual(tgt)
    else:  # p(z_i | z_s) under the design of context individual `prior_from` (no samples)
        ref = _ind(study, prior_from)
        h_e = model.encode_individual(dict(ref, obs_mask=jnp.zeros_like(ref["obs_mask"])))

    def draw(k):
        k1, k2, k3 = jax.random.split(k, 3)
        z_s = mu_s + jnp.exp(ls_s) * jax.random.normal(k1, mu_s.shape, F32)
        mu_i, ls_i = model.individual_posterior(h_e, z_s)
        z_i = mu_i + jnp.exp(ls_i) * jax.random.normal(k2, mu_i.shape, F32)
        z = jnp.concatenate([z_i, z_s])
        if decoder == "physics":
            m, lv = model.decode_physics(z, z_s, tgt, query_t)
        else:
            m, lv = model.decode_attention(z, tgt, query_t)
        y = m + jnp.exp(0.5 * lv) * jax.random.normal(k3, m.shape, F32)
        return m, y

    return jax.vmap(draw)(jax.random.split(key, n_samples))


@eqx.filter_jit
def predict_normalised(model, study: Studies, target, obs_mask_target, query_t, key,
                       n_samples: int = 200, decoder: str = "attention"):  # fmt: skip
    """(E[mu], quantiles 5/25/75/95 % of log y) at normalised query times; unbatched study.

    `target` must be an array (a Python int would be a static argument: one compile each)."""
    if isinstance(model, InContextPK):
        m, y = _draws(model, study, target, obs_mask_target, query_t, key, n_samples, decoder)
    else:  # other kinds (generator, baselines) draw predictive samples of log y themselves
        y = model.predictive_samples(study, target, obs_mask_target, query_t, key, n_samples)
        m = y
    q = jnp.quantile(y, jnp.array([0.05, 0.25, 0.75, 0.95], F32), axis=0)
    return jnp.mean(m, axis=0), q


def _population(table_or_pop):
    from popkin.data import Population, read_nonmem

    if isinstance(table_or_pop, Population):
        return table_or_pop
    if isinstance(table_or_pop, (str, Path)):
        return read_nonmem(table_or_pop)
    return read_nonmem(pd.DataFrame(table_or_pop))


def _combine(context, target) -> tuple[Studies, int]:
    """One study holding the context individuals and the target (last), with its index."""
    ctx = _population(context).table.copy()
    tgt = _population(target).table.copy()
    ids = pd.unique(ctx["ID"])
    new_id = (max(int(i) for i in ids) + 1) if all(np.issubdtype(type(i), np.integer) or
                                                   isinstance(i, int) for i in ids) else "target"  # fmt: skip
    tgt["ID"] = new_id
    cols = [c for c in ctx.columns if c in tgt.columns]
    table = pd.concat([ctx[cols], tgt[cols]], ignore_index=True)
    pop = _population(table)
    target_index = list(pop.ids).index(new_id)
    return from_population(pop), target_index


def _prepare(context, target, times, model, decoder):
    """(model, normalised study, target index, normalised times, concentration scale C_s)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    net = load_model(model) if isinstance(model, str) else model
    studies, index = _combine(context, target)
    context_mask = studies.ind_mask & (jnp.arange(studies.ind_mask.shape[1]) != index)[None]
    scales = study_scales(studies, context_mask)
    norm = normalise(studies, scales).take(0)
    t = jnp.asarray(np.asarray(times, np.float32)) / scales.time[0]
    return net, norm, index, t, float(scales.conc[0])


def forecast(context, target_early, times, *, model: str | InContextPK = "small",
             decoder: str = "attention", n_samples: int = 200, seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """Zero-shot forecast of one new individual of a study.

    - `context`: the study's other individuals (NONMEM table, CSV path or `Population`).
    - `target_early`: the new individual's dose rows and its observed early samples.
    - `times`: forecast times (table time unit, usually h).
    Returns a DataFrame: TIME, PRED (predictive geometric mean), and 50 % / 90 % interval
    bounds LO50, HI50, LO90, HI90, in the table's concentration unit.
    """
    net, norm, target, t, c = _prepare(context, target_early, times, model, decoder)
    mean, q = predict_normalised(net, norm, jnp.int32(target), norm.obs_mask[target], t,
                                 jax.random.PRNGKey(seed), n_samples, decoder)  # fmt: skip
    return pd.DataFrame(
        {
            "TIME": np.asarray(times, float),
            "PRED": c * np.exp(np.asarray(mean, float)),
            "LO90": c * np.exp(np.asarray(q[0], float)),
            "LO50": c * np.exp(np.asarray(q[1], float)),
            "HI50": c * np.exp(np.asarray(q[2], float)),
            "HI90": c * np.exp(np.asarray(q[3], float)),
        }
    )


def generate(context, dosing, n: int, times, *, model: str | InContextPK = "small",
             decoder: str = "attention", seed: int = 0) -> pd.DataFrame:  # fmt: skip
    """`n` virtual individuals of the context's study under `dosing` (dose rows of one subject).

    Each virtual individual draws z_s ~ q(z_s | context), z_i ~ p(z_i | z_s) and a residual
    error. p(z_i | z_s) is read under the study's own design (a context individual's dosing
    with no samples), so a regimen the context never saw changes the doses, not who the
    individuals are (linear PK); the new regimen enters through the decoder. Returns a long
    DataFrame (ID, TIME, DV, PRED): PRED the noise-free prediction exp(mu) C_s, DV sampled.
    """
    net, norm, target, t, c = _prepare(context, dosing, times, model, decoder)
    m, y = _generate(net, norm, jnp.int32(target), t, jax.random.PRNGKey(seed), n, decoder)
    times = np.asarray(times, float)
    return pd.DataFrame(
        {
            "ID": np.repeat(np.arange(1, n + 1), len(times)),
            "TIME": np.tile(times, n),
            "DV": c * np.exp(np.minimum(np.asarray(y, float), 50.0)).ravel(),
            "PRED": c * np.exp(np.asarray(m, float)).ravel(),
        }
    )


@eqx.filter_jit
def _generate(model, study, target, t, key, n: int, decoder: str):
    mask = study.obs_mask[target]
    if not isinstance(model, InContextPK):  # (noise-free log C, log y) of virtual individuals
        return model.generate_samples(study, target, t, key, n)
    ref = jnp.argmax(study.ind_mask & (jnp.arange(study.ind_mask.shape[0]) != target))
    return _draws(model, study, target, mask, t, key, n, decoder, use_obs=False, prior_from=ref)


__all__ = ["forecast", "generate", "load_model", "predict_normalised", "Scales"]
