"""Two baselines for the amortized models (issue 6): a plain transformer and a latent neural ODE.

Both are pre-trained by the shared loop (`_train.train`, kinds "transformer" / "neural_ode")
on the same synthetic prior, see the same unit-free tokens (t / T_s, amt / A_s, log(y / C_s))
and are scored by the same leave-one-out harness (`evaluate_study`) through
`predictive_samples` / `generate_samples` on one normalised, unbatched study.

**PlainTransformer** (no latent hierarchy, no physics). One flat token set per study: every
context individual's observation and dose tokens and the target's dose tokens and observed
(early) samples, flagged as target. Individual membership without a positional index: one
self-attention block within each individual first, then each token gets its individual's
attention-pooled vector added, so the flat set is a set of sets (permuting individuals permutes
tokens; the model is invariant). L self-attention blocks over the flat set; query-time tokens
(t, log t, time since the target's last dose) cross-attend to it (equinox MultiheadAttention)
and an MLP gives the Gaussian mean and log-variance of log(y / C_s). Trained by the Gaussian
negative log-likelihood (BLQ: log Phi) of the target's samples other than its k in {0..5}
early ones, per sample. It has no individual latent: its predictive is marginal per time, so
`generate_samples` cannot draw coherent virtual individuals (y is independent over times).

**LatentNeuralODE**. Encoder as in `InContextPK` (per-individual self-attention, attention
pooling to h_i; self-attention across context individuals, pooling to a context vector c).
Latent initial state z0 (dimension `z_ind`) with q(z0 | h_i(all data), c) and prior
p(z0 | h_i(early samples), c) from one Gaussian head. Between events the state follows
dz/dt = f(z, t, log(t - t_d + 0.01), 1[t - t_d < dur_d]) (t_d, dur_d: the last dose), solved by
diffrax (Heun, `ode_steps` fixed steps per interval); a dose is a learned jump
z <- z + g(z, dose features) (amount, route, infusion duration, steady state and II), so the
solver runs one `lax.scan` over the sorted doses. Every query time then branches off the state
just after the last dose before it, with its own fixed-step solve: a forecast at t does not
depend on which other times are asked (padding invariance, no query-grid effect). Decoder
z(t) -> (mean, log-variance) of log(y / C_s).
Objective: the ELBO, not a predictive NLL with sampled z0, so that the comparison with
`InContextPK` (trained by an ELBO of the same form: every individual contributes
E_q[log p(y | z0)] - KL(q(z0 | y, c) || p(z0 | early or no samples, c)), the target's prior
conditioned on its k early samples) isolates the decoder; the KL term trains the prior that
forecasts and generation sample from, and q on all data makes each study's gradient use every
individual rather than one target.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from popkin.amortized._model import ModelConfig, _Block, _gauss_head, _Pool
from popkin.amortized._prior import Studies
from popkin.amortized._tokens import individual_dose_features, last_dose_before, obs_features
from popkin.amortized._train import (
    _ind,
    _kl,
    early_mask,
    gaussian_loglik,
    mean_study_loss,
    prepare,
)

F32 = jnp.float32


class _Tokens(eqx.Module):
    """Obs / dose token embedding + one self-attention block within an individual + pooling."""

    obs_embed: eqx.nn.MLP
    dose_embed: eqx.nn.MLP
    blocks: tuple
    pool: _Pool

    def __init__(self, d: int, heads: int, layers: int, key: PRNGKeyArray):
        ks = jax.random.split(key, 3 + layers)
        self.obs_embed = eqx.nn.MLP(6, d, d, 1, activation=jax.nn.gelu, key=ks[0], dtype=F32)
        self.dose_embed = eqx.nn.MLP(9, d, d, 1, activation=jax.nn.gelu, key=ks[1], dtype=F32)
        self.blocks = tuple(_Block(d, heads, ks[3 + i]) for i in range(layers))
        self.pool = _Pool(d, heads, ks[2])

    def __call__(self, ind: dict, flag: Array):
        """(tokens [T+D, d], mask [T+D], pooled [d]); `flag` (0/1) marks the target."""
        last = last_dose_before(ind["obs_t"], ind["dose_t"], ind["dose_mask"])
        fo = obs_features(ind["obs_t"], ind["obs_y"], ind["obs_cens"], last)
        fd = individual_dose_features(ind)
        x = jnp.concatenate([jax.vmap(self.obs_embed)(fo), jax.vmap(self.dose_embed)(fd)])
        n_o, d = fo.shape[0], x.shape[1]
        kind = jnp.zeros((x.shape[0], d), F32).at[:n_o, 0].set(1.0).at[n_o:, 1].set(1.0)
        x = x + kind + jnp.zeros((d,), F32).at[2].set(flag)
        mask = jnp.concatenate([ind["obs_mask"], ind["dose_mask"]])
        for block in self.blocks:
            x = block(x, mask)
        return x, mask, self.pool(x, mask)


class _Cross(eqx.Module):
    """Pre-norm cross-attention block: queries attend to a masked memory (library attention)."""

    norm_q: eqx.nn.LayerNorm
    norm_m: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp: eqx.nn.MLP

    def __init__(self, d: int, heads: int, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.norm_q = eqx.nn.LayerNorm(d, dtype=F32)
        self.norm_m = eqx.nn.LayerNorm(d, dtype=F32)
        self.attn = eqx.nn.MultiheadAttention(heads, d, key=k1, dtype=F32)
        self.norm2 = eqx.nn.LayerNorm(d, dtype=F32)
        self.mlp = eqx.nn.MLP(d, d, 2 * d, 1, activation=jax.nn.gelu, key=k2, dtype=F32)

    def __call__(self, q, mem, mask):
        m = jax.vmap(self.norm_m)(mem)
        full = mask[None, :] & jnp.ones((q.shape[0], 1), bool)
        q = q + self.attn(jax.vmap(self.norm_q)(q), m, m, mask=full)
        return q + jax.vmap(self.mlp)(jax.vmap(self.norm2)(q))


def _query_features(t, ind):
    """t, log t, log / sqrt of time since the last dose (normalised units)."""
    since = jnp.maximum(t - last_dose_before(t, ind["dose_t"], ind["dose_mask"]), 0.0)
    return jnp.stack(
        [t, jnp.log(jnp.maximum(t, 0.0) + 0.01), jnp.log(since + 0.01), jnp.sqrt(since)], -1
    )


def _gaussian_samples(mean, logvar, key, n):
    eps = jax.random.normal(key, (n,) + mean.shape, F32)
    return mean[None] + jnp.exp(0.5 * logvar)[None] * eps


class PlainTransformer(eqx.Module):
    """Flat-token transformer baseline (see module docstring)."""

    config: ModelConfig = eqx.field(static=True)
    tokens: _Tokens
    blocks: tuple
    q_embed: eqx.nn.MLP
    cross: tuple
    out: eqx.nn.MLP

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        c, d = config, config.d_model
        ks = jax.random.split(key, 4 + 2 * c.n_layers)
        self.config = c
        self.tokens = _Tokens(d, c.n_heads, 1, ks[0])
        self.blocks = tuple(_Block(d, c.n_heads, ks[4 + i]) for i in range(c.n_layers))
        self.q_embed = eqx.nn.MLP(4, d, d, 1, activation=jax.nn.gelu, key=ks[1], dtype=F32)
        self.cross = tuple(_Cross(d, c.n_heads, ks[4 + c.n_layers + i]) for i in range(c.n_layers))
        self.out = eqx.nn.MLP(d, 2, d, 1, activation=jax.nn.gelu, key=ks[2], dtype=F32)

    def predict(self, study: Studies, target, obs_mask_target, query_t):
        """Mean and log-variance of log(y / C_s) of the target at query_t [Q]."""
        n = study.ind_mask.shape[0]
        idx = jnp.arange(n)
        is_t = idx == target
        inds = jax.vmap(lambda j: _ind(study, j))(idx)
        obs_mask = jnp.where(is_t[:, None], obs_mask_target[None], inds["obs_mask"])
        inds = dict(inds, obs_mask=obs_mask & study.ind_mask[:, None],
                    dose_mask=inds["dose_mask"] & study.ind_mask[:, None])  # fmt: skip
        x, mask, pooled = jax.vmap(self.tokens)(inds, is_t.astype(F32))
        x = (x + pooled[:, None, :]).reshape(-1, x.shape[-1])  # membership: own pooled vector
        mask = mask.reshape(-1)
        for block in self.blocks:
            x = block(x, mask)
        tgt = _ind(study, target)
        q = jax.vmap(self.q_embed)(_query_features(query_t, tgt))
        for block in self.cross:
            q = block(q, x, mask)
        out = jax.vmap(self.out)(q)
        return out[:, 0], jnp.clip(out[:, 1], -9.0, 3.0)

    def predictive_samples(self, study, target, obs_mask_target, query_t, key, n: int):
        """[n, Q] samples of log(y / C_s): the Gaussian predictive at each time."""
        mean, logvar = self.predict(study, target, obs_mask_target, query_t)
        return _gaussian_samples(mean, logvar, key, n)

    def generate_samples(self, study, target, t, key, n: int):
        """(m, y) [n, Q] with no target samples; m is the predictive mean (no latent: the
        same for every draw), y adds the predictive noise independently at each time."""
        mask = jnp.zeros_like(study.obs_mask[target])
        mean, logvar = self.predict(study, target, mask, t)
        return jnp.broadcast_to(mean, (n,) + mean.shape), _gaussian_samples(mean, logvar, key, n)


def transformer_loss(model: PlainTransformer, studies: Studies, key):
    """Gaussian NLL per sample of each target's samples after its k early ones (raw batch)."""
    norm, target, n_early = prepare(studies, key)

    def one(study, tgt, k):
        om = study.obs_mask[tgt]
        early = early_mask(study.obs_t[tgt], om, k)
        mean, logvar = model.predict(study, tgt, early, study.obs_t[tgt])
        rest = om & ~early
        ll = gaussian_loglik(study.obs_y[tgt], study.obs_cens[tgt], rest, mean, logvar)
        return -ll, jnp.sum(rest)

    nll, count = jax.vmap(one)(norm, target, n_early)
    loss = jnp.sum(nll) / jnp.maximum(jnp.sum(count), 1)
    return loss, {"nll": loss}


