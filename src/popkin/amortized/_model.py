"""The hierarchical in-context model (AICMET-style) with two decoders.

Latents: a study code z_s and an individual code z_i (Gaussian, diagonal).

    tokens of individual i  --embed-->  self-attention (L layers)  --attention pool-->  h_i
    {h_j : j in context}     --self-attention across individuals--> pool --> q(z_s | context)
    [h_i, z_s]               --MLP-->  q(z_i | data of i, z_s)

An individual with no observations (only dose tokens) gets the conditional prior p(z_i | z_s)
from the same head, so forecasting (a few early samples) and generating (none) are one path.

Decoder "attention" (functional attention, ours in the readout): for a query time t and each
dose d of the individual, a token e_td = MLP(t - t_d features, dose features, z_i, z_s);
self-attention across an individual's dose tokens at that t; the concentration is a positive
superposition C(t) = sum_d amt_d softplus(w . e_td), so dosing enters the way linear PK
says it does while the response shape is free; log-variance from the pooled tokens.

Decoder "physics" (ours): MLP([z_i, z_s]) -> (ka, CL, V1, Q, V2, lag) of a two-compartment
model in the study's normalised units, concentrations by `superposition_2cmt` (exact
superposition, steady state, infusions), and a proportional + additive error from z_s:
Var(log y) = s_p^2 + (s_a / C)^2.

Both heads are trained on the same encoder (the loss is the sum of the two ELBOs); each
reports its own forecasts. Everything is float32; shapes are per study and `jax.vmap`-ed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from popkin.amortized._pk import superposition_2cmt
from popkin.amortized._tokens import individual_dose_features, last_dose_before, obs_features

F32 = jnp.float32


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the in-context model."""

    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    z_study: int = 16
    z_ind: int = 16
    use_study: bool = True  # False: ablation without z_s
    kind: str = "incontext"  # which model `popkin.amortized._train.model_kinds` builds
    # flow-matching generator (kind "generator", `popkin.amortized._generator`)
    flow_width: int = 128  # velocity-field MLP width
    flow_depth: int = 3  # residual blocks of the velocity field
    flow_steps: int = 8  # Heun steps of the sampling ODE
    flow_pairs: int = 8  # (x0, t) pairs per target individual in the FM loss
    flow_knots: int = 4  # OU knots of the parameter path (= PriorConfig.n_knots)
    ode_steps: int = 2  # kind "neural_ode": fixed solver steps per interval

    def to_dict(self) -> dict:
        return asdict(self)


class _Block(eqx.Module):
    """Pre-norm transformer block (library attention, MLP)."""

    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, d: int, heads: int, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.norm1 = eqx.nn.LayerNorm(d, dtype=F32)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k1, dtype=F32)
        self.norm2 = eqx.nn.LayerNorm(d, dtype=F32)
        self.mlp = eqx.nn.MLP(d, d, 2 * d, 1, activation=jax.nn.gelu, key=k2, dtype=F32)

    def __call__(self, x: Float[Array, "L d"], mask: Array) -> Float[Array, "L d"]:
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h, mask=mask[None, :] & jnp.ones((x.shape[0], 1), bool))
        return x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))


class _Pool(eqx.Module):
    """Attention pooling of a masked set to one vector (a learned query)."""

    query: Array
    attn: eqx.nn.MultiheadAttention

    def __init__(self, d: int, heads: int, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.query = 0.02 * jax.random.normal(k1, (1, d), F32)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k2, dtype=F32)

    def __call__(self, x, mask):
        return self.attn(self.query, x, x, mask=mask[None, :])[0]


def encode_individual(net, ind: dict) -> Float[Array, " d"]:
    """h_i: embed one individual's observation and dose tokens (with a token-type signal),
    self-attention blocks over the masked set, attention pooling. `net` holds the layers
    `obs_embed`, `dose_embed`, `blocks`, `pool_ind` (InContextPK, FlowGenerator)."""
    last = last_dose_before(ind["obs_t"], ind["dose_t"], ind["dose_mask"])
    fo = obs_features(ind["obs_t"], ind["obs_y"], ind["obs_cens"], last)
    fd = individual_dose_features(ind)
    x = jnp.concatenate([jax.vmap(net.obs_embed)(fo), jax.vmap(net.dose_embed)(fd)])
    mask = jnp.concatenate([ind["obs_mask"], ind["dose_mask"]])
    x = x + jnp.concatenate(
        [jnp.zeros((fo.shape[0], x.shape[1]), F32).at[:, 0].set(1.0),
         jnp.zeros((fd.shape[0], x.shape[1]), F32).at[:, 1].set(1.0)]
    )  # fmt: skip
    for block in net.blocks:
        x = block(x, mask)
    return net.pool_ind(x, mask)


def _gauss_head(d_in, d_out, key):
    return eqx.nn.MLP(d_in, 2 * d_out, 2 * d_in, 1, activation=jax.nn.gelu, key=key, dtype=F32)


