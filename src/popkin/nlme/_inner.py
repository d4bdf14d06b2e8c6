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

import equinox.internal as eqxi
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

    # Rounds: round 0 is the Gauss-Newton phase; every later round takes an exact Hessian at
    # the current point and then chord steps with it. Both phases run in one first-order loop
    # (one traced copy of the Gauss-Newton pass, which gives the trial point's value, gradient
    # and curvature; chord steps ignore the curvature), and the Hessian is under a `cond` on
    # whether any subject of the batch is past round 0 (`unvmap_any`), so that a batch
    # computes it once per round, not in round 0. Rounds are synchronised: every subject still
    # running is in the same round.

    # -- the first-order loop ----------------------------------------------------------------
    def fo_cond(c):
        gn_go = ~c["stop"] & (c["k"] < max_iter + 1 + c["restarted"])
        chord_go = ~c["conv"] & ~c["slow_c"] & (c["acc"] < newton_iter) & (c["a"] >= amin)
        return jnp.where(c["r"] == 0, gn_go, chord_go)

    def fo_body(c):
        gn_mode = c["r"] == 0
        eta, f, g, d, a = c["eta"], c["f"], c["g"], c["d"], c["a"]
        first = c["first"] & gn_mode
        slope = g @ d
        ft, gt, Ht = gn(eta + a * d)
        # The first Gauss-Newton iteration evaluates the start itself (trial step 0, accepted);
        # with `check_start`, a start where f is not finite is replaced by zero, evaluated next.
        restart = first & check_start & ~c["restarted"] & ~jnp.isfinite(ft)
        ok = (first | _accept(f, ft, g, gt, a, slope)) & ~restart
        eta = jnp.where(ok, eta + a * d, eta)
        f_new = jnp.where(ok, ft, f)
        g_new = jnp.where(ok, gt, g)
        H_gn = jnp.where(ok & gn_mode, Ht, c["H_gn"])
        a = jnp.where(ok, 1.0, _shrink(a, f, ft, slope))
        # Gauss-Newton steps use the curvature of their last accepted point, chord steps the
        # round's exact Hessian.
        d = jnp.where(ok, -_solve_pd(jnp.where(gn_mode, H_gn, c["H"]), g_new), d)
        gm, gm_old = _gmax(g_new), _gmax(g)
        # Gauss-Newton hand-over. Slow: an accepted step that was damped or contracted the
        # gradient < 2x (the GN curvature is poor); rejected trial points only shrink the step.
        slow_step = ~first & ((c["a"] < 1.0) | (gm > 0.5 * gm_old))
        slow = jnp.where(ok, jnp.where(slow_step, c["slow"] + 1, 0), c["slow"])
        near = gm < gtol * scale(f_new)
        tiny = ~first & ((f - f_new) < 1e-6 * scale(f))
        handover = gm < handover_gtol * scale(f_new)
        stop = (
            handover
            | ((slow >= 2) & (near | tiny))
            | ((slow >= 4) & (gm < scale(f_new)))
            | (a < amin)
            | (first & ~jnp.isfinite(f_new))
        )
        return c | dict(
            eta=jnp.where(restart, jnp.zeros_like(eta), eta),
            f=f_new,
            g=g_new,
            H_gn=H_gn,
            d=d,
            a=jnp.where(restart, 0.0, a),
            # Gauss-Newton bookkeeping
            k=c["k"] + gn_mode,
            slow=slow,
            stop=stop & ~restart,
            first=restart,
            restarted=c["restarted"] | restart,
            # chord bookkeeping
            i=c["i"] + ~gn_mode,
            acc=c["acc"] + (ok & ~gn_mode),
            conv=gm < newton_gtol * scale(f_new),
            slow_c=ok & (gm > 0.25 * _gmax(g)),
        )

    # -- rounds --------------------------------------------------------------------------------
    def round_cond(s):
        return ~s["done"] & (s["r"] <= max_hessians)

    def round_body(s):
        newton = s["r"] > 0
        eta = s["eta"]
        f, g, H = jax.lax.cond(
            eqxi.unvmap_any(newton),
            lambda: _value_grad_hess(fun, eta),
            lambda: (s["f"], s["g"], s["H"]),
        )
        conv0 = _gmax(g) < newton_gtol * scale(f)
        c = s | dict(
            f=jnp.where(newton, f, s["f"]),
            g=jnp.where(newton, g, s["g"]),
            H=jnp.where(newton, H, s["H"]),
            d=jnp.where(newton, -_solve_pd(H, g), s["d"]),
            a=jnp.where(newton, 1.0, s["a"]),
            i=0,
            acc=0,
            conv=newton & conv0,
            slow_c=False,
        )
        z = jax.lax.while_loop(fo_cond, fo_body, c)
        moved = _gmax(z["eta"] - eta)
        # A fresh Hessian cannot help when no step was accepted, or when the only accepted
        # step, tiny, did not contract the gradient (the noise floor of an ODE solution).
        stuck = ~z["conv"] & ((z["a"] < amin) | ((z["acc"] == 1) & (moved <= hess_xtol)))
        done = (z["conv"] & (moved <= hess_xtol)) | stuck | ~jnp.isfinite(z["f"])
        return z | dict(
            eta_H=jnp.where(newton, eta, z["eta"]),
            r=s["r"] + 1,
            n=s["n"] + z["i"],
            done=newton & done,
        )

    n = eta0.shape[0]
    z = jnp.zeros_like(eta0)
    zH = jnp.zeros((n, n), eta0.dtype)
    s = dict(eta=eta0, f=jnp.zeros((), eta0.dtype), g=z, H=zH, H_gn=zH, d=z)
    s = s | dict(a=jnp.asarray(0.0, eta0.dtype), k=0, slow=0, stop=False, first=True)
    s = s | dict(restarted=False, i=0, acc=0, conv=False, slow_c=False)
    s = s | dict(eta_H=eta0, r=0, n=0, done=False)
    s = jax.lax.while_loop(round_cond, round_body, s)
    eta, f, g = s["eta"], s["f"], s["g"]
    # Without a Newton round (max_hessians = 0) the curvature is Gauss-Newton's.
    H = jnp.where(s["r"] > 1, s["H"], s["H_gn"])
    w, V = jnp.linalg.eigh(H)
    pd = jnp.all(w > 0)
    Hinv = V @ jnp.diag(1.0 / jnp.where(w > 0, w, jnp.inf)) @ V.T
    gnorm = _gmax(g)
    fresh = _gmax(eta - s["eta_H"]) <= hess_xtol
    converged = jnp.isfinite(f) & pd & fresh & (gnorm < 1e-5 * scale(f))
    hessians = jnp.maximum(s["r"] - 1, 0)
    return ModeResult(eta, f, gnorm, H, Hinv, converged, s["k"] + hessians + s["n"])
