"""`Population`: a validated NONMEM-style table as padded, masked arrays (a JAX pytree).

Every array has the subject axis first, so estimators `jax.vmap` over subjects. Padding rows
are masked out (`rec`, `obs`, `dose_mask` are False there) and hold harmless finite values.

Times are in the table's time unit (usually h); amounts in the table's amount unit (usually mg).
Times are made non-decreasing within a subject: after a reset (EVID 3/4) where the table's TIME
restarts, an offset is added so that the internal time axis keeps increasing (the original TIME
stays in the table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float, Int


class Doses(eqx.Module):
    """Dose events of one subject (or of all, with a leading subject axis), ADDL expanded.

    **Fields** (shape `(D,)` per subject):
    - `time`: dose time.
    - `amt`: amount (table unit, e.g. mg); for SS infusions with AMT=0 and RATE>0 the rate is used.
    - `cmt`: 0-based compartment index (CMT - 1).
    - `rate`: zero-order input rate (amount/time); 0 for a bolus.
    - `dur`: infusion duration (time); 0 for a bolus. `amt = rate * dur` for infusions.
    - `ss`: 0 none, 1 steady state (resets the system, then steady state), 2 steady state added.
    - `ii`: interdose interval for steady state (time); 0 when not SS.
    - `end`: time of the first reset (EVID 3/4) after this dose; +inf if none. The dose
      contributes only for `time <= t < end`.
    - `mask`: True for a real dose, False for padding.
    - `row`: 0-based table row of the dose record, for ordering against records at the same
      time (NONMEM evaluates in row order: a sample on a row before a dose at the same time does
      not see it). ADDL copies get `ROW_AFTER` (a sample at their time is a pre-dose trough).
      None: every dose acts from its time on, including on records at that time.
    - `kinds` (static): which special doses occur among the real doses of the population,
      a subset of {"infusion", "ss"}; None when unknown. Dynamics skip what cannot occur
      (e.g. the steady-state solver and infusion-stop events are not traced, which halves
      the compile time of an ODE model on data without them).
    """

    time: Float[Array, "... D"]
    amt: Float[Array, "... D"]
    cmt: Int[Array, "... D"]
    rate: Float[Array, "... D"]
    dur: Float[Array, "... D"]
    ss: Int[Array, "... D"]
    ii: Float[Array, "... D"]
    end: Float[Array, "... D"]
    mask: Bool[Array, "... D"]
    row: Int[Array, "... D"] | None = None
    kinds: frozenset[str] | None = eqx.field(default=None, static=True)


def dose_kinds(mask, dur, rate, ss) -> frozenset[str]:
    """The `Doses.kinds` of concrete dose arrays: "infusion" if a real dose has a duration or
    a rate, "ss" if one is a steady-state dose."""
    mask = np.asarray(mask, bool)
    kinds = set()
    if np.any(mask & ((np.asarray(dur) != 0) | (np.asarray(rate) != 0))):
        kinds.add("infusion")
    if np.any(mask & (np.asarray(ss) > 0)):
        kinds.add("ss")
    return frozenset(kinds)


#: `Doses.row` of implied (ADDL) doses: after every record at the same time.
ROW_AFTER = 2**30


class Records(eqx.Module):
    """Non-dose records (EVID 0 and 2) of one subject (or of all, with a subject axis first).

    **Fields** (shape `(R,)` per subject unless noted):
    - `time`: record time (internal, non-decreasing).
    - `dv`: observed value (0 where missing).
    - `obs`: True where the record enters the likelihood (EVID 0, MDV 0).
    - `rec`: True for a real record, False for padding.
    - `endpoint`: 0-based endpoint index (position of the DVID value in `Population.endpoints`).
    - `cens`: 0 observed, 1 below the limit in DV (BLQ, M3), -1 above the limit in DV.
    - `limit`: lower bound of the measurement (LIMIT column, for M4); -inf when absent.
    - `cov`: covariates at the record, carried forward, shape `(R, C)`.
    - `row`: 0-based index of the record in `Population.table`; -1 for padding.
    """

    time: Float[Array, "... R"]
    dv: Float[Array, "... R"]
    obs: Bool[Array, "... R"]
    rec: Bool[Array, "... R"]
    endpoint: Int[Array, "... R"]
    cens: Int[Array, "... R"]
    limit: Float[Array, "... R"]
    cov: Float[Array, "... R C"]
    row: Int[Array, "... R"]


class Subjects(eqx.Module):
    """The arrays of a population (leading axis: subjects). vmap over this to get one subject."""

    doses: Doses
    records: Records
    cov0: Float[Array, "... C"]  # baseline covariates (first record of the subject)
    resets: Float[Array, "... K"]  # reset times (EVID 3/4), +inf padding


@dataclass(frozen=True, eq=False)
class PopulationInfo:
    """Static, hashable-by-identity metadata of a population."""

    ids: tuple
    covariates: tuple[str, ...]
    endpoints: tuple  # DVID values in order; endpoint index k <-> endpoints[k]
    table: pd.DataFrame = field(repr=False)
    source: str | None = None


class Population(eqx.Module):
    """A validated population: `subjects` (arrays, a pytree) plus static `info`.

    Build it with `popkin.read_nonmem`; vmap over `population.subjects`.
    """

    subjects: Subjects
    info: PopulationInfo = eqx.field(static=True)

    @property
    def n_subjects(self) -> int:
        return int(self.subjects.records.time.shape[0])

    @property
    def n_observations(self) -> int:
        """Number of records that enter the likelihood (EVID 0, MDV 0)."""
        return int(np.asarray(self.subjects.records.obs).sum())

    @property
    def ids(self) -> tuple:
        return self.info.ids

    @property
    def covariates(self) -> tuple[str, ...]:
        return self.info.covariates

    @property
    def endpoints(self) -> tuple:
        return self.info.endpoints

    @property
    def table(self) -> pd.DataFrame:
        return self.info.table

    def to_dataframe(self) -> pd.DataFrame:
        """The validated table in canonical NONMEM layout (upper-case columns, defaults filled)."""
        return self.info.table.copy()

    def subject(self, i: int) -> Subjects:
        """Arrays of subject `i` (0-based position), without the subject axis."""
        import jax

        return jax.tree.map(lambda x: x[i], self.subjects)

    def select(self, index) -> Population:
        """A sub-population of the subjects at `index` (positions, boolean mask or slice)."""
        import jax

        idx = np.arange(self.n_subjects)[index]
        subjects = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)[idx]), self.subjects)
        ids = tuple(self.info.ids[i] for i in idx)
        table = self.info.table[self.info.table["ID"].isin(ids)]
        rows = np.asarray(subjects.records.row)
        # Re-index record rows into the sub-table.
        old_to_new = np.full(len(self.info.table), -1)
        keep = np.flatnonzero(self.info.table["ID"].isin(ids).to_numpy())
        old_to_new[keep] = np.arange(len(keep))
        new_rows = np.where(rows >= 0, old_to_new[np.maximum(rows, 0)], -1)
        subjects = eqx.tree_at(lambda s: s.records.row, subjects, jnp.asarray(new_rows))
        if subjects.doses.row is not None:  # same renumbering (ADDL copies keep ROW_AFTER)
            d = np.asarray(subjects.doses.row)
            real = (d >= 0) & (d < ROW_AFTER) & np.asarray(subjects.doses.mask)
            d_new = np.where(real, old_to_new[np.clip(d, 0, len(old_to_new) - 1)], d)
            subjects = eqx.tree_at(lambda s: s.doses.row, subjects, jnp.asarray(d_new, d.dtype))
        info = PopulationInfo(
            ids=ids,
            covariates=self.info.covariates,
            endpoints=self.info.endpoints,
            table=table.reset_index(drop=True),
            source=self.info.source,
        )
        return Population(subjects=subjects, info=info)

    def __repr__(self) -> str:
        return (
            f"Population({self.n_subjects} subjects, {self.n_observations} observations, "
            f"endpoints={list(self.endpoints)}, covariates={list(self.covariates)})"
        )
