"""The model specification users write, in the blocks pharmacometricians think in.

    class Theophylline(popkin.Model):
        theta = popkin.Params(tka=0.45, tcl=1.0, tv=3.45)          # fixed effects
        omega = popkin.Omega(eta_ka=0.6, eta_cl=0.3, eta_v=0.1)     # random effects (variances)
        sigma = popkin.Params(add_sd=popkin.Positive(0.7))          # residual parameters
        dynamics = popkin.OneCmtOral()                              # closed form or popkin.ODE

        def individual(self, th, eta, cov):                         # individual parameters
            return dict(ka=exp(th.tka + eta.eta_ka), cl=exp(th.tcl + eta.eta_cl),
                        v=exp(th.tv + eta.eta_v))

        def observe(self, p, sol, sg):                              # one entry per endpoint
            return {"cp": popkin.Normal(sol.central / p["v"], sg.add_sd)}

Each block sees only those above it. `th`, `eta`, `cov` and `sg` give values by attribute
(`th.tka`) or key (`th["tka"]`). `cov` holds each subject's baseline covariates (the first
record's values). Endpoints are matched to the data's DVID values by name when they are names,
otherwise by position (the k-th sorted DVID value is the k-th endpoint). A model may set
`prior` to any object with `log_prob(eta)` / `sample(key, shape)` to replace the Gaussian
`omega` prior (then held fixed in estimation).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from ..data._population import Subjects
from ._dynamics import AbstractDynamics, Solution
from ._error import Normal
from ._params import Omega, Params


class Namespace(dict):
    """A dict whose keys are also attributes (`ns.tka` is `ns["tka"]`)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no value named {name!r}; names are {list(self)}") from None


