"""Natural-scale parameter values of a model, and their unconstrained vector form."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .models._model import Model


class ModelParams(eqx.Module):
    """Parameter values on the natural scale: `theta` and `sigma` dicts, `omega` matrix."""

    theta: dict
    omega: jax.Array
    sigma: dict

    def to_dict(self) -> dict:
        return {
            "theta": {k: float(v) for k, v in self.theta.items()},
            "omega": np.asarray(self.omega).tolist(),
            "sigma": {k: float(v) for k, v in self.sigma.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelParams:
        return cls(
            theta={k: jnp.asarray(v, float) for k, v in d["theta"].items()},
            omega=jnp.asarray(d["omega"], float).reshape(len(d["omega"]), -1),
            sigma={k: jnp.asarray(v, float) for k, v in d["sigma"].items()},
        )


def default_params(model: Model) -> ModelParams:
    """The model's initial values."""
    return ModelParams(
        theta={k: jnp.asarray(v, float) for k, v in model.theta.init_natural().items()},
        omega=jnp.asarray(model.omega.matrix_init()),
        sigma={k: jnp.asarray(v, float) for k, v in model.sigma.init_natural().items()},
    )


def pack(model: Model, params: ModelParams, estimate_omega: bool = True) -> jax.Array:
    """Unconstrained vector [theta free, omega free (Cholesky), sigma free]."""
    parts = [model.theta.to_unconstrained(params.theta)]
    if estimate_omega:
        parts.append(model.omega.to_unconstrained(params.omega))
    parts.append(model.sigma.to_unconstrained(params.sigma))
    return jnp.concatenate([jnp.reshape(p, -1) for p in parts])


def unpack(model: Model, u: jax.Array, omega_fixed=None) -> ModelParams:
    """Inverse of `pack`; with `omega_fixed` the Omega part is absent from `u`."""
    nt = len(model.theta.free_names)
    theta = model.theta.to_natural(u[:nt])
    i = nt
    if omega_fixed is None:
        no = model.omega.n_free()
        omega = model.omega.to_natural(u[i : i + no])
        i += no
    else:
        omega = jnp.asarray(omega_fixed)
    sigma = model.sigma.to_natural(u[i:])
    return ModelParams(theta=theta, omega=omega, sigma=sigma)
