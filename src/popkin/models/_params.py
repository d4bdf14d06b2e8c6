"""Parameter blocks of a model: fixed effects (`Params`), random effects (`Omega`).

Values are given on the natural scale and estimated on an unconstrained scale:
`Positive` through log, `Bounded(lower, upper)` through logit, plain values unconstrained,
`Fixed` not estimated. Omega is parameterised by the Cholesky factor of each block with a
log-diagonal, so every unconstrained vector maps to a valid covariance matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Real:
    """An unconstrained real parameter with initial value `init`."""

    init: float

    def to_unconstrained(self, x):
        return x

    def to_natural(self, u):
        return u


@dataclass(frozen=True)
class Positive(Real):
    """A positive parameter (estimated on the log scale)."""

    def __post_init__(self):
        if not self.init > 0:
            raise ValueError(f"Positive parameter needs a positive initial value, got {self.init}.")

    def to_unconstrained(self, x):
        return jnp.log(x)

    def to_natural(self, u):
        return jnp.exp(u)


@dataclass(frozen=True)
class Bounded(Real):
    """A parameter in the open interval (`lower`, `upper`) (estimated on the logit scale)."""

    lower: float = 0.0
    upper: float = 1.0

    def __post_init__(self):
        if not self.lower < self.init < self.upper:
            raise ValueError(
                f"Bounded parameter needs lower < init < upper, got {self.lower}, {self.init}, "
                f"{self.upper}."
            )

    def to_unconstrained(self, x):
        z = (x - self.lower) / (self.upper - self.lower)
        return jnp.log(z) - jnp.log1p(-z)

    def to_natural(self, u):
        return self.lower + (self.upper - self.lower) / (1.0 + jnp.exp(-u))


@dataclass(frozen=True)
class Fixed(Real):
    """A parameter held at `init` (not estimated), like NONMEM's FIX."""


def _as_spec(value: Any) -> Real:
    if isinstance(value, Real):
        return value
    return Real(float(value))


class Params:
    """An ordered block of named scalar parameters, e.g. `Params(tka=0.45, tcl=Positive(1.0))`.

    Plain numbers are unconstrained; use `Positive`, `Bounded` or `Fixed` to say more.
    """

    def __init__(self, **values: Any):
        self.specs: dict[str, Real] = {k: _as_spec(v) for k, v in values.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.specs)

    @property
    def free_names(self) -> tuple[str, ...]:
        return tuple(k for k, s in self.specs.items() if not isinstance(s, Fixed))

    def init_natural(self) -> dict[str, float]:
        return {k: s.init for k, s in self.specs.items()}

    def to_unconstrained(self, natural: dict[str, Any]) -> jnp.ndarray:
        """Vector of the free parameters on the unconstrained scale."""
        return jnp.asarray(
            [
                self.specs[k].to_unconstrained(jnp.asarray(natural[k], float))
                for k in self.free_names
            ]
        ).reshape(-1)

    def to_natural(self, u) -> dict[str, Any]:
        """Dict of all parameters on the natural scale from the free unconstrained vector."""
        out: dict[str, Any] = {}
        i = 0
        for k, s in self.specs.items():
            if isinstance(s, Fixed):
                out[k] = jnp.asarray(s.init, float)
            else:
                out[k] = s.to_natural(u[i])
                i += 1
        return out

    def replace(self, **values: Any) -> Params:
        """A copy with some specs replaced (immutable edit)."""
        new = Params()
        new.specs = dict(self.specs)
        for k, v in values.items():
            if k not in new.specs:
                raise KeyError(f"no parameter {k!r}; parameters are {list(self.specs)}")
            new.specs[k] = _as_spec(v)
        return new

    def fix(self, **values: Any) -> Params:
        """A copy with the named parameters fixed at the given values."""
        return self.replace(**{k: Fixed(float(v)) for k, v in values.items()})

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"Params({', '.join(f'{k}={s!r}' for k, s in self.specs.items())})"


