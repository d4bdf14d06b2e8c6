"""Flow-matching generator: a conditional flow over an individual's PK parameter path, decoded
by exact physics (flow-matching posterior estimation; issue 6).

Why a latent (parameter-space) flow rather than a flow over concentration curves: a study's
individuals differ by their PK parameters, and concentrations follow from parameters and dosing
by linear PK. A flow over the ~17 numbers that *are* the individual (log ka, CL, V1 at the K
knots of its Ornstein-Uhlenbeck path, log Q2, V2, Q3, V3, the lag) is low dimensional and
regimen free, and decoding by the prior's own propagator (`popkin.amortized.concentrations`)
makes dosing, superposition, steady state, infusions and lag exact by construction: no
concentration before the first oral dose + lag, doubling doses doubles the curve, and a
multiple-dose regimen that the context never saw is the same individuals under new doses.
A functional flow over curves would have to learn all of that and could break it.

Target x1 (per individual, study-normalised units: rates x T_s, volumes / (A_s / C_s),
clearances / (A_s / (C_s T_s))), standardised by fixed prior moments MU, SD:

    x1 = ([log ka_k]_k, [log CL_k]_k, [log V1_k]_k, log Q2, log V2, log Q3, log V3,
          log(lag / T_s + 1e-3)),   absent compartment: Q = 1e-3 CL, V = V1 (at knot 0)

Conditional flow matching on the linear (rectified) path, base x0 ~ N(0, I):

    x_t = (1 - t) x0 + t x1,   loss = E_{t ~ U(0,1), x0} || v(x_t, t, c) - (x1 - x0) ||^2 / dim

with c = [attention-pooled encoding of the context individuals (all their observation and dose
tokens; permutation invariant), encoding of the target's dose tokens and its first k in {0..5}
samples]; the encoder is trained jointly. Sampling integrates dx/dt = v(x, t, c) from t = 0
to 1 with diffrax (Heun, `ModelConfig.flow_steps` fixed steps). Knots are placed at k T_s / K
(normalised k / K): in the prior every individual's knots are at k H / K with H its last
sampling time, which equals T_s (checked in the tests); for real data the same rule is used.

Residual error: a head on the study encoding gives (s_p, s_a) of Var(log y) = s_p^2 +
(s_a / C)^2 (normalised C), trained by the Gaussian (log Phi for BLQ) likelihood of every
observed y given the *true* noise-free concentrations of the prior, added to the FM loss.
Predictive draws add it as y = C exp(s_p e1) + s_a e2 (floored at s_a), which has that
variance for C >> s_a and stays bounded as C -> 0; sampled standardised parameters are
clipped to +-5 prior SDs (outside the prior's support).
"""

from __future__ import annotations

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from popkin.amortized._model import ModelConfig, _Block, _Pool, encode_individual
from popkin.amortized._pk import concentrations
from popkin.amortized._prior import Studies
from popkin.amortized._train import prepare_with_scales

F32 = jnp.float32
LAG_EPS = 1e-3  # lag / T_s offset inside the log (absent lag -> log 1e-3)
Q_FLOOR = 1e-3  # absent compartment: Q = Q_FLOOR x CL, V = V1
N_TIME_FREQ = 4
Z_MAX = 5.0  # sampled standardised parameters are clipped to +-5 prior SDs
# Standardisation of x1 (prior moments over 400 studies, `sample_studies(PRNGKey(1), 400)`,
# in normalised units; rounded). Order: ka x K, CL x K, V1 x K, Q2, V2, Q3, V3, lag.
_MU_SD = {
    "ka": (4.6, 1.6),
    "CL": (0.15, 1.2),
    "V1": (-0.9, 1.0),
    "Q2": (-2.7, 4.0),
    "V2": (-1.05, 1.4),
    "Q3": (-6.4, 3.0),
    "V3": (-0.9, 1.2),
    "lag": (-6.4, 1.1),
}


def _moments(k: int) -> tuple[Array, Array]:
    names = ["ka"] * k + ["CL"] * k + ["V1"] * k + ["Q2", "V2", "Q3", "V3", "lag"]
    mu = jnp.array([_MU_SD[n][0] for n in names], F32)
    sd = jnp.array([_MU_SD[n][1] for n in names], F32)
    return mu, sd


def normalised_theta(theta: Float[Array, "... K 7"], scales_t, scales_a, scales_c):
    """Natural-unit parameters (h, L, mg) -> study-normalised units; the scales (T_s, A_s,
    C_s) broadcast against `theta[..., 0]`: ka T_s, CL / (A_s / (C_s T_s)), V / (A_s / C_s)."""
    t, v, cl = scales_t, scales_a / scales_c, scales_a / (scales_c * scales_t)
    return theta / jnp.stack([1 / t, cl, v, cl, v, cl, v], -1)