# -- latent neural ODE ---------------------------------------------------------------------


class LatentNeuralODE(eqx.Module):
    """Encoder -> q(z0), latent ODE with dose jumps (diffrax), Gaussian decoder."""

    config: ModelConfig = eqx.field(static=True)
    tokens: _Tokens
    study_block: _Block
    pool_study: _Pool
    head: eqx.nn.MLP
    field: eqx.nn.MLP
    jump: eqx.nn.MLP
    decoder: eqx.nn.MLP

    def __init__(self, config: ModelConfig, key: PRNGKeyArray):
        c, d, z = config, config.d_model, config.z_ind
        ks = jax.random.split(key, 8)
        self.config = c
        self.tokens = _Tokens(d, c.n_heads, c.n_layers, ks[0])
        self.study_block = _Block(d, c.n_heads, ks[1])
        self.pool_study = _Pool(d, c.n_heads, ks[2])
        self.head = _gauss_head(2 * d, z, ks[3])
        self.field = eqx.nn.MLP(z + 3, z, d, 2, activation=jnp.tanh, key=ks[4], dtype=F32)
        self.jump = eqx.nn.MLP(z + 9, z, d, 2, activation=jax.nn.gelu, key=ks[5], dtype=F32)
        self.decoder = eqx.nn.MLP(z, 2, d, 2, activation=jax.nn.gelu, key=ks[6], dtype=F32)

    # -- encoder ---------------------------------------------------------------------------
    def encode(self, ind: dict) -> Float[Array, " d"]:
        return self.tokens(ind, jnp.zeros((), F32))[2]

    def context(self, h: Float[Array, "N d"], context: Array) -> Float[Array, " d"]:
        """Context vector c from the context individuals' h_j (attention, pooling)."""
        return self.pool_study(self.study_block(h, context), context)

    def z0_dist(self, h, c):
        """Gaussian (mean, log-SD) of z0 given an individual's h and the context c."""
        mu, log_sd = jnp.split(self.head(jnp.concatenate([h, c])), 2)
        return mu, jnp.clip(log_sd, -7.0, 2.0)

    # -- latent dynamics -------------------------------------------------------------------
    def _solve(self, z, t0, t1, t_dose, dur):
        """z(t1) from z(t0) under dz/dt = f (Heun, `ode_steps` fixed steps; t1 >= t0)."""
        span = jnp.maximum(t1 - t0, 0.0)

        def rhs(s, y, args):  # rescaled time s in [0, 1]: t = t0 + s span
            t = t0 + s * span
            since = jnp.maximum(t - t_dose, 0.0)
            feats = jnp.stack([t, jnp.log(since + 0.01), (since < dur).astype(F32)])
            return span * self.field(jnp.concatenate([y, feats]).astype(F32))

        n = self.config.ode_steps
        zero, one = jnp.zeros((), F32), jnp.ones((), F32)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs), diffrax.Heun(), zero, one, one / n, z,
            saveat=diffrax.SaveAt(t1=True), stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=n,
        )  # fmt: skip
        return sol.ys[0].astype(F32)

    def decode(self, z0, ind: dict, query_t):
        """Mean and log-variance of log(C / C_s) at query_t [Q] from z0 (state at t_start)."""
        dmask = ind["dose_mask"]
        order = jnp.argsort(jnp.where(dmask, ind["dose_t"], jnp.inf), stable=True)
        t_d = ind["dose_t"][order]
        valid = dmask[order]
        feats = individual_dose_features(ind)[order]
        dur = jnp.where(ind["dose_route"] == 2, ind["dose_dur"], 0.0)[order]
        t_start = jnp.minimum(0.0, jnp.min(jnp.where(dmask, ind["dose_t"], jnp.inf)))

        def step(carry, ev):
            z, t_prev, t_last, dur_last = carry
            t, f, ok, du = ev
            t_new = jnp.where(ok, t, t_prev)
            z_pre = self._solve(z, t_prev, t_new, t_last, dur_last)
            z_new = z_pre + self.jump(jnp.concatenate([z_pre, f]))
            z_new = jnp.where(ok, z_new, z)
            carry = (z_new, t_new, jnp.where(ok, t, t_last), jnp.where(ok, du, dur_last))
            return carry, carry

        init = (z0, t_start, t_start, jnp.zeros((), F32))
        _, (zs, ts, tl, dl) = jax.lax.scan(step, init, (t_d, feats, valid, dur))
        # state just after the j-th valid dose (j = 0: the initial state), for branching off
        zs = jnp.concatenate([z0[None], zs])
        ts = jnp.concatenate([t_start[None], ts])
        tl = jnp.concatenate([t_start[None], tl])
        dl = jnp.concatenate([jnp.zeros((1,), F32), dl])

        def at(tq):
            j = jnp.sum(valid & (t_d < tq))  # doses strictly before tq (valid ones sort first)
            z = self._solve(zs[j], ts[j], jnp.maximum(tq, ts[j]), tl[j], dl[j])
            out = self.decoder(z)
            return out[0], jnp.clip(out[1], -9.0, 3.0)

        return jax.vmap(at)(query_t)

    # -- harness interface -----------------------------------------------------------------
    def _prior(self, study: Studies, target, obs_mask_target):
        n = study.ind_mask.shape[0]
        idx = jnp.arange(n)
        inds = jax.vmap(lambda j: _ind(study, j))(idx)
        h = jax.vmap(self.encode)(inds)
        c = self.context(h, study.ind_mask & (idx != target))
        tgt = _ind(study, target)
        tgt = dict(tgt, obs_mask=obs_mask_target)
        return self.z0_dist(self.encode(tgt), c), tgt

    def _draw(self, study, target, obs_mask_target, query_t, key, n):
        (mu, ls), tgt = self._prior(study, target, obs_mask_target)
        k1, k2 = jax.random.split(key)
        z0 = mu + jnp.exp(ls) * jax.random.normal(k1, (n,) + mu.shape, F32)
        m, lv = jax.vmap(lambda z: self.decode(z, tgt, query_t))(z0)
        return m, m + jnp.exp(0.5 * lv) * jax.random.normal(k2, m.shape, F32)

    def predictive_samples(self, study, target, obs_mask_target, query_t, key, n: int):
        """[n, Q] samples of log(y / C_s): z0 ~ p(z0 | observed samples, c), y ~ decoder."""
        return self._draw(study, target, obs_mask_target, query_t, key, n)[1]

    def generate_samples(self, study, target, t, key, n: int):
        """(m, y) [n, Q]: z0 ~ p(z0 | target dosing only, c); m noise-free, y = m + noise."""
        mask = jnp.zeros_like(study.obs_mask[target])
        return self._draw(study, target, mask, t, key, n)