class Omega:
    """Covariance of the random effects (variances on the diagonal, as NONMEM's $OMEGA).

    `Omega(eta_ka=0.6, eta_cl=0.3)` is diagonal (each eta its own block);
    `Omega.block(["eta_cl", "eta_v"], [[0.1, 0.01], [0.01, 0.1]])` a full block;
    `Omega.diagonal(...).full()` one full block over all etas (initial covariances zero);
    `Omega.combine(a, b)` block-diagonal. `fixed=True` holds a block at its value.
    """

    def __init__(self, _blocks=None, **variances: float):
        if _blocks is not None:
            self.blocks = list(_blocks)
        else:
            self.blocks = [((k,), np.array([[float(v)]]), False) for k, v in variances.items()]
        for names, cov, _ in self.blocks:
            if not np.all(np.linalg.eigvalsh(cov) > 0):
                raise ValueError(f"Omega block {names} is not positive definite: {cov.tolist()}")

    @classmethod
    def block(cls, names, cov, fixed: bool = False) -> Omega:
        cov = np.asarray(cov, float)
        if cov.shape != (len(names), len(names)):
            raise ValueError(
                f"Omega block for {list(names)} needs a {len(names)}x{len(names)} matrix."
            )
        return cls(_blocks=[(tuple(names), cov, fixed)])

    @classmethod
    def combine(cls, *omegas: Omega) -> Omega:
        return cls(_blocks=[b for o in omegas for b in o.blocks])

    def full(self) -> Omega:
        """One full block over all random effects, starting from the current matrix."""
        return Omega.block(self.names, self.matrix_init())

    def fix(self) -> Omega:
        return Omega(_blocks=[(n, c, True) for n, c, _ in self.blocks])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for names, _, _ in self.blocks for n in names)

    @property
    def n(self) -> int:
        return len(self.names)

    def matrix_init(self) -> np.ndarray:
        m = np.zeros((self.n, self.n))
        i = 0
        for names, cov, _ in self.blocks:
            k = len(names)
            m[i : i + k, i : i + k] = cov
            i += k
        return m

    def _free_blocks(self):
        return [(names, cov) for names, cov, fixed in self.blocks if not fixed]

    def n_free(self) -> int:
        return sum(len(n) * (len(n) + 1) // 2 for n, _ in self._free_blocks())

    def to_unconstrained(self, matrix) -> jnp.ndarray:
        """Free block Cholesky factors (log diagonal, lower triangle row-wise) as one vector."""
        out = []
        i = 0
        matrix = jnp.asarray(matrix)
        for names, _, fixed in self.blocks:
            k = len(names)
            if not fixed:
                L = jnp.linalg.cholesky(matrix[i : i + k, i : i + k])
                rows, cols = np.tril_indices(k)
                vals = L[rows, cols]
                vals = jnp.where(rows == cols, jnp.log(jnp.where(rows == cols, vals, 1.0)), vals)
                out.append(vals)
            i += k
        return jnp.concatenate(out) if out else jnp.zeros(0)

    def cholesky(self, u) -> jnp.ndarray:
        """Lower Cholesky factor of the full (block-diagonal) Omega from the free vector."""
        L = jnp.zeros((self.n, self.n))
        i = 0
        j = 0
        for names, cov, fixed in self.blocks:
            k = len(names)
            if fixed:
                Lb = jnp.asarray(np.linalg.cholesky(cov))
            else:
                m = k * (k + 1) // 2
                rows, cols = np.tril_indices(k)
                vals = u[j : j + m]
                vals = jnp.where(rows == cols, jnp.exp(vals), vals)
                Lb = jnp.zeros((k, k)).at[rows, cols].set(vals)
                j += m
            L = L.at[i : i + k, i : i + k].set(Lb)
            i += k
        return L

    def to_natural(self, u) -> jnp.ndarray:
        L = self.cholesky(u)
        return L @ L.T

    def __repr__(self) -> str:
        return f"Omega({[(list(n), c.tolist(), f) for n, c, f in self.blocks]})"
