r"""Per-subject objectives: the inner (mode) objective and the FO/FOCE/FOCE-I/Laplace OFV.

For subject $i$ with random effects $\eta$, every error model is Gaussian on a transformed
scale, $g(y_j) \sim N(\mathrm{loc}_j(\eta), \mathrm{scale}_j(\eta)^2)$. The inner objective is
the full negative log joint (up to the $\tfrac12 N_i\log 2\pi$ data constant)

$$f_i(\eta) = \tfrac12\sum_j \big[r_j^2 + 2\log \mathrm{scale}_j\big]
             - \sum_{\text{cens}} \log\Phi(\pm z_j) - \log p(\eta),$$

and the contribution to the objective function value (NONMEM convention: -2 log-likelihood
without the $N\log 2\pi$ constant) is the Laplace approximation

$$\mathrm{OFV}_i = 2 f_i(\hat\eta) + \log\det H_i - n_\eta \log 2\pi,$$

with $H_i$ the Gauss-Newton (expected information) curvature for FOCE/FOCE-I and the exact
Hessian for Laplace. FOCE (no interaction) evaluates the residual scale at $\eta = 0$. FO
linearises the predictions at $\eta = 0$ and integrates exactly. For a Gaussian prior
$-2\log p(\hat\eta) - n_\eta\log 2\pi = \hat\eta^T\Omega^{-1}\hat\eta + \log|\Omega|$.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from ..data._population import Subjects
from ..models._model import Predictor

LOG_2PI = float(jnp.log(2 * jnp.pi))
METHODS = ("fo", "foce", "focei", "laplace")


def _terms(loc, ls, y, rec):
    """Per-record negative log-likelihood terms from (loc, log scale, g(y)); 0 if unobserved."""
    z = (y - loc) / jnp.exp(ls)
    dens = 0.5 * z**2 + ls
    cens = jnp.where(rec.cens == 1, -log_ndtr(z), -log_ndtr(-z))
    term = jnp.where(rec.cens == 0, dens, cens)
    return jnp.where(rec.obs, term, 0.0)


def _value_grad(fun, eta):
    """`f(eta)` and its gradient by forward mode (one pass, n_eta tangents)."""
    n = eta.shape[0]
    if n == 0:
        return fun(eta), jnp.zeros_like(eta)
    fs, gs = jax.vmap(lambda v: jax.jvp(fun, (eta,), (v,)))(jnp.eye(n, dtype=eta.dtype))
    return fs[0], gs


def _value_grad_hess(fun, eta):
    """`f`, gradient and exact (symmetrised) Hessian by forward over forward mode."""

    def vg(e):
        f, g = _value_grad(fun, e)
        return g, (f, g)

    H, (f, g) = jax.jacfwd(vg, has_aux=True)(eta)
    return f, g, 0.5 * (H + H.T)


def prior_value_grad_hess(prior, eta):
    """`log p(eta)`, its gradient and Hessian from one forward-over-reverse pass (the prior,
    e.g. a normalising flow, is traced once rather than once per quantity)."""

    def grad_aux(e):
        lp, g = jax.value_and_grad(prior.log_prob)(e)
        return g, (lp, g)

    H, (lp, g) = jax.jacfwd(grad_aux, has_aux=True)(eta)
    return lp, g, H


class SubjectProblem:
    """Closures of one model for one method; all functions are per subject and vmappable.

    `params` is a `ModelParams`; `prior` has `log_prob`.
    """

    def __init__(self, predictor: Predictor, method: str):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.pred = predictor
        self.method = method
        self.interaction = method in ("focei", "laplace")

    def __eq__(self, other) -> bool:
        return isinstance(other, SubjectProblem) and (self.pred, self.method) == (
            other.pred,
            other.method,
        )

    def __hash__(self) -> int:
        return hash((self.pred, self.method))

    # -- model pieces ------------------------------------------------------------------------
    def loc_logscale(self, params, eta, subj: Subjects):
        loc, scale, y, _ = self.pred.distributions(params.theta, params.sigma, eta, subj)
        return loc, jnp.log(scale), y

    def _fixed_logscale(self, params, subj):
        """log scale at eta = 0 (FOCE without interaction), else None."""
        if self.interaction:
            return None
        n = len(self.pred.model.eta_names)
        return self.loc_logscale(params, jnp.zeros(n), subj)[1]

    def data_terms(self, params, eta, subj, ls0=None):
        """Per-record negative log-likelihood terms (0 where not observed)."""
        loc, ls, y = self.loc_logscale(params, eta, subj)
        return _terms(loc, ls if ls0 is None else ls0, y, subj.records)

    def f(self, params, prior, eta, subj, ls0=None):
        """Inner objective `f_i(eta)` (scalar)."""
        return jnp.sum(self.data_terms(params, eta, subj, ls0)) - prior.log_prob(eta)

    def grad_and_gn(self, params, prior, eta, subj, ls0=None):
        """Gradient of `f` and its Gauss-Newton curvature (PSD for the data part)."""
        return self.value_grad_and_gn(params, prior, eta, subj, ls0)[1:]

    def value_grad_and_gn(self, params, prior, eta, subj, ls0=None):
        """`f`, its gradient and its Gauss-Newton curvature from one forward-mode pass."""
        v, g, H = self.data_grad_and_gn(params, eta, subj, ls0, value=True)
        lp, gp, Hp = prior_value_grad_hess(prior, eta)
        return v - lp, g - gp, H - Hp

    def data_grad_and_gn(self, params, eta, subj, ls0=None, value=False):
        """Gradient and Gauss-Newton curvature of the data part of `f` (no prior); with
        `value=True` also the data part itself, first."""

        def outs(e):
            loc, ls, y = self.loc_logscale(params, e, subj)
            return (loc, ls), (loc, ls, y)

        (Jl, Js), (loc, ls, y) = jax.jacfwd(outs, has_aux=True)(eta)
        rec = subj.records
        if ls0 is not None:
            ls = ls0
            Js = jnp.zeros_like(Js)
        scale = jnp.exp(ls)
        z = (y - loc) / scale
        unc = rec.obs & (rec.cens == 0)
        cen = rec.obs & (rec.cens != 0)
        # Uncensored: d/dloc = -z/scale, d/dls = 1 - z^2; GN weights 1/scale^2 and 2.
        gl = jnp.where(unc, -z / scale, 0.0)
        gs = jnp.where(unc, 1.0 - z**2, 0.0)
        wl = jnp.where(unc, 1.0 / scale**2, 0.0)
        ws = jnp.where(unc, 2.0, 0.0)
        # Censored (M3): c = -log Phi(s z), s = +1 below, -1 above; exact d2c/dloc2 >= 0.
        s = jnp.where(rec.cens == 1, 1.0, -1.0)
        lphi = log_ndtr(s * z)
        ratio = jnp.exp(-0.5 * z**2 - 0.5 * LOG_2PI - lphi)  # phi(sz)/Phi(sz)
        dc_dz = -s * ratio
        d2c_dz2 = ratio * (s * z + ratio)
        gl = gl + jnp.where(cen, dc_dz * (-1.0 / scale), 0.0)
        gs = gs + jnp.where(cen, dc_dz * (-z), 0.0)
        wl = wl + jnp.where(cen, d2c_dz2 / scale**2, 0.0)
        g = Jl.T @ gl + Js.T @ gs
        H = (Jl * wl[:, None]).T @ Jl + (Js * ws[:, None]).T @ Js
        if value:
            return jnp.sum(_terms(loc, ls, y, rec)), g, H
        return g, H

    def exact_hessian(self, params, prior, eta, subj, ls0=None):
        fe = lambda e: self.f(params, prior, e, subj, ls0)
        return jax.jacfwd(jax.jacfwd(fe))(eta)

    # -- OFV ---------------------------------------------------------------------------------
    def ofv(self, params, prior, eta_hat, Hinv, subj):
        """`OFV_i` at the mode, differentiable in `params` with the exact implicit derivative.

        `eta_hat` and `Hinv` (inverse exact Hessian at the mode) are constants; the Newton
        correction `eta = eta_hat - Hinv grad f(eta_hat)` leaves the value unchanged at a mode
        and carries `d eta_hat / d params` exactly.
        """
        if self.method == "fo":
            return self.ofv_fo(params, subj)
        ls0 = self._fixed_logscale(params, subj)
        fe = lambda e: self.f(params, prior, e, subj, ls0)
        g = jax.jacfwd(fe)(eta_hat)
        eta = eta_hat - jax.lax.stop_gradient(Hinv) @ g
        # f and the curvature at eta from one pass (one traced copy of the model).
        if self.method == "laplace":
            f, _, H = _value_grad_hess(fe, eta)
        else:
            f, _, H = self.value_grad_and_gn(params, prior, eta, subj, ls0)
        sign, logdet = jnp.linalg.slogdet(H)
        logdet = jnp.where(sign > 0, logdet, jnp.nan)
        return 2.0 * f + logdet - eta.shape[0] * LOG_2PI

    def ofv_fo(self, params, subj):
        """FO: `log|C| + r^T C^{-1} r`, `C = G Omega G^T + diag(scale0^2)`, at eta = 0."""
        n = len(self.pred.model.eta_names)
        e0 = jnp.zeros(n)
        loc, ls, y = self.loc_logscale(params, e0, subj)
        G = jax.jacfwd(lambda e: self.loc_logscale(params, e, subj)[0])(e0)
        obs = subj.records.obs
        r = jnp.where(obs, y - loc, 0.0)
        G = jnp.where(obs[:, None], G, 0.0)
        V = jnp.where(obs, jnp.exp(2 * ls), 1.0)
        C = G @ params.omega @ G.T + jnp.diag(V)
        L = jnp.linalg.cholesky(C)
        w = jax.scipy.linalg.solve_triangular(L, r, lower=True)
        return 2.0 * jnp.sum(jnp.log(jnp.diag(L))) + jnp.sum(w**2)
