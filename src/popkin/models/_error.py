"""Observation (residual error) models.

Every error model is Gaussian on a transformed scale: `g(DV) ~ N(loc, scale^2)` with `g` the
identity (`Normal`) or `log` (`LogNormal`, NONMEM's log-transform-both-sides). That shared form
is what FO/FOCE/FOCE-I linearise. Below-limit observations (CENS=1, M3) contribute
`log Phi((g(LLOQ) - loc) / scale)`.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

_LOG_2PI = float(jnp.log(2 * jnp.pi))


class Normal(eqx.Module):
    """`DV ~ N(mean, sd^2)`; `mean` is also the prediction (IPRED)."""

    loc: jax.Array
    scale: jax.Array
    log_transform: ClassVar[bool] = False

    def __init__(self, mean, sd):
        self.loc = jnp.asarray(mean, float)
        self.scale = jnp.broadcast_to(jnp.asarray(sd, float), self.loc.shape)

    def transform(self, y):
        """`g(y)`: the scale on which the model is Gaussian."""
        return y

    @property
    def prediction(self):
        """The prediction on the DV scale (IPRED)."""
        return self.loc

    def log_prob(self, y, cens=0):
        """Log density of `y` (cens=0) or log probability of being below (1) / above (-1) `y`."""
        z = (self.transform(y) - self.loc) / self.scale
        dens = -0.5 * z**2 - jnp.log(self.scale) - 0.5 * _LOG_2PI
        below = log_ndtr(z)
        above = log_ndtr(-z)
        return jnp.where(cens == 1, below, jnp.where(cens == -1, above, dens))

    def sample(self, key):
        return self.untransform(self.loc + self.scale * jax.random.normal(key, self.loc.shape))

    def untransform(self, z):
        return z


class LogNormal(Normal):
    """`log(DV) ~ N(log(median), sd^2)` (exponential error / log-transform-both-sides)."""

    log_transform: ClassVar[bool] = True

    def __init__(self, median, sd):
        self.loc = jnp.log(jnp.maximum(jnp.asarray(median, float), 1e-300))
        self.scale = jnp.broadcast_to(jnp.asarray(sd, float), self.loc.shape)

    def transform(self, y):
        return jnp.log(jnp.maximum(y, 1e-300))

    @property
    def prediction(self):
        return jnp.exp(self.loc)

    def untransform(self, z):
        return jnp.exp(z)


def additive(f, sd) -> Normal:
    """`DV = f + eps`, `eps ~ N(0, sd^2)`."""
    return Normal(f, sd)


def proportional(f, sd) -> Normal:
    """`DV = f (1 + eps)`, `eps ~ N(0, sd^2)`: standard deviation `sd * |f|`."""
    return Normal(f, sd * jnp.abs(f))


def combined(f, add_sd, prop_sd) -> Normal:
    """`DV = f + f eps1 + eps2`: standard deviation `sqrt(add_sd^2 + prop_sd^2 f^2)`."""
    return Normal(f, jnp.sqrt(add_sd**2 + (prop_sd * f) ** 2))


def exponential(f, sd) -> LogNormal:
    """`DV = f exp(eps)`: Gaussian on the log scale with standard deviation `sd`."""
    return LogNormal(f, sd)