def param_vector(theta_n: Float[Array, "K 7"], lag_n: Float[Array, ""]) -> Float[Array, " P"]:
    """x (unstandardised logs) of one individual from its normalised parameters and lag."""
    cl0, v0 = theta_n[0, 1], theta_n[0, 2]
    q2 = jnp.where(theta_n[0, 3] > 0, theta_n[0, 3], Q_FLOOR * cl0)
    v2 = jnp.where(theta_n[0, 3] > 0, theta_n[0, 4], v0)
    q3 = jnp.where(theta_n[0, 5] > 0, theta_n[0, 5], Q_FLOOR * cl0)
    v3 = jnp.where(theta_n[0, 5] > 0, theta_n[0, 6], v0)
    logs = jnp.log(jnp.maximum(jnp.stack([q2, v2, q3, v3]), 1e-30))
    path = jnp.log(jnp.maximum(theta_n[:, :3], 1e-30)).T.reshape(-1)  # ka_k, CL_k, V1_k
    return jnp.concatenate([path, logs, jnp.log(lag_n + LAG_EPS)[None]])


def decode_vector(x: Float[Array, " P"], k: int) -> tuple[Float[Array, "K 7"], Array]:
    """Inverse of `param_vector`: (theta (K, 7), lag) in normalised units."""
    e = jnp.exp(jnp.clip(x, -20.0, 20.0))
    ka, cl, v1 = e[:k], e[k : 2 * k], e[2 * k : 3 * k]
    q2, v2, q3, v3 = (jnp.full((k,), e[3 * k + j]) for j in range(4))
    theta = jnp.stack([ka, cl, v1, q2, v2, q3, v3], -1)
    lag = jnp.maximum(jnp.exp(jnp.clip(x[-1], -20.0, 5.0)) - LAG_EPS, 0.0)
    return theta, lag


def _ind(s: Studies, j) -> dict:
    return dict(
        obs_t=s.obs_t[j], obs_y=s.obs_y[j], obs_cens=s.obs_cens[j], obs_mask=s.obs_mask[j],
        dose_t=s.dose_t[j], dose_amt=s.dose_amt[j], dose_route=s.dose_route[j],
        dose_dur=s.dose_dur[j], dose_mask=s.dose_mask[j], ss=s.ss[j], ii=s.ii[j],
    )  # fmt: skip


def _time_embed(t):
    f = 2.0 * math.pi * jnp.arange(1, N_TIME_FREQ + 1, dtype=F32)
    return jnp.concatenate([t[None], jnp.sin(f * t), jnp.cos(f * t)])


