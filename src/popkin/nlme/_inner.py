r"""Per-subject modes of the random effects (empirical Bayes estimates), batched over subjects.

Two phases, each taking one model evaluation per iteration (so that under `jax.vmap`, where
every subject pays for the slowest, an iteration costs one batched evaluation):

1. Gauss-Newton: at a trial point $\eta + a d$ one forward-mode pass gives $f$, $\nabla f$
   and the Gauss-Newton curvature $H_{GN}$; the step is accepted by the Armijo test (with a
   rounding allowance of a few ulps of $f$), else $a$ shrinks by safeguarded quadratic
   interpolation. The first iteration evaluates the start. It hands over to phase 2 once
   $\max|\nabla f| <$ `handover_gtol` $\max(1, |f|)$ (default 1e-5: Gauss-Newton converges
   only linearly, Newton with the exact Hessian that phase 2 computes anyway takes the last
   four or more digits in one step), or after slow accepted steps (damped, or contracting
   $\max|\nabla f|$ by less than 2x): two in a row near the mode or with a tiny decrease of
   $f$, four where $\max|\nabla f| < \max(1, |f|)$ (large-residual subjects, where $H_{GN}$
   misses the residual term).
2. Newton with a lazily refreshed exact Hessian: the exact $H$ (forward over forward, which
   also gives $f$ and $\nabla f$) is computed at the current point and reused for chord steps
   $d = -|H|^{-1}\nabla f$ (the Gauss-Newton pass, for value and gradient) while they contract
   the gradient at least 4x; otherwise, or when the mode has moved more than `hess_xtol` from
   where $H$ was taken, $H$ is recomputed. $|H|$ takes absolute eigenvalues (saddle-free
   Newton), so an indefinite $H$ far from the mode still gives a descent direction of
   sensible length. A typical subject costs one exact Hessian and one chord step.

The returned Hessian is exact at a point within `hess_xtol` (default 1e-4, max norm,
unconstrained eta scale) of the returned mode (in practice the last chord step is far
shorter: its length is about $|H^{-1}\nabla f|$ at `handover_gtol`); the returned gradient
norm is exact at the mode, and below `newton_gtol` relative when converged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._objective import SubjectProblem, _value_grad_hess

_ROUND = 1e-14  # Armijo rounding allowance, relative to max(1, |f|)


class ModeResult(NamedTuple):
    eta: jax.Array  # (n_eta,) mode
    f: jax.Array  # inner objective at the mode
    grad_norm: jax.Array  # max |grad f| at the mode
    hessian: jax.Array  # exact Hessian of f at the mode (n_eta, n_eta)
    hess_inv: jax.Array  # its inverse (pseudo-inverse if not PD)
    converged: jax.Array  # bool
    iterations: jax.Array  # model evaluations with derivatives (GN, chord and Hessian)


def _solve_pd(H, g):
    r"""Solve $|H| d = g$, $|H| = V \max(|\Lambda|, \epsilon) V^T$ (saddle-free Newton): where
    the exact Hessian is indefinite, far from the mode, a negative-curvature direction is
    followed downhill with its own curvature as the scale instead of a near-infinite step
    (flooring negative eigenvalues at a tiny $\epsilon$ makes such steps fail the line search
    until the step length underflows). Unchanged where $H$ is positive definite."""
    w, V = jnp.linalg.eigh(0.5 * (H + H.T))
    aw = jnp.abs(w)
    w = jnp.maximum(aw, 1e-8 * jnp.maximum(jnp.max(aw), 1.0))
    return V @ ((V.T @ g) / w)


def _gmax(g):
    return jnp.max(jnp.abs(g)) if g.shape[0] else jnp.asarray(0.0)


def _accept(f, ft, g, gt, a, slope):
    """Armijo (with a rounding allowance), or, at the noise floor of an ODE solution where f
    cannot resolve the decrease, a step that halves max|grad f| and raises f by < 1e-9 |f|."""
    s = jnp.maximum(1.0, jnp.abs(f))
    armijo = ft <= f + 1e-4 * a * slope + _ROUND * s
    flat = (_gmax(gt) < 0.5 * _gmax(g)) & (ft <= f + 1e-9 * s)
    return jnp.isfinite(ft) & jnp.all(jnp.isfinite(gt)) & (armijo | flat)


def _shrink(a, f, ft, slope):
    """Backtracking step: minimiser of the quadratic through f, slope and ft, in [a/10, a/2]."""
    curv = ft - f - slope * a
    aq = -slope * a**2 / (2.0 * jnp.where(curv > 0, curv, 1.0))
    aq = jnp.where((curv > 0) & jnp.isfinite(ft), aq, 0.25 * a)
    return jnp.clip(aq, 0.1 * a, 0.5 * a)


def find_mode(
    problem: SubjectProblem,
    params,
    prior,
    eta0,
    subj,
    *,
    max_iter: int = 40,
    gtol: float = 1e-2,
    newton_iter: int = 10,
    newton_gtol: float = 1e-9,
    max_hessians: int = 10,
    hess_xtol: float = 1e-4,
    handover_gtol: float = 1e-5,
    check_start: bool = True,
) -> ModeResult:
    """The mode of `f_i` from `eta0` for one subject (vmap over subjects).

    Converged means `max|grad f| < newton_gtol * max(1, |f|)` at the returned mode (reported
    as `converged` at the looser 1e-5 relative level, with a finite `f` and a PD Hessian).
    `max_iter` caps Gauss-Newton iterations; below `max|grad f| < gtol * max(1, |f|)` a
    slowly contracting Gauss-Newton phase hands over to Newton. `newton_iter` caps chord
    steps per Hessian, `max_hessians` the exact Hessians. `check_start`: restart from zero
    where `f(eta0)` is not finite (skip it when `eta0` is zero).
    """
    ls0 = problem._fixed_logscale(params, subj)
    fun = lambda e: problem.f(params, prior, e, subj, ls0)
    gn = lambda e: problem.value_grad_and_gn(params, prior, e, subj, ls0)
    scale = lambda f: jnp.maximum(1.0, jnp.abs(jnp.where(jnp.isfinite(f), f, 1.0)))
    amin = 1e-10

    # -- phase 1: Gauss-Newton ------------------------------------------------------------
    # The first iteration evaluates the start point itself (trial step 0, accepted): the
    # Gauss-Newton pass is traced, and compiled, once. With `check_start`, a start where f is
    # not finite is replaced by zero, evaluated in the next iteration.
    def gn_cond(c):
        return ~c["stop"] & (c["k"] < max_iter + 1 + c["restarted"])

    def gn_body(c):
        eta, f, g, d, a, first = c["eta"], c["f"], c["g"], c["d"], c["a"], c["first"]
        slope = g @ d
        ft, gt, Ht = gn(eta + a * d)
        restart = first & check_start & ~c["restarted"] & ~jnp.isfinite(ft)
        ok = (first | _accept(f, ft, g, gt, a, slope)) & ~restart
        eta = jnp.where(ok, eta + a * d, eta)
        f_new = jnp.where(ok, ft, f)
        g_new = jnp.where(ok, gt, g)
        H_new = jnp.where(ok, Ht, c["H"])
        a = jnp.where(ok, 1.0, _shrink(a, f, ft, slope))
        d = jnp.where(ok, -_solve_pd(H_new, g_new), d)
        gm, gm_old = _gmax(g_new), _gmax(g)
        # Slow: an accepted step that was damped or contracted the gradient < 2x (the GN
        # curvature is poor); rejected trial points only shrink the step.
        slow_step = ~first & ((c["a"] < 1.0) | (gm > 0.5 * gm_old))
        slow = jnp.where(ok, jnp.where(slow_step, c["slow"] + 1, 0), c["slow"])
        near = gm < gtol * scale(f_new)
        tiny = ~first & ((f - f_new) < 1e-6 * scale(f))
        conv = gm < handover_gtol * scale(f_new)
        stop = (
            conv
            | ((slow >= 2) & (near | tiny))
            | ((slow >= 4) & (gm < scale(f_new)))
            | (a < amin)
            | (first & ~jnp.isfinite(f_new))
        )
        return dict(
            eta=jnp.where(restart, jnp.zeros_like(eta), eta),
            f=f_new,
            g=g_new,
            H=H_new,
            d=d,
            a=jnp.where(restart, 0.0, a),
            k=c["k"] + 1,
            slow=slow,
            stop=stop & ~restart,
            first=restart,
            restarted=c["restarted"] | restart,
        )

    n = eta0.shape[0]
    z = jnp.zeros_like(eta0)
    c = dict(eta=eta0, f=jnp.zeros((), eta0.dtype), g=z, H=jnp.zeros((n, n), eta0.dtype), d=z)
    c = c | dict(a=jnp.asarray(0.0, eta0.dtype), k=0, slow=0, stop=False, first=True)
    c = c | dict(restarted=False)
    c = jax.lax.while_loop(gn_cond, gn_body, c)

    # -- phase 2: Newton, exact Hessian refreshed lazily, chord steps in between -----------
    def chord_cond(s):
        return ~s["conv"] & ~s["slow"] & (s["acc"] < newton_iter) & (s["a"] >= amin)

    def chord_body(s):
        eta, f, g, d, a, H = s["eta"], s["f"], s["g"], s["d"], s["a"], s["H"]
        slope = g @ d
        ft, gt, _ = gn(eta + a * d)  # the Gauss-Newton pass: no other copy of the model
        ok = _accept(f, ft, g, gt, a, slope)
        eta = jnp.where(ok, eta + a * d, eta)
        f_new = jnp.where(ok, ft, f)
        g_new = jnp.where(ok, gt, g)
        a = jnp.where(ok, 1.0, _shrink(a, f, ft, slope))
        d = jnp.where(ok, -_solve_pd(H, g_new), d)
        gm = _gmax(g_new)
        return s | dict(
            eta=eta,
            f=f_new,
            g=g_new,
            d=d,
            a=a,
            i=s["i"] + 1,
            acc=s["acc"] + ok,
            conv=gm < newton_gtol * scale(f_new),
            slow=ok & (gm > 0.25 * _gmax(g)),
        )

    def newton_cond(s):
        return ~s["done"] & (s["r"] < max_hessians)

    def newton_body(s):
        eta = s["eta"]
        f, g, H = _value_grad_hess(fun, eta)
        conv = _gmax(g) < newton_gtol * scale(f)
        z = dict(eta=eta, f=f, g=g, H=H, d=-_solve_pd(H, g), a=jnp.asarray(1.0), i=0)
        z = jax.lax.while_loop(chord_cond, chord_body, z | dict(conv=conv, slow=False, acc=0))
        moved = _gmax(z["eta"] - eta)
        # A fresh Hessian cannot help when no step was accepted, or when the only accepted
        # step, tiny, did not contract the gradient (the noise floor of an ODE solution).
        stuck = ~z["conv"] & ((z["a"] < amin) | ((z["acc"] == 1) & (moved <= hess_xtol)))
        done = (z["conv"] & (moved <= hess_xtol)) | stuck | ~jnp.isfinite(z["f"])
        return dict(
            eta=z["eta"],
            f=z["f"],
            g=z["g"],
            H=H,
            eta_H=eta,
            r=s["r"] + 1,
            n=s["n"] + z["i"],
            done=done,
        )

    s = dict(eta=c["eta"], f=c["f"], g=c["g"], H=c["H"], eta_H=c["eta"], r=0, n=0)
    s = jax.lax.while_loop(newton_cond, newton_body, s | dict(done=False))
    eta, f, g, H = s["eta"], s["f"], s["g"], s["H"]
    w, V = jnp.linalg.eigh(H)
    pd = jnp.all(w > 0)
    Hinv = V @ jnp.diag(1.0 / jnp.where(w > 0, w, jnp.inf)) @ V.T
    gnorm = _gmax(g)
    fresh = _gmax(eta - s["eta_H"]) <= hess_xtol
    converged = jnp.isfinite(f) & pd & fresh & (gnorm < 1e-5 * scale(f))
    return ModeResult(eta, f, gnorm, H, Hinv, converged, c["k"] + s["r"] + s["n"])
