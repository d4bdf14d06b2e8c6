r"""Closed-form linear compartment models (1-3 compartments, IV or first-order absorption).

The state amounts after a unit impulse into compartment `c` are a sum of exponentials,
$A(\Delta) = \sum_k C_{c,k} e^{\mu_k \Delta}$. Disposition rates come from the symmetric
eigenproblem of $V^{-1/2} Q V^{-1/2}$ (`Q` the clearance matrix, `V` the volumes), so no
division by eigenvalue differences is needed; first-order absorption adds the rate `-ka`.
Bolus, zero-order infusion and steady state (the infinite sum over past doses,
$\sum_{k\ge1} e^{\mu k \tau} = e^{\mu\tau}/(1-e^{\mu\tau})$) then follow in closed form and are
superposed over the dose history.

Parameters (in the individual-parameter dict): `cl` (volume/time), `v` (central volume),
`q`, `vp` (first peripheral), `q2`, `vp2` (second peripheral), `ka` (1/time), optional `lag`
(time) and `bioav` (fraction). Compartment numbering (CMT) follows NONMEM's ADVANs: oral models
have 1 = depot, 2 = central, 3.. = peripheral; IV models 1 = central, 2.. = peripheral.
Steady state assumes `II >= lag + infusion duration`.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp

from ..data._population import Doses
from ._dynamics import AbstractDynamics, effective_doses


def _exponentials(p: dict, n_peripheral: int, oral: bool):
    """Rates `mu (K,)` and coefficients `C (n_states, K, n_states)` of the unit responses."""
    cl = p["cl"]
    v = p["v"]
    qs = [jnp.asarray(p[k], float) for k in ("q", "q2")[:n_peripheral]]
    vps = [jnp.asarray(p[k], float) for k in ("vp", "vp2")[:n_peripheral]]
    cl = jnp.asarray(cl, float)
    v = jnp.asarray(v, float)
    m = 1 + n_peripheral
    vol = jnp.stack([v, *vps])
    Q = jnp.zeros((m, m)).at[0, 0].set(cl)
    for i, q in enumerate(qs, start=1):
        Q = Q.at[0, 0].add(q).at[i, i].add(q).at[0, i].add(-q).at[i, 0].add(-q)
    s = jnp.sqrt(vol)
    S = Q / (s[:, None] * s[None, :])
    lam, U = jnp.linalg.eigh(S)  # S = U diag(lam) U^T, lam > 0
    mu_d = -lam
    # e^{Kt} = sum_j e^{mu_j t} P_j, P_j = V^{1/2} u_j u_j^T V^{-1/2}; coef[c, j, :] = P_j[:, c]
    P = (s[None, :, None] * U.T[:, :, None]) * (U.T[:, None, :] / s[None, None, :])
    coef_d = jnp.transpose(P, (2, 0, 1))  # (input c, j, state)
    if not oral:
        return mu_d, coef_d
    ka = jnp.asarray(p["ka"], float)
    # Nudge ka off a disposition rate (flip-flop equality) to keep the divided difference finite.
    close = jnp.abs(ka + mu_d) < 1e-7 * ka
    ka = jnp.where(jnp.any(close), ka * (1 + 1e-5), ka)
    n = m + 1
    mu = jnp.concatenate([mu_d, -ka[None]])
    # Depot impulse: depot = e^{-ka t}; disposition = sum_j P_j e0 ka (e^{mu_j t}-e^{-ka t})/(mu_j+ka)
    w = ka / (mu_d + ka)  # (m,)
    disp_from_depot = w[:, None] * coef_d[0]  # (m, m): j, state
    depot_row = jnp.zeros((m + 1, n))
    depot_row = depot_row.at[:m, 1:].set(disp_from_depot)
    depot_row = depot_row.at[m, 1:].set(-jnp.sum(disp_from_depot, axis=0))
    depot_row = depot_row.at[m, 0].set(1.0)
    central_rows = jnp.zeros((m, m + 1, n)).at[:, :m, 1:].set(coef_d)
    coef = jnp.concatenate([depot_row[None], central_rows], axis=0)
    return mu, coef


class LinearPK(AbstractDynamics):
    """A mammillary compartment model solved in closed form by superposition."""

    n_peripheral: int = eqx.field(static=True, default=0)
    oral: bool = eqx.field(static=True, default=False)

    @property
    def states(self) -> tuple[str, ...]:
        per = ("peripheral", "peripheral2")[: self.n_peripheral]
        return (("depot",) if self.oral else ()) + ("central", *per)

    @property
    def dose_compartment(self) -> int:
        return 0

    def exponentials(self, p: dict):
        return _exponentials(p, self.n_peripheral, self.oral)

    orders_by_row: ClassVar[bool] = True

    def amounts(self, p: dict, doses: Doses, times, resets=None, rows=None):
        mu, coef = self.exponentials(p)
        eff = effective_doses(p, doses, self.dose_compartment)
        # SS windows start at the dose record time; `effective_doses` shifted `time` by lag.
        return superpose(mu, coef, eff, doses.time, times, rows)


def superpose(mu, coef, eff: Doses, record_time, times, rows=None):
    """State amounts `(R, n_states)` at `times` by superposition of every dose's response.

    A dose acts on a record at its own time only if it comes first in row order (when both
    `rows` and `eff.row` are known). Infusion and steady-state terms are traced only where the
    static `eff.kinds` says such doses occur (or is unknown): a smaller program to compile and
    run for the common bolus-only data."""
    kinds = eff.kinds
    has_inf = kinds is None or "infusion" in kinds
    has_ss = kinds is None or "ss" in kinds
    t = times[:, None]
    delta = t - eff.time[None, :]
    m = mu[None, None, :]
    amt = eff.amt[None, :, None]
    dpos = jnp.maximum(delta, 0.0)[:, :, None]
    if has_inf:
        is_inf = eff.dur > 0
        continuous = jnp.isinf(eff.dur)
        dur = jnp.where(continuous, 0.0, eff.dur)[None, :, None]
        rate = eff.rate[None, :, None]
        s = jnp.minimum(dpos, dur)
        bolus = amt * jnp.exp(m * dpos)
        infusion = rate * jnp.exp(m * (dpos - s)) * (jnp.expm1(m * s) / m)
        single = jnp.where(is_inf[None, :, None], infusion, bolus)
        # A continuous infusion (infinite duration) contributes only through its SS term.
        single = jnp.where(continuous[None, :, None], 0.0, single)
    else:
        single = amt * jnp.exp(m * dpos)
    weight = jnp.where((delta >= 0)[:, :, None], single, 0.0)
    start = eff.time
    if has_ss:
        ssd = eff.ss > 0
        ii = jnp.where(ssd, eff.ii, 1.0)[None, :, None]
        r = jnp.exp(m * ii) / (-jnp.expm1(m * ii))
        # delta may be negative (within the lag after an SS record); clamp the exponent's
        # argument only where the term is masked out anyway.
        dss = jnp.where(ssd[None, :], delta, 0.0)[:, :, None]
        past = amt * jnp.exp(m * dss) * r
        if has_inf:
            past_inf = rate * jnp.exp(m * (dss - dur)) * (jnp.expm1(m * dur) / m) * r
            past = jnp.where(is_inf[None, :, None], past_inf, past)
            past = jnp.where(continuous[None, :, None], rate * (-1.0 / m), past)
        weight = weight + jnp.where(ssd[None, :, None], past, 0.0)
        start = jnp.where(ssd, record_time, eff.time)
    after = t > start[None, :]
    same = t == start[None, :]
    if rows is not None and eff.row is not None:
        same = same & (eff.row[None, :] < rows[:, None])
    active = eff.mask[None, :] & (after | same) & (t < eff.end[None, :])
    weight = jnp.where(active[:, :, None], weight, 0.0)
    C = coef[eff.cmt]
    return jnp.einsum("rdk,dks->rs", weight, C)


def OneCmtIV() -> LinearPK:
    """1-compartment, IV bolus/infusion into central (CMT 1). Parameters `cl`, `v`."""
    return LinearPK(n_peripheral=0, oral=False)


def OneCmtOral() -> LinearPK:
    """1-compartment, first-order absorption (CMT 1 depot, 2 central). `ka`, `cl`, `v`."""
    return LinearPK(n_peripheral=0, oral=True)


def TwoCmtIV() -> LinearPK:
    """2-compartment IV (CMT 1 central, 2 peripheral). `cl`, `v`, `q`, `vp`."""
    return LinearPK(n_peripheral=1, oral=False)


def TwoCmtOral() -> LinearPK:
    """2-compartment, first-order absorption (CMT 1 depot, 2 central, 3 peripheral)."""
    return LinearPK(n_peripheral=1, oral=True)


def ThreeCmtIV() -> LinearPK:
    """3-compartment IV. `cl`, `v`, `q`, `vp`, `q2`, `vp2`."""
    return LinearPK(n_peripheral=2, oral=False)


def ThreeCmtOral() -> LinearPK:
    """3-compartment, first-order absorption. `ka`, `cl`, `v`, `q`, `vp`, `q2`, `vp2`."""
    return LinearPK(n_peripheral=2, oral=True)