class FlowGenerator(eqx.Module):
    """Study/target encoder, conditional velocity field v(x, t, c), residual-error head."""

    config: ModelConfig = eqx.field(static=True)
    obs_embed: eqx.nn.MLP
    dose_embed: eqx.nn.MLP
    blocks: tuple
    pool_ind: _Pool
    study_block: _Block
    pool_study: _Pool
    cond: eqx.nn.MLP
    vel_in: eqx.nn.Linear
    vel_blocks: tuple
    vel_norms: tuple
    vel_out: eqx.nn.Linear
    err: eqx.nn.MLP

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        c = config
        d, w = c.d_model, c.flow_width
        p = self.n_params(c)
        ks = iter(jax.random.split(key, 16 + 2 * c.flow_depth))
        self.config = c
        gelu = jax.nn.gelu
        self.obs_embed = eqx.nn.MLP(6, d, d, 1, activation=gelu, key=next(ks), dtype=F32)
        self.dose_embed = eqx.nn.MLP(9, d, d, 1, activation=gelu, key=next(ks), dtype=F32)
        self.blocks = tuple(_Block(d, c.n_heads, next(ks)) for _ in range(c.n_layers))
        self.pool_ind = _Pool(d, c.n_heads, next(ks))
        self.study_block = _Block(d, c.n_heads, next(ks))
        self.pool_study = _Pool(d, c.n_heads, next(ks))
        self.cond = eqx.nn.MLP(2 * d, d, 2 * d, 1, activation=gelu, key=next(ks), dtype=F32)
        self.vel_in = eqx.nn.Linear(p + 1 + 2 * N_TIME_FREQ + d, w, key=next(ks), dtype=F32)
        self.vel_blocks = tuple(
            eqx.nn.MLP(w + d, w, w, 1, activation=gelu, key=next(ks), dtype=F32)
            for _ in range(c.flow_depth)
        )
        self.vel_norms = tuple(eqx.nn.LayerNorm(w, dtype=F32) for _ in range(c.flow_depth))
        self.vel_out = eqx.nn.Linear(w, p, key=next(ks), dtype=F32)
        self.err = eqx.nn.MLP(d, 2, d, 1, activation=gelu, key=next(ks), dtype=F32)

    @staticmethod
    def n_params(config: ModelConfig) -> int:
        return 3 * config.flow_knots + 5

    # -- conditioning ----------------------------------------------------------------------
    def encode_individual(self, ind: dict) -> Float[Array, " d"]:
        """h_i from one individual's tokens (the encoder of `InContextPK`)."""
        return encode_individual(self, ind)

    def condition(self, study: Studies, target, obs_mask_target, design_from=None):
        """(c, h_s): the flow's condition and the study encoding, one normalised study.

        The target's own samples never enter h_s (it is masked out of the context); with
        `design_from`, the target is encoded under that individual's dosing with no samples."""
        n = study.ind_mask.shape[0]
        idx = jnp.arange(n)
        h = jax.vmap(self.encode_individual)(jax.vmap(lambda j: _ind(study, j))(idx))
        context = study.ind_mask & (idx != target)
        h_s = self.pool_study(self.study_block(h, context), context)
        if design_from is None:
            tgt = dict(_ind(study, target), obs_mask=obs_mask_target)
        else:
            ref = _ind(study, design_from)
            tgt = dict(ref, obs_mask=jnp.zeros_like(ref["obs_mask"]))
        h_t = self.encode_individual(tgt)
        return self.cond(jnp.concatenate([h_s, h_t])), h_s

    def error_sd(self, h_s: Array) -> tuple[Array, Array]:
        """(s_p, s_a): log-scale proportional SD and additive SD (normalised conc.)."""
        e = self.err(h_s)
        return 0.02 + jax.nn.softplus(e[0]), 1e-3 + 0.05 * jax.nn.softplus(e[1])

    # -- flow ------------------------------------------------------------------------------
    def velocity(self, x: Float[Array, " P"], t, c: Float[Array, " d"]) -> Float[Array, " P"]:
        """v(x_t, t, c) in standardised coordinates (residual MLP)."""
        h = self.vel_in(jnp.concatenate([x, _time_embed(jnp.asarray(t, F32)), c]))
        for norm, blk in zip(self.vel_norms, self.vel_blocks, strict=True):
            h = h + blk(jnp.concatenate([norm(h), c]))
        return self.vel_out(jax.nn.gelu(h))

    def sample_standardised(self, c: Array, key: PRNGKeyArray, n: int) -> Float[Array, "n P"]:
        """x1 ~ q(x | c): integrate dx/dt = v(x, t, c), t: 0 -> 1, x0 ~ N(0, I) (Heun)."""
        p = self.n_params(self.config)
        x0 = jax.random.normal(key, (n, p), F32)
        steps = self.config.flow_steps
        term = diffrax.ODETerm(lambda t, x, args: jax.vmap(self.velocity, (0, None, None))(x, t, c))
        sol = diffrax.diffeqsolve(
            term, diffrax.Heun(), t0=jnp.float32(0.0), t1=jnp.float32(1.0),
            dt0=jnp.float32(1.0 / steps), y0=x0, saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.ConstantStepSize(), max_steps=steps + 1,
        )  # fmt: skip
        return sol.ys[0]

    def sample_parameters(self, c: Array, key: PRNGKeyArray, n: int):
        """n draws of (theta (n, K, 7), lag (n,)) in normalised units."""
        mu, sd = _moments(self.config.flow_knots)
        z = jnp.clip(self.sample_standardised(c, key, n), -Z_MAX, Z_MAX)
        x = mu + sd * z
        return jax.vmap(lambda v: decode_vector(v, self.config.flow_knots))(x)

    def concentrations(self, theta, lag, ind: dict, t: Float[Array, " Q"]) -> Float[Array, " Q"]:
        """Noise-free C / C_s of one parameter draw under an individual's dosing (exact PK)."""
        k = self.config.flow_knots
        knot_t = jnp.arange(k, dtype=F32) / k
        return concentrations(
            theta, knot_t, ind["dose_t"], ind["dose_amt"], ind["dose_route"], ind["dose_dur"],
            ind["dose_mask"], t, lag, ind["ss"], ind["ii"],
        )  # fmt: skip

    def _draw(self, c, h_s, ind, t, key, n):
        k1, k2 = jax.random.split(key)
        theta, lag = self.sample_parameters(c, k1, n)
        conc = jax.vmap(self.concentrations, (0, 0, None, None))(theta, lag, ind, t)
        s_p, s_a = self.error_sd(h_s)
        e = jax.random.normal(k2, (2, *conc.shape), F32)
        m = jnp.log(conc)  # -inf where no drug has arrived (exactly zero concentration)
        # the head's log-scale error, drawn as y = C exp(s_p e1) + s_a e2 (the linearised
        # Var(log y) = s_p^2 + (s_a / C)^2 blows up as C -> 0); below s_a a draw is read as s_a
        y = conc * jnp.exp(s_p * e[0]) + s_a * e[1]
        return m, jnp.where(conc > 0, jnp.log(jnp.maximum(y, s_a)), -jnp.inf)

    # -- shared API (`popkin.amortized._forecast`) ------------------------------------------
    def predictive_samples(self, study, target, obs_mask_target, query_t, key, n: int):
        """[n, Q] samples of log(y / C_s) for the target given its early samples (a sample of
        a zero concentration, before dose + lag, is reported at 1e-8 C_s, below any LLOQ)."""
        c, h_s = self.condition(study, target, obs_mask_target)
        _, y = self._draw(c, h_s, _ind(study, target), query_t, key, n)
        return jnp.maximum(y, math.log(1e-8))

    def generate_samples(self, study, target, t, key, n: int):
        """(m, y) [n, Q]: noise-free log(C / C_s) and log(y / C_s) of n virtual individuals
        under the target's dosing; who they are is read under the study's own design (the
        first context individual's dosing, no samples), so a new regimen changes only doses."""
        ref = jnp.argmax(study.ind_mask & (jnp.arange(study.ind_mask.shape[0]) != target))
        c, h_s = self.condition(study, target, None, design_from=ref)
        return self._draw(c, h_s, _ind(study, target), t, key, n)

    # -- training objective ----------------------------------------------------------------
    def study_loss(self, study: Studies, theta_n, target, n_early, key):
        """(FM loss, error NLL per sample) of one normalised study; `theta_n` (N, K, 7)."""
        from popkin.amortized._train import early_mask, gaussian_loglik

        early = early_mask(study.obs_t[target], study.obs_mask[target], n_early)
        c, h_s = self.condition(study, target, early)
        mu, sd = _moments(self.config.flow_knots)
        x1 = (param_vector(theta_n[target], study.lag[target]) - mu) / sd
        k1, k2 = jax.random.split(key)
        m = self.config.flow_pairs
        x0 = jax.random.normal(k1, (m, x1.shape[0]), F32)
        tt = jax.random.uniform(k2, (m,), F32)
        xt = (1 - tt[:, None]) * x0 + tt[:, None] * x1
        v = jax.vmap(self.velocity, (0, 0, None))(xt, tt, c)
        fm = jnp.mean((v - (x1 - x0)) ** 2)

        k = self.config.flow_knots
        knot_t = jnp.arange(k, dtype=F32) / k
        conc = jax.vmap(concentrations, (0, None, 0, 0, 0, 0, 0, 0, 0, 0, 0))(
            theta_n, knot_t, study.dose_t, study.dose_amt, study.dose_route, study.dose_dur,
            study.dose_mask, study.obs_t, study.lag, study.ss, study.ii,
        )  # fmt: skip
        conc = jnp.maximum(conc, 1e-6)
        s_p, s_a = self.error_sd(h_s)
        logvar = jnp.log(s_p**2 + (s_a / conc) ** 2)
        mask = study.obs_mask & study.ind_mask[:, None]
        ll = gaussian_loglik(study.obs_y, study.obs_cens, mask, jnp.log(conc), logvar)
        return fm, -ll / jnp.maximum(jnp.sum(mask), 1)


def flow_batch_loss(model: FlowGenerator, studies: Studies, key):
    """Mean over a raw prior batch of FM loss + error NLL; parts {"fm", "error"}.

    As `_train.prepare`: one target per study, k in {0..5} early samples, scales from the
    context (the other individuals)."""
    if studies.theta.shape[-2] != model.config.flow_knots:
        raise ValueError(
            f"the prior has {studies.theta.shape[-2]} knots but the generator "
            f"flow_knots={model.config.flow_knots}"
        )
    kp, kl = jax.random.split(key)
    norm, target, n_early, scales = prepare_with_scales(studies, kp)
    theta_n = normalised_theta(
        studies.theta,
        scales.time[:, None, None],
        scales.amount[:, None, None],
        scales.conc[:, None, None],
    )
    keys = jax.random.split(kl, target.shape[0])
    fm, err = jax.vmap(FlowGenerator.study_loss, (None, 0, 0, 0, 0, 0))(
        model, norm, theta_n, target, n_early, keys
    )
    return jnp.mean(fm + err), {"fm": jnp.mean(fm), "error": jnp.mean(err)}


__all__ = ["FlowGenerator", "flow_batch_loss", "param_vector", "decode_vector"]
