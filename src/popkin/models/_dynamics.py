"""The dynamics contract shared by closed-form and ODE models."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ..data._population import Doses


class Solution:
    """State amounts at the record times: `sol.central` is an array of shape `(R,)`.

    `sol.amounts` has shape `(R, n_states)`; `sol.times` the record times.
    """

    def __init__(self, states: tuple[str, ...], amounts: jax.Array, times: jax.Array):
        self.states = states
        self.amounts = amounts
        self.times = times

    def __getattr__(self, name: str) -> jax.Array:
        states = self.__dict__.get("states", ())
        if name in states:
            return self.amounts[:, states.index(name)]
        raise AttributeError(f"the solution has no state {name!r}; states are {list(states)}")

    def __getitem__(self, name: str) -> jax.Array:
        return self.__getattr__(name)


class AbstractDynamics(eqx.Module):
    """Maps individual parameters and a dose history to state amounts at given times.

    Subclasses implement `states` and `amounts(p, doses, times, resets) -> (R, n_states)`.
    Doses go into `doses.cmt` (0-based index into `states`). The individual parameters `p` may
    hold `lag` (lag time) and `bioav` (bioavailability fraction), applied to doses into
    `dose_compartment`.

    `reverse_mode`: whether `amounts` can be reverse-differentiated (no `while_loop` with a
    dynamic trip count); `popkin.fit` then takes the OFV gradient in reverse mode.
    """

    reverse_mode: ClassVar[bool] = True

    @property
    @abc.abstractmethod
    def states(self) -> tuple[str, ...]: ...

    @property
    def dose_compartment(self) -> int:
        return 0

    @abc.abstractmethod
    def amounts(self, p: dict, doses: Doses, times: jax.Array, resets: jax.Array) -> jax.Array: ...

    def solve(
        self, p: dict, doses: Doses, times: jax.Array, resets: jax.Array, rows=None
    ) -> Solution:
        """State amounts at `times`. `rows` (the records' table rows) orders records against
        doses at the same time, as NONMEM does; dynamics that accept a `rows` keyword use it."""
        if rows is not None and getattr(self, "orders_by_row", False):
            return Solution(self.states, self.amounts(p, doses, times, resets, rows=rows), times)
        return Solution(self.states, self.amounts(p, doses, times, resets), times)


def effective_doses(p: dict, doses: Doses, dose_compartment: int) -> Doses:
    """Apply `lag` and `bioav` from `p` to doses into `dose_compartment`, and SS=1 resets.

    A steady-state dose with SS=1 resets the system: earlier doses end at its time.
    Bioavailability scales the amount of a bolus and the rate of an infusion (the duration is
    kept).
    """
    into = doses.cmt == dose_compartment
    lag = jnp.asarray(p.get("lag", 0.0), float)
    bioav = jnp.asarray(p.get("bioav", 1.0), float)
    time = jnp.where(into, doses.time + lag, doses.time)
    amt = jnp.where(into, doses.amt * bioav, doses.amt)
    rate = jnp.where(into, doses.rate * bioav, doses.rate)
    ss1 = jnp.where(doses.mask & (doses.ss == 1), doses.time, jnp.inf)
    later = ss1[None, :] > doses.time[:, None]
    reset_by_ss = jnp.min(jnp.where(later, ss1[None, :], jnp.inf), axis=1)
    end = jnp.minimum(doses.end, reset_by_ss)
    return Doses(
        time=time,
        amt=amt,
        cmt=doses.cmt,
        rate=rate,
        dur=doses.dur,
        ss=doses.ss,
        ii=doses.ii,
        end=end,
        mask=doses.mask,
        row=doses.row,
        kinds=doses.kinds,
    )


class RecordTimes(AbstractDynamics):
    """No compartments: the only 'state' is the record time (`sol.t`), for models written
    directly as functions of time (disease progression, Emax in time, test problems)."""

    @property
    def states(self) -> tuple[str, ...]:
        return ("t",)

    def amounts(self, p, doses, times, resets):
        return times[:, None]
