r"""Tsitouras 5(4) with its stages unrolled: diffrax's `Tsit5`, faster for small ODE systems.

diffrax runs the stages of every Runge-Kutta method in a (checkpointed) loop over a stacked
stage buffer, which keeps one traced copy of the vector field for any tableau. For popkin's
ODEs (a handful of states, vmapped over subjects, with forward-mode tangents) the loop's
per-stage buffer traffic costs more than the arithmetic: the EBE benchmark's find_mode
program (PK + 3 turnover PD, 6 etas, 500 subjects) ran 6.8 -> 2.0 s warm on one core
unrolled, with about the same trace + compile time (17.4 vs 16.8 s; 18.6k vs 12.4k HLO lines). Same tableau, error estimate, FSAL and dense output
(diffrax's Tsit5 interpolation) as `diffrax.Tsit5`; results agree to rounding (1e-12).

A step from $t_0$ to $t_1$, $h = t_1 - t_0$: $k_i = h f(t_0 + c_i h, y_0 + \sum_{j<i} a_{ij}
k_j)$, $y_1 = y_0 + \sum_i b_i k_i$ (the last stage's point: first same as last), error
$\sum_i (b_i - \hat b_i) k_i$.
"""

from __future__ import annotations

import diffrax
import equinox.internal as eqxi
import jax
import jax.numpy as jnp


class UnrolledTsit5(diffrax.Tsit5):
    """`diffrax.Tsit5` with the stages unrolled (array states; pytrees use diffrax's loop)."""

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        if not isinstance(y0, jax.Array) or solver_state is None:
            return super().step(terms, t0, t1, y0, args, solver_state, made_jump)
        first_step, f0 = solver_state
        tab = self.tableau
        h = t1 - t0
        control = terms.contr(t0, t1)
        # FSAL: the first stage is the previous step's last, except on the first step or
        # after a jump (evaluated for the whole batch if any member needs it, as diffrax).
        fresh = eqxi.unvmap_any(first_step | made_jump)
        f0 = jax.lax.cond(fresh, lambda: terms.vf(t0, y0, args), lambda: f0)
        ks = [terms.prod(f0, control)]
        for row, c in zip(tab.a_lower, tab.c, strict=True):
            yi = y0
            for a, k in zip(row, ks, strict=True):
                if a != 0.0:
                    yi = yi + float(a) * k
            fi = terms.vf(t0 + float(c) * h, yi, args)
            ks.append(terms.prod(fi, control))
        # Tsit5's last row of `a` is `b`, at c = 1: `yi` is y1 and `fi` is f(t1, y1).
        y1 = yi
        y_error = sum(float(b) * k for b, k in zip(tab.b_error, ks, strict=True) if b != 0.0)
        dense_info = dict(y0=y0, y1=y1, k=jnp.stack(ks))
        return y1, y_error, dense_info, (jnp.array(False), fi), diffrax.RESULTS.successful