class Model:
    """Base class of popkin models (see the module docstring for the blocks)."""

    theta: ClassVar[Params] = Params()
    omega: ClassVar[Omega] = Omega()
    sigma: ClassVar[Params] = Params()
    dynamics: ClassVar[AbstractDynamics | None] = None
    prior: ClassVar[Any] = None

    def individual(self, th: Namespace, eta: Namespace, cov: Namespace) -> dict:
        raise NotImplementedError("a Model must define individual(self, th, eta, cov)")

    def observe(self, p: dict, sol: Solution | None, sg: Namespace) -> dict[str, Normal]:
        raise NotImplementedError("a Model must define observe(self, p, sol, sg)")

    # -- immutable edits -------------------------------------------------------------------
    def replace(self, **blocks: Any) -> Model:
        """A copy with some blocks replaced, e.g. `model.replace(theta=model.theta.fix(tcl=1))`."""
        new = copy.copy(self)
        for k, v in blocks.items():
            if k not in ("theta", "omega", "sigma", "dynamics", "prior"):
                raise KeyError(
                    f"cannot replace {k!r}; blocks are theta, omega, sigma, dynamics, prior"
                )
            object.__setattr__(new, k, v)
        return new

    def _key(self):
        return (
            type(self),
            *(id(getattr(self, b)) for b in ("theta", "omega", "sigma", "dynamics")),
        )

    def __eq__(self, other) -> bool:
        return isinstance(other, Model) and self._key() == other._key()

    def __hash__(self) -> int:
        # Instances of one class with the same blocks compile to the same programs.
        return hash(self._key())

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def eta_names(self) -> tuple[str, ...]:
        return self.omega.names

    def endpoints(self, cov_names: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Endpoint names (keys of `observe`), found by tracing one evaluation."""
        cached = self.__dict__.get("_endpoints")
        if cached is not None:
            return cached

        def probe():
            th = Namespace(self.theta.init_natural())
            sg = Namespace(self.sigma.init_natural())
            eta = Namespace({k: jnp.zeros(()) for k in self.eta_names})
            cov = Namespace({k: jnp.ones(()) for k in cov_names})
            p = self.individual(th, eta, cov)
            sol = None
            if self.dynamics is not None:
                sol = Solution(
                    self.dynamics.states, jnp.zeros((1, len(self.dynamics.states))), jnp.zeros(1)
                )
            return tuple(self.observe(p, sol, sg).keys())

        names = _trace_keys(probe)
        object.__setattr__(self, "_endpoints", names)
        return names

    def __repr__(self) -> str:
        return (
            f"{self.name}(theta={list(self.theta.names)}, eta={list(self.eta_names)}, "
            f"sigma={list(self.sigma.names)})"
        )


def _trace_keys(fn) -> tuple[str, ...]:
    out: list = []

    def wrapped():
        out.append(fn())
        return jnp.zeros(())

    try:
        jax.eval_shape(wrapped)
    except Exception:
        if not out:
            raise
    return out[0]


def endpoint_map(model: Model, data_endpoints: tuple, cov_names: tuple[str, ...] = ()) -> jax.Array:
    """Model endpoint index for each data endpoint index (DVID value)."""
    names = model.endpoints(cov_names)
    if all(isinstance(e, str) for e in data_endpoints) and set(data_endpoints) <= set(names):
        return jnp.asarray([names.index(e) for e in data_endpoints], jnp.int32)
    if len(data_endpoints) > len(names):
        raise ValueError(
            f"the data has {len(data_endpoints)} endpoints (DVID {list(data_endpoints)}) but model "
            f"{model.name} observes {len(names)} ({list(names)})."
        )
    return jnp.arange(len(data_endpoints), dtype=jnp.int32)


class Predictor:
    """Per-subject evaluation of a model: a pure function of (theta, sigma, eta, subject).

    Built once per (model, covariate names, endpoint map); everything it returns is
    JAX-traceable and vmappable over subjects.
    """

    def __init__(self, model: Model, cov_names: tuple[str, ...], emap):
        self.model = model
        self.cov_names = tuple(cov_names)
        self._emap = tuple(int(i) for i in emap)

    @property
    def emap(self) -> jax.Array:
        return jnp.asarray(self._emap, jnp.int32)

    def __eq__(self, other) -> bool:
        return isinstance(other, Predictor) and (self.model, self.cov_names, self._emap) == (
            other.model,
            other.cov_names,
            other._emap,
        )

    def __hash__(self) -> int:
        return hash((self.model, self.cov_names, self._emap))

    def individual(self, theta: dict, eta: jax.Array, subject: Subjects) -> dict:
        th = Namespace(theta)
        et = Namespace(dict(zip(self.model.eta_names, eta, strict=True)))
        cov = Namespace(dict(zip(self.cov_names, subject.cov0, strict=True)))
        return self.model.individual(th, et, cov)

    def distributions(
        self,
        theta: dict,
        sigma: dict,
        eta: jax.Array,
        subject: Subjects,
        with_transforms: bool = False,
    ):
        """Stacked per-record Gaussian (on the transformed scale) for each record's endpoint.

        Returns `(loc, scale, y, pred)`, each `(R,)`: `y = g(DV)`, `pred` the prediction on the
        DV scale (IPRED when eta is the EBE, PRED when eta = 0); with `with_transforms`, also
        `transforms`'s flags (from the same call: no second solve).
        """
        p = self.individual(theta, eta, subject)
        rec = subject.records
        sol = None
        if self.model.dynamics is not None:
            sol = self.model.dynamics.solve(
                p, subject.doses, rec.time, subject.resets, rows=rec.row
            )
        dists = list(self.model.observe(p, sol, Namespace(sigma)).values())
        idx = self.emap[rec.endpoint]
        R = rec.time.shape[0]

        def stack(f):
            return jnp.stack([jnp.broadcast_to(f(d), (R,)) for d in dists])  # (E, R)

        pick = lambda a: jnp.take_along_axis(a, idx[None, :], axis=0)[0]
        loc = pick(stack(lambda d: d.loc))
        scale = pick(stack(lambda d: d.scale))
        y = pick(stack(lambda d: d.transform(jnp.where(rec.obs, rec.dv, 1.0))))
        pred = pick(stack(lambda d: d.prediction))
        if with_transforms:
            flags = jnp.asarray([bool(d.log_transform) for d in dists])
            return loc, scale, y, pred, flags[idx]
        return loc, scale, y, pred

    def transforms(self, theta: dict, sigma: dict, subject: Subjects):
        """Per-record (log_transform flag) of each record's endpoint distribution (solves the
        model at eta = 0; `distributions(..., with_transforms=True)` gives them with a solve
        that is needed anyway)."""
        eta = jnp.zeros(len(self.model.eta_names))
        return self.distributions(theta, sigma, eta, subject, with_transforms=True)[4]

    def loglik(self, theta: dict, sigma: dict, eta: jax.Array, subject: Subjects) -> jax.Array:
        """`log p(y_i | eta_i, theta)`: sum over the subject's observations (M3 for CENS)."""
        loc, scale, y, _ = self.distributions(theta, sigma, eta, subject)
        rec = subject.records
        z = (y - loc) / scale
        from jax.scipy.special import log_ndtr

        dens = -0.5 * z**2 - jnp.log(scale) - 0.5 * jnp.log(2 * jnp.pi)
        ll = jnp.where(rec.cens == 1, log_ndtr(z), jnp.where(rec.cens == -1, log_ndtr(-z), dens))
        return jnp.sum(jnp.where(rec.obs, ll, 0.0))
