"""Several independently fitted endpoint models seen as one subject problem over the
concatenated random effects, with a joint prior. Structural parameters stay fixed at each
fit's estimates; only the prior couples the endpoints (seed 000, assumptions A1-A3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..nlme._objective import SubjectProblem, prior_value_grad_hess


class JointProblem:
    """Duck-types `SubjectProblem` for `find_mode`: params and subjects are tuples (one per
    endpoint model); eta is the concatenation of the models' random effects."""

    def __init__(self, problems: tuple[SubjectProblem, ...]):
        self.problems = tuple(problems)
        self.sizes = tuple(len(p.pred.model.eta_names) for p in self.problems)
        self.method = "laplace"

    def __eq__(self, other) -> bool:
        return isinstance(other, JointProblem) and self.problems == other.problems

    def __hash__(self) -> int:
        return hash(self.problems)

    def split(self, eta):
        out, i = [], 0
        for n in self.sizes:
            out.append(eta[..., i : i + n])
            i += n
        return out

    def _fixed_logscale(self, params, subj):
        return tuple(
            p._fixed_logscale(pa, s) for p, pa, s in zip(self.problems, params, subj, strict=True)
        )

    def data_nll(self, params, eta, subj, ls0=None):
        """Sum over endpoints of the negative log-likelihood (without 0.5 log 2 pi per obs)."""
        ls0 = ls0 if ls0 is not None else (None,) * len(self.problems)
        total = 0.0
        for p, pa, e, s, l0 in zip(self.problems, params, self.split(eta), subj, ls0, strict=True):
            total = total + jnp.sum(p.data_terms(pa, e, s, l0))
        return total

    def f(self, params, prior, eta, subj, ls0=None):
        return self.data_nll(params, eta, subj, ls0) - prior.log_prob(eta)

    def value_grad_and_gn(self, params, prior, eta, subj, ls0=None):
        """`f`, its gradient and its Gauss-Newton curvature from one forward-mode pass per
        endpoint (block-diagonal data curvature plus the prior's exact Hessian)."""
        ls0 = ls0 if ls0 is not None else (None,) * len(self.problems)
        v, gs, Hs = 0.0, [], []
        for p, pa, e, s, l0 in zip(self.problems, params, self.split(eta), subj, ls0, strict=True):
            vi, g, H = p.data_grad_and_gn(pa, e, s, l0, value=True)
            v = v + vi
            gs.append(g)
            Hs.append(H)
        lp, gp, Hp = prior_value_grad_hess(prior, eta)
        H = jax.scipy.linalg.block_diag(*Hs) - Hp
        return v - lp, jnp.concatenate(gs) - gp, H

    def grad_and_gn(self, params, prior, eta, subj, ls0=None):
        return self.value_grad_and_gn(params, prior, eta, subj, ls0)[1:]

    def n_obs(self, subj):
        return sum(jnp.sum(s.records.obs) for s in subj)