class InContextPK(eqx.Module):
    """Encoder, study/individual latents, attention decoder and physics decoder."""

    config: ModelConfig = eqx.field(static=True)
    obs_embed: eqx.nn.MLP
    dose_embed: eqx.nn.MLP
    blocks: tuple
    pool_ind: _Pool
    study_block: _Block
    pool_study: _Pool
    head_study: eqx.nn.MLP
    head_ind: eqx.nn.MLP
    dec_embed: eqx.nn.MLP
    dec_block: _Block
    dec_out: eqx.nn.Linear
    dec_var: eqx.nn.MLP
    phys: eqx.nn.MLP
    phys_err: eqx.nn.MLP

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        c = config
        d = c.d_model
        ks = iter(jax.random.split(key, 20))
        self.config = c
        self.obs_embed = eqx.nn.MLP(6, d, d, 1, activation=jax.nn.gelu, key=next(ks), dtype=F32)
        self.dose_embed = eqx.nn.MLP(9, d, d, 1, activation=jax.nn.gelu, key=next(ks), dtype=F32)
        self.blocks = tuple(_Block(d, c.n_heads, next(ks)) for _ in range(c.n_layers))
        self.pool_ind = _Pool(d, c.n_heads, next(ks))
        self.study_block = _Block(d, c.n_heads, next(ks))
        self.pool_study = _Pool(d, c.n_heads, next(ks))
        self.head_study = _gauss_head(d, c.z_study, next(ks))
        self.head_ind = _gauss_head(d + c.z_study, c.z_ind, next(ks))
        zdim = c.z_ind + c.z_study
        self.dec_embed = eqx.nn.MLP(
            6 + 9 + zdim, d, 2 * d, 2, activation=jax.nn.gelu, key=next(ks), dtype=F32
        )
        self.dec_block = _Block(d, c.n_heads, next(ks))
        self.dec_out = eqx.nn.Linear(d, 1, key=next(ks), dtype=F32)
        self.dec_var = eqx.nn.MLP(d + 1, 1, d, 1, activation=jax.nn.gelu, key=next(ks), dtype=F32)
        self.phys = eqx.nn.MLP(zdim, 6, 2 * d, 2, activation=jax.nn.gelu, key=next(ks), dtype=F32)
        self.phys_err = eqx.nn.MLP(
            c.z_study, 2, d, 1, activation=jax.nn.gelu, key=next(ks), dtype=F32
        )

    # -- encoder ---------------------------------------------------------------------------
    def encode_individual(self, ind: dict) -> Float[Array, " d"]:
        """h_i from one individual's tokens (normalised units); `ind["obs_mask"]` selects obs."""
        return encode_individual(self, ind)

    def study_posterior(self, h: Float[Array, "N d"], context: Array):
        """q(z_s | context individuals): mean and log-SD (zeros when `use_study` is off)."""
        x = self.study_block(h, context)
        out = self.head_study(self.pool_study(x, context))
        mu, log_sd = jnp.split(out, 2)
        if not self.config.use_study:
            return jnp.zeros_like(mu), jnp.full_like(log_sd, -10.0)
        return mu, jnp.clip(log_sd, -7.0, 2.0)

    def individual_posterior(self, h: Float[Array, " d"], z_s: Array):
        """q(z_i | data of i, z_s); with no observations this is the prior p(z_i | z_s)."""
        mu, log_sd = jnp.split(self.head_ind(jnp.concatenate([h, z_s])), 2)
        return mu, jnp.clip(log_sd, -7.0, 2.0)

    # -- decoders --------------------------------------------------------------------------
    def decode_attention(self, z: Array, ind: dict, t: Float[Array, " Q"]):
        """Mean and log-variance of log(C / C_s) at query times t (normalised units)."""
        fd = individual_dose_features(ind)

        def at_time(tq):
            rel = tq - ind["dose_t"]
            after = (rel >= 0) & ind["dose_mask"]
            rel_p = jnp.maximum(rel, 0.0)
            fr = jnp.stack(
                [rel_p, jnp.log(rel_p + 0.01), jnp.sqrt(rel_p), after.astype(F32),
                 jnp.full_like(rel, tq), jnp.log(jnp.maximum(tq, 0.0) + 0.01) * jnp.ones_like(rel)],
                -1,
            )  # fmt: skip
            zz = jnp.broadcast_to(z, (rel.shape[0], z.shape[0]))
            e = jax.vmap(self.dec_embed)(jnp.concatenate([fr, fd, zz], -1))
            # every real dose is a token (also later doses: they carry the design, not input)
            e = self.dec_block(e, ind["dose_mask"])
            contrib = jax.nn.softplus(jax.vmap(self.dec_out)(e)[:, 0])
            total = jnp.sum(ind["dose_amt"] * after * contrib)  # SS acts through its token
            pooled = jnp.sum(jnp.where(ind["dose_mask"][:, None], e, 0.0), 0) / jnp.maximum(
                jnp.sum(ind["dose_mask"]), 1
            )
            mean = jnp.log(total + 1e-6)
            logvar = self.dec_var(jnp.concatenate([pooled, mean[None]]))[0]
            return mean, jnp.clip(logvar, -9.0, 3.0)

        return jax.vmap(at_time)(t)

    def physics_parameters(self, z: Array) -> Array:
        """(ka, CL, V1, Q, V2, lag) in normalised units from [z_i, z_s]."""
        raw = self.phys(z)
        ka, cl, v1, q, v2 = (jnp.exp(8.0 * jnp.tanh(raw[i] / 8.0)) for i in range(5))
        lag = 0.05 * jax.nn.softplus(raw[5])
        return jnp.stack([ka, cl, v1, q + 1e-4 * cl, v2, lag])

    def decode_physics(self, z: Array, z_s: Array, ind: dict, t: Float[Array, " Q"]):
        """Mean and log-variance of log(C / C_s) from the two-compartment decoder."""
        p = self.physics_parameters(z)
        c = superposition_2cmt(
            p, ind["dose_t"], ind["dose_amt"], ind["dose_route"], ind["dose_dur"],
            ind["dose_mask"], t, ss=ind["ss"], ii=ind["ii"],
        )  # fmt: skip
        e = self.phys_err(z_s)
        s_p = 0.02 + jax.nn.softplus(e[0])
        s_a = 1e-3 + jax.nn.softplus(e[1]) * 0.05
        c = jnp.maximum(c, 1e-6)
        return jnp.log(c), jnp.log(s_p**2 + (s_a / c) ** 2)