def _ode_study_loss(model: LatentNeuralODE, study: Studies, target, n_early, key):
    n = study.ind_mask.shape[0]
    idx = jnp.arange(n)
    inds = jax.vmap(lambda j: _ind(study, j))(idx)
    h = jax.vmap(model.encode)(inds)
    h_prior = jax.vmap(model.encode)(dict(inds, obs_mask=jnp.zeros_like(inds["obs_mask"])))
    tgt = _ind(study, target)
    h_early = model.encode(dict(tgt, obs_mask=early_mask(tgt["obs_t"], tgt["obs_mask"], n_early)))
    c = model.context(h, study.ind_mask & (idx != target))
    q_mu, q_ls = jax.vmap(model.z0_dist, in_axes=(0, None))(h, c)
    p_mu, p_ls = jax.vmap(model.z0_dist, in_axes=(0, None))(h_prior, c)
    e_mu, e_ls = model.z0_dist(h_early, c)
    is_t = (idx == target)[:, None]
    p_mu, p_ls = jnp.where(is_t, e_mu[None], p_mu), jnp.where(is_t, e_ls[None], p_ls)
    z0 = q_mu + jnp.exp(q_ls) * jax.random.normal(key, q_mu.shape, F32)

    def one(z, ind):
        m, lv = model.decode(z, ind, ind["obs_t"])
        return gaussian_loglik(ind["obs_y"], ind["obs_cens"], ind["obs_mask"], m, lv)

    ll = jax.vmap(one)(z0, inds)
    kl = jax.vmap(_kl)(q_mu, q_ls, p_mu, p_ls)
    live = study.ind_mask
    n_obs = jnp.maximum(jnp.sum(study.obs_mask & live[:, None]), 1)
    nll = -jnp.sum(jnp.where(live, ll, 0.0)) / n_obs
    kl = jnp.sum(jnp.where(live, kl, 0.0)) / n_obs
    return nll + kl, (nll, kl)


def neural_ode_loss(model: LatentNeuralODE, studies: Studies, key):
    """Negative ELBO per sample (see module docstring), averaged over a raw batch."""
    return mean_study_loss(_ode_study_loss, model, studies, key, ("nll", "kl"))


__all__ = ["LatentNeuralODE", "PlainTransformer", "neural_ode_loss", "transformer_loss"]
