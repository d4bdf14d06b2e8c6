"""Priors over random effects: the one seam every estimator and evaluator plugs into.

A prior is any object with `log_prob(eta)` (eta of shape `(..., n_eta)`, returns `(...)`) and
`sample(key, shape) -> (*shape, n_eta)`, like flowjax distributions. `Gaussian` is the NLME
default; learned priors (flows) come from `popkin.join`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp


class Gaussian(eqx.Module):
    r"""Multivariate normal prior $\eta \sim N(\mu, \Omega)$ given by `mean` and `cov`."""

    mean: jax.Array
    cov: jax.Array

    def __init__(self, cov, mean=None):
        cov = jnp.asarray(cov, float)
        self.cov = cov
        self.mean = jnp.zeros(cov.shape[-1]) if mean is None else jnp.asarray(mean, float)

    @property
    def dim(self) -> int:
        return int(self.cov.shape[-1])

    def log_prob(self, eta):
        L = jnp.linalg.cholesky(self.cov)
        d = jnp.asarray(eta) - self.mean
        z = jax.scipy.linalg.solve_triangular(L, d[..., None], lower=True)[..., 0]
        return (
            -0.5 * jnp.sum(z**2, axis=-1)
            - jnp.sum(jnp.log(jnp.diag(L)))
            - 0.5 * self.dim * jnp.log(2 * jnp.pi)
        )

    def sample(self, key, shape=()):
        L = jnp.linalg.cholesky(self.cov)
        z = jax.random.normal(key, (*shape, self.dim))
        return self.mean + z @ L.T


class Independent(eqx.Module):
    """Product of priors over disjoint blocks of eta (in order): `log p = sum_k log p_k`."""

    parts: tuple
    sizes: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, parts, sizes):
        self.parts = tuple(parts)
        self.sizes = tuple(int(s) for s in sizes)

    def log_prob(self, eta):
        eta = jnp.asarray(eta)
        out = 0.0
        i = 0
        for part, n in zip(self.parts, self.sizes, strict=True):
            out = out + part.log_prob(eta[..., i : i + n])
            i += n
        return out

    def sample(self, key, shape=()):
        keys = jax.random.split(key, len(self.parts))
        return jnp.concatenate(
            [p.sample(k, shape) for p, k in zip(self.parts, keys, strict=True)], axis=-1
        )
