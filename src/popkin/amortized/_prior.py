"""The synthetic PK prior: studies of a compound, individuals with OU-varying log-parameters.

One draw is a *study*: 5-15 individuals given the same compound under one design. Generative
story (all ranges in `PriorConfig`, units h, L, mg, mg/L):

1. Compound: 1, 2 or 3 compartments; route oral / IV bolus / IV infusion; typical
   log ka ~ U[-1, 2] (1/h), log ke = log CL/V1 ~ U[-6, 0] (1/h), log V1 ~ U[1, 7] (L),
   log k12, k21, k13, k31 ~ U[-4, 0] (1/h); an absorption lag on some oral compounds.
   The published prior (seeds 001/002) uses log ke in [-5, 0]; the lower end is widened to -6
   to cover neonatal phenobarbital (t1/2 ~ 100 h); `benchmarks/realdata.py` reports where the
   NLME estimates of the four bundled data sets fall in these ranges.
2. Between-subject variability: log theta_i = log theta_typ + eta_i, SD 0.15-0.6 per parameter,
   correlation between CL and V1 drawn in [-0.2, 0.6].
3. Within-subject dynamics: each individual's log ka, CL, V1 follow an Ornstein-Uhlenbeck
   process around log theta_i, d o = -o/tau dt + sqrt(2/tau) s dW (stationary SD s in
   [0, 0.25], correlation time tau = H x logU[0.2, 2]), sampled exactly at `n_knots` times and
   held constant between them (`popkin.amortized._pk`).
4. Design: horizon H ~ (2-6) x the typical half-life, clipped to [4, 240] h; single dose, or
   2-16 doses every ii in {6, 8, 12, 24} h (the one nearest to a half-life draw), some starting
   at steady state; doses ~ logU[5, 1000] mg, per-individual variation on half the studies;
   doses on a jittered grid (+-15 % of ii) in half of the multiple-dose studies;
   2-T_max samples per individual, dense early and sparse late (t = H u^2), or spread
   evenly over a multiple-dose regimen (t = H u) in half of those studies.
5. Noise and censoring: y = C (1 + s_p e1) + s_a e2 with s_p in [0.05, 0.25] and s_a a
   fraction of the initial concentration scale; values below an LLOQ (0.2-5% of that scale)
   are censored (flag set, value = LLOQ).

`sample_studies(key, n)` is a pure function of the key (vectorised with `jax.vmap`), so a
training stream is `sample_studies(jax.random.fold_in(key, step), batch)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from popkin.amortized._pk import concentrations

F32 = jnp.float32


@dataclass(frozen=True)
class PriorConfig:
    """Ranges of the synthetic prior and the padded sizes of a study."""

    n_individuals: tuple[int, int] = (5, 15)
    max_individuals: int = 15
    max_obs: int = 16
    min_obs: int = 2
    max_doses: int = 16
    n_knots: int = 4
    cmt_probs: tuple[float, float, float] = (0.45, 0.4, 0.15)
    route_probs: tuple[float, float, float] = (0.6, 0.2, 0.2)  # oral, bolus, infusion
    log_ka: tuple[float, float] = (-1.0, 2.0)
    log_ke: tuple[float, float] = (-6.0, 0.0)
    log_v: tuple[float, float] = (1.0, 7.0)
    log_kperiph: tuple[float, float] = (-4.0, 0.0)
    bsv_sd: tuple[float, float] = (0.15, 0.6)
    cl_v_corr: tuple[float, float] = (-0.2, 0.6)
    ou_sd: tuple[float, float] = (0.0, 0.25)
    ou_tau_rel: tuple[float, float] = (0.2, 2.0)
    lag_prob: float = 0.3
    multiple_dose_prob: float = 0.35
    ss_prob: float = 0.3  # of multiple-dose studies
    log_dose: tuple[float, float] = (1.6, 6.9)  # log mg
    prop_sd: tuple[float, float] = (0.05, 0.25)
    add_rel: tuple[float, float] = (0.001, 0.02)
    lloq_rel: tuple[float, float] = (0.002, 0.05)


class Studies(eqx.Module):
    """A batch of studies as padded arrays: S studies x N individuals x T samples / D doses.

    Times in h, amounts in mg, concentrations in mg/L (the synthetic prior's units; real data
    keep their own units, normalised by `popkin.amortized.tokens`). `obs_y` holds the LLOQ where
    `obs_cens` is set. `theta` (S, N, K, 7) holds the true parameters at each knot (synthetic
    only; NaN for real data).
    """

    obs_t: Float[Array, "S N T"]
    obs_y: Float[Array, "S N T"]
    obs_cens: Bool[Array, "S N T"]
    obs_mask: Bool[Array, "S N T"]
    dose_t: Float[Array, "S N D"]
    dose_amt: Float[Array, "S N D"]
    dose_route: Int[Array, "S N D"]
    dose_dur: Float[Array, "S N D"]
    dose_mask: Bool[Array, "S N D"]
    ind_mask: Bool[Array, "S N"]
    lag: Float[Array, "S N"]
    ss: Bool[Array, "S N"]
    ii: Float[Array, "S N"]
    theta: Float[Array, "S N K 7"]
    knot_t: Float[Array, "S N K"]
    n_cmt: Int[Array, " S"]

    @property
    def n_studies(self) -> int:
        return self.obs_t.shape[0]

    def take(self, index) -> Studies:
        """Studies selected along the first axis."""
        return jax.tree.map(lambda x: x[index], self)


def _uniform(key, lo_hi, shape=()):
    lo, hi = lo_hi
    return jax.random.uniform(key, shape, F32, lo, hi)


def _sample_study(key: Array, cfg: PriorConfig) -> Studies:
    n_max, t_max, d_max, k_count = cfg.max_individuals, cfg.max_obs, cfg.max_doses, cfg.n_knots
    ks = iter(jax.random.split(key, 40))
    n_ind = jax.random.randint(next(ks), (), cfg.n_individuals[0], cfg.n_individuals[1] + 1)
    ind_mask = jnp.arange(n_max) < n_ind
    n_cmt = 1 + jax.random.choice(next(ks), 3, p=jnp.asarray(cfg.cmt_probs))
    route = jax.random.choice(next(ks), 3, p=jnp.asarray(cfg.route_probs))

    # typical parameters
    log_ka = _uniform(next(ks), cfg.log_ka)
    log_ke = _uniform(next(ks), cfg.log_ke)
    log_v1 = _uniform(next(ks), cfg.log_v)
    log_k = _uniform(next(ks), cfg.log_kperiph, (4,))  # k12, k21, k13, k31
    v1 = jnp.exp(log_v1)
    cl = jnp.exp(log_ke) * v1
    q2 = jnp.exp(log_k[0]) * v1
    v2 = q2 / jnp.exp(log_k[1])
    q3 = jnp.exp(log_k[2]) * v1
    v3 = q3 / jnp.exp(log_k[3])
    use2 = n_cmt >= 2
    use3 = n_cmt >= 3
    typ = jnp.stack(
        [
            jnp.exp(log_ka),
            cl,
            v1,
            jnp.where(use2, q2, 0.0),
            jnp.where(use2, v2, 1.0),
            jnp.where(use3, q3, 0.0),
            jnp.where(use3, v3, 1.0),
        ]
    )

    # between-subject variability (log scale), CL-V1 correlation
    sd = _uniform(next(ks), cfg.bsv_sd, (7,))
    rho = _uniform(next(ks), cfg.cl_v_corr)
    z = jax.random.normal(next(ks), (n_max, 7), F32)
    z = z.at[:, 2].set(rho * z[:, 1] + jnp.sqrt(1 - rho**2) * z[:, 2])
    eta = z * sd
    eta = (
        eta.at[:, 4]
        .set(jnp.where(use2, eta[:, 4], 0.0))
        .at[:, 6]
        .set(jnp.where(use3, eta[:, 6], 0.0))
    )

    # design
    t_half = jnp.log(2.0) / jnp.exp(log_ke)
    multiple = jax.random.bernoulli(next(ks), cfg.multiple_dose_prob)
    iis = jnp.array([6.0, 8.0, 12.0, 24.0], F32)
    ii_target = t_half * jnp.exp(_uniform(next(ks), (-0.7, 0.7)))
    ii = iis[jnp.argmin(jnp.abs(jnp.log(iis) - jnp.log(ii_target)))]
    n_doses = jnp.where(multiple, jax.random.randint(next(ks), (), 2, d_max + 1), 1)
    ss = multiple & jax.random.bernoulli(next(ks), cfg.ss_prob)
    post = jnp.clip(t_half * _uniform(next(ks), (2.0, 6.0)), 4.0, 240.0)
    horizon = jnp.where(multiple, (n_doses - 1) * ii + jnp.minimum(post, 2 * ii + 24.0), post)
    dose_k = jnp.arange(d_max)
    jitter = (
        jnp.where(
            jax.random.bernoulli(next(ks), 0.5),
            jax.random.uniform(next(ks), (n_max, d_max), F32, -0.15, 0.15) * ii,
            0.0,
        )
        .at[:, 0]
        .set(0.0)
    )
    dose_t = (dose_k * ii + jitter).astype(F32)
    dose_mask = jnp.broadcast_to(dose_k < n_doses, (n_max, d_max)) & ind_mask[:, None]
    log_dose = _uniform(next(ks), cfg.log_dose)
    vary = jax.random.bernoulli(next(ks), 0.5)
    ind_dose = jnp.exp(
        log_dose + jnp.where(vary, 0.3, 0.0) * jax.random.normal(next(ks), (n_max,), F32)
    )
    dose_amt = jnp.where(dose_mask, ind_dose[:, None], 0.0)
    dur = _uniform(next(ks), (0.25, 4.0))
    dose_route = jnp.full((n_max, d_max), route, jnp.int32)
    dose_dur = jnp.where(route == 2, dur, 0.0) * jnp.ones((n_max, d_max), F32)

    has_lag = (route == 0) & jax.random.bernoulli(next(ks), cfg.lag_prob)
    lag = jnp.where(
        has_lag,
        _uniform(next(ks), (0.1, 1.0)) * jnp.exp(0.3 * jax.random.normal(next(ks), (n_max,), F32)),
        0.0,
    )

    # OU paths of log ka, CL, V1 at the knots
    knot_t = jnp.broadcast_to(jnp.arange(k_count, dtype=F32) * horizon / k_count, (n_max, k_count))
    ou_sd = _uniform(next(ks), cfg.ou_sd)
    tau = horizon * jnp.exp(_uniform(next(ks), tuple(math.log(x) for x in cfg.ou_tau_rel)))
    rho_k = jnp.exp(-(horizon / k_count) / tau)
    xi = jax.random.normal(next(ks), (n_max, k_count, 3), F32)

    def ou_step(o, x):
        o = rho_k * o + ou_sd * jnp.sqrt(1 - rho_k**2) * x
        return o, o

    o0 = ou_sd * xi[:, 0]
    _, rest = jax.lax.scan(ou_step, o0, jnp.swapaxes(xi[:, 1:], 0, 1))
    ou = jnp.concatenate([o0[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)  # (N, K, 3)
    ou7 = jnp.zeros((n_max, k_count, 7), F32).at[:, :, :3].set(ou)
    theta = typ * jnp.exp(eta[:, None, :] + ou7)
    theta = theta.at[:, :, 3].set(jnp.where(use2, theta[:, :, 3], 0.0))
    theta = theta.at[:, :, 5].set(jnp.where(use3, theta[:, :, 5], 0.0))

    # sampling times: dense early, sparse late
    n_obs = jax.random.randint(next(ks), (n_max,), cfg.min_obs, t_max + 1)
    u = jnp.sort(jax.random.uniform(next(ks), (n_max, t_max), F32, 0.03, 1.0), axis=1)
    obs_mask = (jnp.arange(t_max)[None, :] < n_obs[:, None]) & ind_mask[:, None]
    # the first n_obs of the sorted uniforms, spread to the horizon
    u = u / jnp.take_along_axis(u, jnp.maximum(n_obs - 1, 0)[:, None], axis=1)
    power = jnp.where(multiple & jax.random.bernoulli(next(ks), 0.5), 1.0, 2.0)
    obs_t = jnp.where(obs_mask, horizon * jnp.clip(u, 0, 1) ** power, horizon)
    obs_t = jnp.maximum(obs_t, 0.02 * jnp.minimum(horizon, t_half))

    conc = jax.vmap(concentrations, in_axes=(0, 0, 0, 0, 0, 0, 0, 0, 0, None, None))(
        theta, knot_t, dose_t, dose_amt, dose_route, dose_dur, dose_mask, obs_t, lag, ss, ii
    )
    c_ref = jnp.exp(log_dose) / typ[2]
    prop = _uniform(next(ks), cfg.prop_sd)
    add = _uniform(next(ks), cfg.add_rel) * c_ref
    e = jax.random.normal(next(ks), (2, n_max, t_max), F32)
    y = conc * (1 + prop * e[0]) + add * e[1]
    lloq = _uniform(next(ks), cfg.lloq_rel) * c_ref
    cens = (y < lloq) & obs_mask
    y = jnp.where(cens, lloq, y)
    y = jnp.where(obs_mask, y, 0.0)
    return Studies(
        obs_t=obs_t,
        obs_y=y,
        obs_cens=cens,
        obs_mask=obs_mask,
        dose_t=dose_t,
        dose_amt=dose_amt,
        dose_route=dose_route,
        dose_dur=dose_dur,
        dose_mask=dose_mask,
        ind_mask=ind_mask,
        lag=lag.astype(F32),
        ss=jnp.broadcast_to(ss, (n_max,)),
        ii=jnp.broadcast_to(ii, (n_max,)).astype(F32),
        theta=theta,
        knot_t=knot_t,
        n_cmt=n_cmt,
    )


def sample_studies(key: Array, n: int, config: PriorConfig | None = None) -> Studies:
    """`n` independent studies from the synthetic prior (deterministic in `key`)."""
    cfg = PriorConfig() if config is None else config
    return _sample_batch(jax.random.split(key, n), cfg)


@eqx.filter_jit
def _sample_batch(keys: Array, cfg: PriorConfig) -> Studies:
    return jax.vmap(lambda k: _sample_study(k, cfg))(keys)
