r"""General ODE dynamics with NONMEM-style dose events, solved with diffrax.

The state $x(t) \in \mathbb{R}^n$ (amounts, in the table's amount unit) follows
$\dot x = f(t, x, p) + u(t)$ where `f` is the user's right-hand side and $u(t)$ the sum of the
zero-order infusion rates (amount/time) active at `t`. Event semantics match the closed-form
models (`popkin.models._linear`) exactly:

- bolus: $x \mathrel{+}= \text{amt}\, e_{\text{cmt}}$ at the (lagged) dose time; a record at
  exactly that time sees the dose;
- infusion: $u \mathrel{+}= \text{rate}\, e_{\text{cmt}}$ on
  $[t_d, \min(t_d + \text{dur}, \text{end}))$;
- reset (EVID 3/4): $x \leftarrow x_0(p)$ (`init`) at the reset time; doses stop at `end`;
- steady state at the SS record time $T$ (interval `ii`): $x^\*$ is the periodic steady state
  of the dosing repeated every `ii` (dose at $T + \text{lag} - k\,\text{ii}$, $k \ge 1$), the
  fixed point $y = P(y)$ of the one-period map, found by Newton's method with $P_y$ from the
  variational equations of the same solve (exact after one step for linear systems: two
  period solves per SS dose). Forward-mode derivatives flow through the iterations. SS=1 sets
  $x \leftarrow x^\*$; SS=2 adds $x^\* - x_0(p)$, which is exact superposition when the system
  is linear (affine) and $x_0(p)$ is its undosed equilibrium (zeros for PK, `kin/kout` for
  turnover); for nonlinear systems it is an approximation (the regimen's steady state from
  `init`, added to the current state). A continuous SS infusion (`dur = inf`) uses the
  equilibrium $f(T, x) + \text{rate}\, e_{\text{cmt}} = 0$ instead and keeps infusing until
  `end`. Steady state needs `ii >= lag + dur` and a unique stable periodic state: a state cut
  off from the dynamics keeps its `init` value, a pure accumulator (an AUC state) gives NaN.

Events are sorted inside the trace (lag makes their times parameter dependent) and visited with
`lax.scan`: one `diffeqsolve` per event interval, saving at the record times that fall in it.
A failed solve (step budget exhausted, non-finite values) gives NaN amounts, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..data._population import Doses
from ._dynamics import AbstractDynamics, effective_doses
from ._rk import UnrolledTsit5

# Event kinds, in the order they are applied at equal times.
_RESET, _SS1, _SS2, _BOLUS, _BOUNDARY, _NOOP = 0, 1, 2, 3, 4, 9


def _frozen_rms_norm(tree) -> jax.Array:
    """RMS norm for step-size control, with step sizes held constant under differentiation.

    Derivatives are those of the discrete solution on the accepted step sequence; carrying
    tangents through the controller would only add cost.
    """
    leaves = [jnp.ravel(lax.stop_gradient(x)) for x in jax.tree.leaves(tree)]
    flat = jnp.concatenate(leaves)
    return jnp.sqrt(jnp.mean(flat**2))


def _dead(a: jax.Array) -> jax.Array:
    """States whose row and column of `a` are all zero, shape (n,)."""
    return jnp.all(a == 0, axis=0) & jnp.all(a == 0, axis=1)


def _solve_decoupled(a: jax.Array, b: jax.Array) -> jax.Array:
    """Solve `a x = b`, where a state with an all-zero row and column in `a` (a constant state,
    e.g. a compartment cut off by a zero rate constant) keeps x_i = 0 (the system stays
    solvable: such a state keeps its initial value in the steady state)."""
    dead = _dead(a)
    return jnp.linalg.solve(a + jnp.diag(dead.astype(a.dtype)), jnp.where(dead, 0.0, b))


class StateView:
    """Read-only view of a state vector: `s.central`, `s["central"]`, `s.array` (shape (n,))."""

    __slots__ = ("_names", "array")

    def __init__(self, names: tuple[str, ...], array: jax.Array):
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "array", array)

    def __getattr__(self, name: str) -> jax.Array:
        names = object.__getattribute__(self, "_names")
        if name in names:
            return object.__getattribute__(self, "array")[..., names.index(name)]
        raise AttributeError(f"no state {name!r}; states are {list(names)}")

    def __getitem__(self, name: str | int) -> jax.Array:
        if isinstance(name, int):
            return self.array[..., name]
        return self.__getattr__(name)

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"StateView({dict(zip(self._names, self.array, strict=True))})"


def _as_vector(value, names: tuple[str, ...], what: str) -> jax.Array:
    """A dict {state: value} (missing = 0) or an array of shape (n,) as a float vector."""
    n = len(names)
    if isinstance(value, Mapping):
        unknown = set(value) - set(names)
        if unknown:
            raise KeyError(f"{what} returned unknown states {sorted(unknown)}; states are {names}")
        zero = jnp.zeros((), dtype=float)
        return jnp.stack([jnp.asarray(value.get(k, zero), dtype=float) for k in names])
    arr = jnp.asarray(value, dtype=float)
    if arr.shape != (n,):
        raise ValueError(f"{what} must return a dict or an array of shape ({n},), got {arr.shape}")
    return arr


class ODE(AbstractDynamics):
    r"""Dynamics $\dot x = \text{rhs}(t, x, p) + u(t)$ with NONMEM dose events.

    **Arguments:**
    - `rhs(t, s, p)`: time `t`, states `s` (a `StateView`: `s.central`, `s["central"]`,
      `s.array`), individual parameters `p` (dict); returns a dict {state: derivative}
      (missing states have derivative 0) or an array of shape (n_states,). Units: amount/time.
    - `states`: state names; `doses.cmt` indexes them (0-based).
    - `init(p)`: initial amounts (dict or array; default zeros), restored by resets.
    - `dose_compartment`: index of the state that `lag`/`bioav` in `p` apply to.
    - `solver`: a diffrax solver (default `UnrolledTsit5()`, diffrax's `Tsit5` with its stages
      unrolled: same results, faster for small systems; pass `Kvaerno5()` for stiff systems).
    - `rtol`, `atol`: PID step-size tolerances; `max_steps`: step budget per event interval.
    - `steady_state`: compile the SS machinery (True), never (False: subjects with SS doses get
      NaN), or (None, default) unless the doses are known to hold no SS dose (concrete arrays,
      or `Doses.kinds` from the data without "ss"). The SS path roughly doubles compile time
      (value and derivatives); its run time is zero without SS doses.

    `amounts(p, doses, times, resets)` returns the states at `times`, shape (R, n_states). It is
    traceable, vmappable over subjects and differentiable in forward mode (jacfwd of jacfwd),
    not in reverse mode (the event-interval loops have dynamic trip counts).
    """

    reverse_mode: ClassVar[bool] = False
    rhs: Callable = eqx.field(static=True)
    state_names: tuple[str, ...] = eqx.field(static=True)
    init_fn: Callable | None = eqx.field(static=True)
    dose_cmt: int = eqx.field(static=True)
    solver: diffrax.AbstractSolver
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    steady_state: bool | None = eqx.field(static=True)

    def __init__(
        self,
        rhs: Callable,
        states: tuple[str, ...] | list[str],
        init: Callable | None = None,
        dose_compartment: int = 0,
        solver: diffrax.AbstractSolver | None = None,
        rtol: float = 1e-8,
        atol: float = 1e-10,
        max_steps: int = 4096,
        steady_state: bool | None = None,
    ):
        self.rhs = rhs
        self.state_names = tuple(states)
        if len(set(self.state_names)) != len(self.state_names):
            raise ValueError(f"duplicate state names in {self.state_names}")
        self.init_fn = init
        self.dose_cmt = int(dose_compartment)
        self.solver = UnrolledTsit5() if solver is None else solver
        self.rtol = float(rtol)
        self.atol = float(atol)
        self.max_steps = int(max_steps)
        self.steady_state = steady_state

    @property
    def states(self) -> tuple[str, ...]:
        return self.state_names

    @property
    def dose_compartment(self) -> int:
        return self.dose_cmt

    # -- pieces --------------------------------------------------------------------------------

    def init(self, p: dict) -> jax.Array:
        """Initial (and post-reset) amounts $x_0(p)$, shape (n_states,)."""
        if self.init_fn is None:
            return jnp.zeros(len(self.state_names), dtype=float)
        return _as_vector(self.init_fn(p), self.state_names, "init")

    def vector_field(self, t, x: jax.Array, p: dict) -> jax.Array:
        """$f(t, x, p)$ as an array of shape (n_states,), without dose input."""
        return _as_vector(self.rhs(t, StateView(self.state_names, x), p), self.state_names, "rhs")

    def _solve(self, x, t0, t1, p, u, t_off, ts, jump=None, variational=False):
        """Integrate from `t0` to `t1` with input `u` on `t < t_off`; states at `ts` and `t1`.

        With `variational=True` the state is `concat(x, vec Phi)` with
        $\\dot\\Phi = (\\partial f/\\partial x) \\Phi$, the flow's sensitivity to x(t0).
        """

        n = len(self.state_names)

        def f(t, x, args):
            p, u, t_off = args
            return self.vector_field(t, x, p) + jnp.where(t < t_off, u, 0.0)

        def f_var(t, z, args):
            # One flat state (x, vec Phi): a tuple state costs diffrax twice the time.
            x, phi = z[:n], z[n:].reshape(n, n)
            jac = jax.jacfwd(lambda y: f(t, y, args))(x)
            return jnp.concatenate([f(t, x, args), (jac @ phi).ravel()])

        controller = diffrax.PIDController(rtol=self.rtol, atol=self.atol, norm=_frozen_rms_norm)
        if jump is not None:
            controller = diffrax.ClipStepSizeController(controller, jump_ts=jump)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f_var if variational else f),
            self.solver,
            t0=t0,
            t1=t1,
            dt0=None,
            y0=x,
            args=(p, u, t_off),
            saveat=diffrax.SaveAt(ts=ts, t1=True),
            stepsize_controller=controller,
            max_steps=self.max_steps,
            adjoint=diffrax.ForwardMode(),
            throw=False,
        )
        ok = (sol.result == diffrax.RESULTS.successful) & jnp.all(jnp.isfinite(sol.ys))
        return sol.ys, ok

    def _newton_tol(self, x_new):
        return 1e3 * self.rtol * jnp.abs(x_new) + 1e3 * self.atol

    def _periodic_step(self, p, y, t_dose, t_rec, cmt, amt, rate, dur, ii):
        """One Newton step for the periodic steady state of doses at `t_dose - k ii`, k >= 1.

        The one-period map starts just before the dose of the previous period,
        $P(y) = \\Phi_{[t_d - ii,\\, t_d]}(y + \\text{bolus})$ with the infusion on for `dur`;
        its Jacobian comes from the variational equations of the same solve. Returns the new
        iterate, the state at `t_rec` (inside the period, `t_rec <= t_d`) corrected to first
        order with the Newton step, the step, and whether the solve succeeded.
        """
        n = y.shape[0]
        e = jax.nn.one_hot(cmt, n, dtype=y.dtype)
        is_inf = dur > 0
        t0 = t_dose - ii
        bolus = jnp.where(is_inf, 0.0, amt) * e
        u = jnp.where(is_inf, rate, 0.0) * e
        t_off = t0 + jnp.where(is_inf, dur, ii)
        jump = jnp.stack([t0 + jnp.where(is_inf, jnp.minimum(dur, ii), 0.5 * ii)])
        ts = jnp.clip(t_rec, t0, t_dose)[None]
        z0 = jnp.concatenate([y + bolus, jnp.eye(n).ravel()])
        zs, ok = self._solve(z0, t0, t_dose, p, u, t_off, ts, jump, variational=True)
        ys, phis = zs[:, :n], zs[:, n:].reshape(-1, n, n)
        # ys[0], phis[0]: state at t_rec and its Jacobian; ys[1], phis[1]: P(y) and dP/dy.
        step = _solve_decoupled(jnp.eye(n) - phis[1], ys[1] - y)
        return y + step, ys[0] + phis[0] @ step, step, ok

    def _equilibrium_step(self, p, x, t, cmt, rate):
        """One Newton step for the equilibrium $f(t, x) + \\text{rate}\\, e_{cmt} = 0$."""
        u = rate * jax.nn.one_hot(cmt, x.shape[0], dtype=x.dtype)
        g = lambda y: self.vector_field(t, y, p) + u
        step = -_solve_decoupled(jax.jacfwd(g)(x), g(x))
        return x + step, step

    # -- main ----------------------------------------------------------------------------------

    def amounts(self, p: dict, doses: Doses, times, resets=None) -> jax.Array:
        """States at the record `times` (non-decreasing), shape (R, n_states)."""
        times = jnp.asarray(times, dtype=float)
        x0 = self.init(p)
        n = x0.shape[0]
        n_rec = times.shape[0]
        eff = effective_doses(p, doses, self.dose_cmt)
        resets = jnp.zeros((0,), float) if resets is None else jnp.asarray(resets, float)
        t_last = times[-1]

        ok = doses.mask
        rec_t = doses.time  # SS window starts at the record time (before lag)
        continuous = jnp.isinf(eff.dur)
        ssd = ok & (eff.ss > 0)
        is_bolus = eff.dur == 0
        # Zero-order input of each dose on [inf_start, inf_stop).
        inf_start = jnp.where(continuous, rec_t, eff.time)
        inf_stop = jnp.where(
            continuous,
            eff.end,
            jnp.minimum(eff.time + jnp.where(continuous, 0.0, eff.dur), eff.end),
        )
        inf_on = ok & (eff.dur > 0) & (~continuous | ssd) & (inf_start < inf_stop)
        bolus_on = ok & is_bolus & (eff.time < eff.end)
        ss_on = ssd & (rec_t < eff.end)

        # Event list: resets, SS records, dose starts, infusion stops.
        D = doses.time.shape[0]
        idx = jnp.arange(D)
        ev_t = jnp.concatenate([resets, rec_t, eff.time, inf_stop])
        ev_kind = jnp.concatenate(
            [
                jnp.where(jnp.isfinite(resets), _RESET, _NOOP),
                jnp.where(ss_on, jnp.where(eff.ss == 1, _SS1, _SS2), _NOOP),
                jnp.where(bolus_on, _BOLUS, jnp.where(inf_on, _BOUNDARY, _NOOP)),
                jnp.where(inf_on, _BOUNDARY, _NOOP),
            ]
        ).astype(jnp.int32)
        ev_dose = jnp.concatenate([jnp.zeros_like(resets, dtype=jnp.int32), idx, idx, idx])
        # Event slots that cannot be active (static `doses.kinds`): one solve fewer per slot.
        use_ss = self._use_steady_state(doses)
        kinds = doses.kinds
        R = resets.shape[0]
        keep = [np.arange(R)]
        if use_ss:
            keep.append(R + np.arange(D))
        keep.append(R + D + np.arange(D))
        if kinds is None or "infusion" in kinds:
            keep.append(R + 2 * D + np.arange(D))
        if sum(k.size for k in keep) < ev_t.shape[0]:
            keep = np.concatenate(keep)
            ev_t, ev_kind, ev_dose = ev_t[keep], ev_kind[keep], ev_dose[keep]
        ev_kind = jnp.where(ev_t <= t_last, ev_kind, _NOOP)
        active = ev_kind != _NOOP
        ev_t = jnp.where(active, ev_t, t_last)
        # A closing no-op at t_last: the scan's last interval ends there.
        ev_t = jnp.concatenate([ev_t, t_last[None]])
        ev_kind = jnp.concatenate([ev_kind, jnp.array([_NOOP], jnp.int32)])
        ev_dose = jnp.concatenate([ev_dose, jnp.zeros((1,), jnp.int32)])
        order = jnp.lexsort((ev_kind, lax.stop_gradient(ev_t)))
        ev_t, ev_kind, ev_dose = ev_t[order], ev_kind[order], ev_dose[order]
        t_start = jnp.minimum(times[0], ev_t[0])
        starts = jnp.concatenate([t_start[None], ev_t[:-1]])
        last = jnp.arange(ev_t.shape[0]) == ev_t.shape[0] - 1

        if use_ss:
            ss_state = self._steady_states(p, x0, eff, rec_t, ss_on, continuous)
            ss_missing = jnp.array(False)
        else:
            ss_state = jnp.broadcast_to(x0, (D, n))
            ss_missing = jnp.any(ss_on)

        def step(carry, ev):
            x, out, failed = carry
            a, b, kind, d, is_last = ev
            mid = 0.5 * (a + b)
            on = inf_on & (inf_start <= mid) & (mid < inf_stop)
            u = jnp.zeros(n, dtype=x.dtype).at[eff.cmt].add(jnp.where(on, eff.rate, 0.0))
            ys, good = self._solve(x, a, b, p, u, jnp.inf, jnp.clip(times, a, b))
            take = (times >= a) & ((times < b) | (is_last & (times <= b)))
            out = jnp.where(take[:, None], ys[:n_rec], out)
            x = ys[-1]
            ss = ss_state[d]
            bolus = jnp.where(kind == _BOLUS, eff.amt[d], 0.0) * jax.nn.one_hot(
                eff.cmt[d], n, dtype=x.dtype
            )
            x = jnp.where(kind == _RESET, x0, x)
            x = jnp.where(kind == _SS1, ss, x)
            x = jnp.where(kind == _SS2, x + ss - x0, x)
            x = x + bolus
            failed = failed | ~good | ~jnp.all(jnp.isfinite(x))
            # After a failure keep integrating from a harmless state (the output is NaN anyway).
            x = jnp.where(failed, x0, x)
            return (x, out, failed), None

        out0 = jnp.zeros((n_rec, n), dtype=x0.dtype)
        (_, out, failed), _ = lax.scan(
            step, (x0, out0, jnp.array(False)), (starts, ev_t, ev_kind, ev_dose, last)
        )
        return jnp.where(failed | ss_missing, jnp.nan, out)

    def _use_steady_state(self, doses: Doses) -> bool:
        """Whether to trace the SS machinery (static; see the `steady_state` argument)."""
        try:
            has_ss = bool(np.any(np.asarray(doses.mask) & (np.asarray(doses.ss) > 0)))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            if doses.kinds is None:  # traced arrays of unknown content
                return self.steady_state is None or self.steady_state
            has_ss = "ss" in doses.kinds
        if has_ss and self.steady_state is False:
            raise ValueError("the doses hold steady-state doses but steady_state=False")
        return has_ss if self.steady_state is None else self.steady_state

    def _steady_states(self, p, x0, eff: Doses, rec_t, ss_on, continuous) -> jax.Array:
        """$x^\\*$ at the SS record time of each SS dose (rows of other doses are x0), (D, n).

        One flat `while_loop` over (SS dose, Newton iteration): no run time without SS doses.
        Newton starts from x0 and stops when the step is within 1e3 (rtol |x| + atol); a dose
        whose iteration fails (solve failure, non-finite values, 16 iterations) gives NaN.
        Derivatives flow through the iterations (forward mode); Newton's derivatives converge
        with its iterates (exact after the first step for linear systems).
        """
        D = rec_t.shape[0]
        n = x0.shape[0]
        order = jnp.argsort(~ss_on, stable=True)
        count = jnp.sum(ss_on)
        # Continuous infusions use the equilibrium; their period solve is made zero-length.
        ii = jnp.where(ss_on & ~continuous, eff.ii, 0.0)
        dur = jnp.where(continuous, 0.0, eff.dur)
        max_iter = 16

        def body(c):
            j, k, y, S = c
            d = order[j]
            y_per, x_per, step_per, ok = self._periodic_step(
                p, y, eff.time[d], rec_t[d], eff.cmt[d], eff.amt[d], eff.rate[d], dur[d], ii[d]
            )
            y_eq, step_eq = self._equilibrium_step(p, y, rec_t[d], eff.cmt[d], eff.rate[d])
            cont = continuous[d]
            y_new = jnp.where(cont, y_eq, y_per)
            x_new = jnp.where(cont, y_eq, x_per)
            step = jnp.where(cont, step_eq, step_per)
            ok = (ok | cont) & jnp.all(jnp.isfinite(x_new))
            conv = jnp.all(jnp.abs(step) <= self._newton_tol(y_new))
            done = conv | ~ok | (k + 1 >= max_iter)
            S = S.at[d].set(jnp.where(done, jnp.where(conv & ok, x_new, jnp.nan), S[d]))
            return (
                jnp.where(done, j + 1, j),
                jnp.where(done, 0, k + 1),
                jnp.where(done, x0, y_new),
                S,
            )

        S0 = jnp.broadcast_to(x0, (D, n))
        _, _, _, S = lax.while_loop(lambda c: c[0] < count, body, (0, 0, x0, S0))
        return S
