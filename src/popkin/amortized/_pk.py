"""Closed-form linear PK with piecewise-constant parameters (float32, vectorised).

One individual = up to three mammillary compartments (central, two peripherals) plus a depot,
parameters `ka` (1/h), `CL` (L/h), `V1` (L), `Q2`, `Q3` (L/h), `V2`, `V3` (L), held constant
between *knots* (times where an Ornstein-Uhlenbeck path of the log-parameters is sampled).
Between consecutive events (dose start, infusion end, knot, observation) the state moves by
the exact solution of the linear system with that interval's parameters:

    u = D^-1/2 a (D = diag(V1, V2, V3)),   du/dt = S u + D^-1/2 e1 (ka A_depot + r),
    S symmetric: S11 = -(CL+Q2+Q3)/V1, Sjj = -Qj/Vj, S1j = Qj / sqrt(V1 Vj),
    S = U diag(lam) U^T,  w = U^T u,
    w(h) = e^{lam h} w0 + g ka A0 (e^{lam h} - e^{-ka h})/(lam + ka) + g r (e^{lam h} - 1)/lam,
    g = U^T e1 / sqrt(V1),  A_depot(h) = A0 e^{-ka h},  C = a1 / V1.

A one-compartment model is the special case Q2 = Q3 = 0. The eigen-decomposition is done
once per knot, not per interval, so the cost per interval is a few exponentials. This is the
simulator of the synthetic prior *and* the physics decoder of the in-context model (with one
knot); tests check it against `popkin.LinearPK` (float64 superposition).

Doses: `route` 0 = oral (into the depot, after `lag`), 1 = IV bolus, 2 = IV infusion over
`dur` h. Steady state (`ss=True`): before the first dose the system holds the steady state of
repeating the first dose every `ii` h under the first knot's parameters,
x_pre = (I - Phi)^-1 Phi b (Phi the one-interval propagator, b the dose input).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

#: Names of the seven structural parameters, in the order of the last axis of `theta`.
PARAM_NAMES = ("ka", "CL", "V1", "Q2", "V2", "Q3", "V3")
_BIG = 1e9  # time of padded events: after everything, never reached by a real event


def _eig(theta: Float[Array, 7]):
    """Eigen-decomposition of the symmetrised 3x3 disposition matrix for one knot."""
    ka, cl, v1, q2, v2, q3, v3 = (theta[i] for i in range(7))
    s12 = q2 / jnp.sqrt(v1 * v2)
    s13 = q3 / jnp.sqrt(v1 * v3)
    s = jnp.array(
        [
            [-(cl + q2 + q3) / v1, s12, s13],
            [s12, -q2 / v2, 0.0],
            [s13, 0.0, -q3 / v3],
        ],
        dtype=theta.dtype,
    )
    lam, u = jnp.linalg.eigh(s)
    sqrt_v = jnp.sqrt(jnp.stack([v1, v2, v3]))
    g = u[0, :] / sqrt_v[0]
    return lam, u, sqrt_v, g, ka


def _phi_depot(lam, ka, h):
    """(e^{lam h} - e^{-ka h}) / (lam + ka), stable when lam + ka -> 0 (gradient-safe)."""
    d = lam + ka
    small = jnp.abs(d * h) < 1e-3
    d_safe = jnp.where(small, 1.0, d)
    exact = (jnp.exp(lam * h) - jnp.exp(-ka * h)) / d_safe
    series = h * jnp.exp(lam * h) * (1.0 - 0.5 * d * h + (d * h) ** 2 / 6.0)
    return jnp.where(small, series, exact)


def _phi_rate(lam, h):
    """(e^{lam h} - 1) / lam, stable when lam -> 0 (gradient-safe)."""
    x = lam * h
    small = jnp.abs(x) < 1e-4
    x_safe = jnp.where(small, 1.0, x)
    exact = h * jnp.expm1(x_safe) / x_safe
    series = h * (1.0 + 0.5 * x + x * x / 6.0)
    return jnp.where(small, series, exact)


def _advance(eig, depot, amounts, rate, h):
    """Exact move of (depot, central/peripheral amounts) over h >= 0 with constant input rate."""
    lam, u, sqrt_v, g, ka = eig
    w0 = u.T @ (amounts / sqrt_v)
    el = jnp.exp(lam * h)
    w = el * w0 + g * (ka * depot) * _phi_depot(lam, ka, h) + g * rate * _phi_rate(lam, h)
    return depot * jnp.exp(-ka * h), sqrt_v * (u @ w)


def _steady_state(eig, theta, route, amt, dur, ii):
    """State just before a dose when the same dose has been given every `ii` h forever.

    Peripheral compartments with Q = 0 are decoupled (their mode never decays), so they are
    removed from the linear system (they hold no drug).
    """

    def propagate(x):  # x = (depot, a1, a2, a3) at a dose time -> state one interval later
        rate = jnp.where(route == 2, amt / jnp.maximum(dur, 1e-6), 0.0)
        t_inf = jnp.where(route == 2, jnp.minimum(dur, ii), 0.0)
        d, a = _advance(eig, x[0], x[1:], rate, t_inf)
        d, a = _advance(eig, d, a, 0.0, ii - t_inf)
        return jnp.concatenate([d[None], a])

    b = jnp.zeros(4, amt.dtype)
    b = jnp.where(route == 0, b.at[0].set(amt), jnp.where(route == 1, b.at[1].set(amt), b))
    # Phi x = propagate(x) - propagate(0) (linear part); c = propagate(0) (infusion input)
    zero = propagate(jnp.zeros(4, amt.dtype))
    phi = jax.vmap(propagate)(jnp.eye(4, dtype=amt.dtype)).T - zero[:, None]
    used = jnp.array([True, True, True, True]).at[2].set(theta[3] > 0).at[3].set(theta[5] > 0)
    keep = used[:, None] & used[None, :]
    phi = jnp.where(keep, phi, 0.0)
    rhs = jnp.where(used, phi @ b + zero, 0.0)
    return jnp.linalg.solve(jnp.eye(4, dtype=amt.dtype) - phi, rhs)


def concentrations(
    theta: Float[Array, "K 7"],
    knot_t: Float[Array, " K"],
    dose_t: Float[Array, " D"],
    dose_amt: Float[Array, " D"],
    dose_route: Array,
    dose_dur: Float[Array, " D"],
    dose_mask: Array,
    obs_t: Float[Array, " T"],
    lag: Float[Array, ""] | float = 0.0,
    ss: Array | bool = False,
    ii: Float[Array, ""] | float = 0.0,
) -> Float[Array, " T"]:
    """Central concentrations (amount / V1) at `obs_t` for one individual.

    `theta` holds the natural-scale parameters (`PARAM_NAMES`) at each knot; knot k applies from
    `knot_t[k]` on (knot 0 from the start). Padded doses have `dose_mask` False; padded
    observations may hold any time (their output is meaningless and should be masked).
    """
    dtype = theta.dtype
    k_count, d_count, t_count = theta.shape[0], dose_t.shape[0], obs_t.shape[0]
    eigs = jax.vmap(_eig)(theta)
    start = dose_t + jnp.where(dose_route == 0, lag, 0.0)
    inf = dose_route == 2
    start = jnp.where(dose_mask, start, _BIG)
    end = jnp.where(dose_mask & inf, start + dose_dur, _BIG)
    # event table: type 0 knot, 1 dose start, 2 infusion end, 3 observation (ties in this order)
    times = jnp.concatenate([knot_t.at[0].set(-_BIG), start, end, obs_t])
    types = jnp.concatenate(
        [
            jnp.zeros(k_count, jnp.int32),
            jnp.ones(d_count, jnp.int32),
            jnp.full(d_count, 2, jnp.int32),
            jnp.full(t_count, 3, jnp.int32),
        ]
    )
    index = jnp.concatenate(
        [jnp.arange(k_count), jnp.arange(d_count), jnp.arange(d_count), jnp.arange(t_count)]
    ).astype(jnp.int32)
    order = jnp.lexsort((types, times))
    times, types, index = times[order], types[order], index[order]
    rate_of = jnp.where(inf, dose_amt / jnp.maximum(dose_dur, 1e-6), 0.0)

    first = jnp.argmin(jnp.where(dose_mask, dose_t, _BIG))
    ss_state = _steady_state(
        jax.tree.map(lambda x: x[0], eigs),
        theta[0],
        dose_route[first],
        dose_amt[first],
        dose_dur[first],
        jnp.maximum(jnp.asarray(ii, dtype), 1e-3),
    )
    use_ss = jnp.asarray(ss) & jnp.any(dose_mask)

    def step(carry, event):
        t_prev, knot, depot, amounts, rate, started = carry
        t, kind, i = event
        h = jnp.clip(t - t_prev, 0.0, _BIG)
        live = t < _BIG * 0.5
        eig = jax.tree.map(lambda x: x[knot], eigs)
        d_new, a_new = _advance(eig, depot, amounts, rate, jnp.where(live, h, 0.0))
        depot = jnp.where(live & (t_prev > -_BIG * 0.5), d_new, depot)
        amounts = jnp.where(live & (t_prev > -_BIG * 0.5), a_new, amounts)
        t_prev = jnp.where(live, t, t_prev)
        # steady state enters just before the first dose
        is_dose = (kind == 1) & live
        enter_ss = is_dose & use_ss & ~started
        depot = jnp.where(enter_ss, ss_state[0], depot)
        amounts = jnp.where(enter_ss, ss_state[1:], amounts)
        started = started | is_dose
        route = dose_route[i]
        amt = jnp.where(is_dose, dose_amt[i], 0.0)
        depot = depot + jnp.where(route == 0, amt, 0.0)
        amounts = amounts.at[0].add(jnp.where(route == 1, amt, 0.0))
        rate = rate + jnp.where(is_dose, rate_of[i], 0.0)
        rate = rate - jnp.where((kind == 2) & live, rate_of[i], 0.0)
        knot = jnp.where(kind == 0, i, knot)
        conc = amounts[0] / eig[2][0] ** 2
        out = jnp.where(kind == 3, i, t_count)
        return (t_prev, knot, depot, amounts, rate, started), (conc, out)

    zero = jnp.zeros((), dtype)
    carry0 = (jnp.asarray(-_BIG, dtype), jnp.int32(0), zero, jnp.zeros(3, dtype), zero, False)
    _, (conc, out) = jax.lax.scan(step, carry0, (times, types, index))
    return jnp.zeros(t_count, dtype).at[out].set(conc, mode="drop")


def _sym2_eig(a, b, c):
    """Eigen-pairs of [[a, b], [b, c]] by the rotation angle (robust as b -> 0)."""
    th = 0.5 * jnp.arctan2(2 * b, a - c)
    cs, sn = jnp.cos(th), jnp.sin(th)
    lam = jnp.stack(
        [a * cs * cs + 2 * b * sn * cs + c * sn * sn, a * sn * sn - 2 * b * sn * cs + c * cs * cs]
    )
    u = jnp.stack([jnp.stack([cs, -sn]), jnp.stack([sn, cs])])  # rows: compartments
    return lam, u


def superposition_2cmt(
    params: Float[Array, 6],
    dose_t: Float[Array, " D"],
    dose_amt: Float[Array, " D"],
    dose_route: Array,
    dose_dur: Float[Array, " D"],
    dose_mask: Array,
    t: Float[Array, " T"],
    ss: Array | bool = False,
    ii: Float[Array, ""] | float = 1.0,
) -> Float[Array, " T"]:
    """Two-compartment concentrations by superposition of closed-form unit responses.

    `params` = (ka, CL, V1, Q, V2, lag), constant in time; doses as in `concentrations`. With
    `ss`, the first dose is also given every `ii` before its time forever (geometric series of
    each exponential mode). Differentiable everywhere for Q > 0 (closed-form 2x2 eigen-pairs),
    which makes it the physics decoder of the in-context model.
    """
    ka, cl, v1, q, v2, lag = (params[i] for i in range(6))
    s12 = q / jnp.sqrt(v1 * v2)
    lam, u = _sym2_eig(-(cl + q) / v1, s12, -q / v2)
    g = u[0, :] / jnp.sqrt(v1)  # U^T e1 / sqrt(V1), per mode
    w1 = u[0, :] / jnp.sqrt(v1)  # C = sum_j w1_j w_j  (a1 / V1 = u1 / sqrt(V1))
    coef = g * w1  # (2,)
    start = dose_t + jnp.where(dose_route == 0, lag, 0.0)
    dt = t[:, None] - start[None, :]  # (T, D)
    on = (dt >= 0) & dose_mask[None, :]
    dtp = jnp.where(on, dt, 0.0)[..., None]  # (T, D, 1)
    lam_ = lam[None, None, :]
    route = dose_route[None, :, None]
    amt = dose_amt[None, :, None]
    dur = jnp.maximum(dose_dur[None, :, None], 1e-6)
    oral = ka * _phi_depot(lam_, ka, dtp)
    bolus = jnp.exp(lam_ * dtp)
    t_in = jnp.minimum(dtp, dur)
    infusion = _phi_rate(lam_, t_in) * jnp.exp(lam_ * (dtp - t_in)) / dur
    unit = jnp.where(route == 0, oral, jnp.where(route == 1, bolus, infusion))
    conc = jnp.sum(jnp.where(on[..., None], amt * unit * coef, 0.0), axis=(1, 2))
    # steady state: all doses k*ii before the first one (k >= 1), summed per mode
    first = jnp.argmin(jnp.where(dose_mask, dose_t, _BIG))
    ii_ = jnp.maximum(jnp.asarray(ii, params.dtype), 1e-3)
    dt0 = t - start[first]  # time since the first dose
    r_l = jnp.exp(lam * ii_) / jnp.maximum(-jnp.expm1(lam * ii_), 1e-6)  # sum_k>=1 e^{lam k ii}
    r_a = jnp.exp(-ka * ii_) / jnp.maximum(-jnp.expm1(-ka * ii_), 1e-6)
    d = lam + ka
    e_l = jnp.exp(lam[None, :] * jnp.maximum(dt0, 0.0)[:, None])
    e_a = jnp.exp(-ka * jnp.maximum(dt0, 0.0))[:, None]
    d_safe = jnp.where(jnp.abs(d) < 1e-6, 1e-6, d)
    pre_oral = ka * (e_l * r_l - e_a * r_a) / d_safe
    pre_bolus = e_l * r_l
    dur0 = jnp.maximum(dose_dur[first], 1e-6)
    t_in0 = jnp.minimum(dur0, ii_)
    pre_inf = (
        _phi_rate(lam, t_in0) / dur0 * jnp.exp(lam * (ii_ - t_in0)) * e_l
        / jnp.maximum(-jnp.expm1(lam * ii_), 1e-6)
    )  # fmt: skip
    r0 = dose_route[first]
    pre = jnp.where(r0 == 0, pre_oral, jnp.where(r0 == 1, pre_bolus, pre_inf))
    pre_c = dose_amt[first] * jnp.sum(pre * coef[None, :], axis=1)
    use = jnp.asarray(ss) & jnp.any(dose_mask) & (dt0 >= 0)
    return conc + jnp.where(use, pre_c, 0.0)
