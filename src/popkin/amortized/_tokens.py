"""Study tokenisation: unit-free scales, observation and dose features, real data to `Studies`.

A forecaster must work for any compound and any unit system, so every study is made unit-free
by three scales computed from its *context* individuals only (never from what is forecast):

    T_s = geometric mean over context individuals of their last sampling time   (h)
    A_s = geometric mean of context dose amounts                                (mg)
    C_s = geometric mean of uncensored context concentrations                   (mg/L)

and the model sees t / T_s, amt / A_s and log(y / C_s). Forecasts are mapped back by C_s.

Real data (`from_population`) follow the bundled data sets' convention: a dose into a
compartment other than the observed one is extravascular (oral, depot), a dose into the
observed compartment is IV (bolus, or infusion when it has a rate). An SS=1 dose sets the
individual at steady state of that dose every II before it (only on a first dose; later SS
doses reset the history: earlier doses are dropped and 10 doses every II before it are added,
enough for t1/2 <= 2.5 II).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

from popkin.amortized._prior import F32, Studies


class Scales(eqx.Module):
    """Per-study normalising scales (time h, amount mg, concentration mg/L)."""

    time: Float[Array, " S"]
    amount: Float[Array, " S"]
    conc: Float[Array, " S"]


def _gmean(x, mask, axes, default=1.0):
    lx = jnp.where(mask, jnp.log(jnp.maximum(x, 1e-30)), 0.0)
    n = jnp.sum(mask, axis=axes)
    return jnp.where(n > 0, jnp.exp(jnp.sum(lx, axis=axes) / jnp.maximum(n, 1)), default)


def study_scales(studies: Studies, context: Bool[Array, "S N"]) -> Scales:
    """Scales from the context individuals (`context` marks them) of each study."""
    obs = studies.obs_mask & context[..., None]
    last = jnp.max(jnp.where(obs, studies.obs_t, 0.0), axis=-1)
    t_s = _gmean(last, context & (last > 0), axes=-1)
    doses = studies.dose_mask & context[..., None] & (studies.dose_amt > 0)
    a_s = _gmean(studies.dose_amt, doses, axes=(-2, -1))
    good = obs & ~studies.obs_cens & (studies.obs_y > 0)
    c_s = _gmean(studies.obs_y, good, axes=(-2, -1))
    return Scales(time=t_s, amount=a_s, conc=c_s)


def normalise(studies: Studies, scales: Scales) -> Studies:
    """The same studies in unit-free coordinates (t / T_s, amt / A_s, y / C_s)."""
    t = scales.time[:, None, None]
    return eqx.tree_at(
        lambda s: (s.obs_t, s.obs_y, s.dose_t, s.dose_amt, s.dose_dur, s.lag, s.ii),
        studies,
        (
            studies.obs_t / t,
            studies.obs_y / scales.conc[:, None, None],
            studies.dose_t / t,
            studies.dose_amt / scales.amount[:, None, None],
            studies.dose_dur / t,
            studies.lag / t[..., 0],
            studies.ii / t[..., 0],
        ),
    )


def obs_features(t, y, cens, last_dose_t) -> Float[Array, "... 6"]:
    """Observation token features (normalised units): time, log time, log y, BLQ, time since dose."""
    ly = jnp.log(jnp.maximum(y, 1e-6))
    since = jnp.maximum(t - last_dose_t, 0.0)
    return jnp.stack(
        [
            t,
            jnp.log(jnp.maximum(t, 0.0) + 0.01),
            ly,
            cens.astype(F32),
            jnp.log(since + 0.01),
            jnp.sqrt(since),
        ],
        axis=-1,
    )


def dose_features(t, amt, route, dur, ss, ii) -> Float[Array, "... 9"]:
    """Dose token features: time, log time, log amount, route one-hot, duration, SS, log II."""
    onehot = jax.nn.one_hot(route, 3, dtype=F32)
    return jnp.concatenate(
        [
            jnp.stack(
                [t, jnp.log(jnp.maximum(t, 0.0) + 0.01), jnp.log(jnp.maximum(amt, 1e-6))], -1
            ),
            onehot,
            jnp.stack([dur, ss.astype(F32), jnp.log(ii + 0.01) * ss.astype(F32)], -1),
        ],
        axis=-1,
    )


def individual_dose_features(ind: dict) -> Float[Array, "D 9"]:
    """`dose_features` of one individual's dose tokens (its SS flag and II on every dose)."""
    return dose_features(
        ind["dose_t"], ind["dose_amt"], ind["dose_route"], ind["dose_dur"],
        jnp.broadcast_to(ind["ss"], ind["dose_t"].shape),
        jnp.broadcast_to(ind["ii"], ind["dose_t"].shape),
    )  # fmt: skip


def last_dose_before(t, dose_t, dose_mask):
    """Time of the last dose at or before each t (0 if none); t (..., T), doses (..., D)."""
    before = dose_mask[..., None, :] & (dose_t[..., None, :] <= t[..., :, None])
    return jnp.max(jnp.where(before, dose_t[..., None, :], 0.0), axis=-1)


# -- real data ----------------------------------------------------------------------------


def from_population(pop, max_obs: int | None = None, max_doses: int | None = None) -> Studies:
    """One study (S = 1) from a validated `Population` (all its subjects are individuals).

    Observations are the records with `obs` set (first endpoint); BLQ records (CENS=1) are
    censored at their LIMIT/DV. Padded sizes default to the largest subject.
    """
    subj = pop.subjects
    rec, doses = subj.records, subj.doses
    n = pop.n_subjects
    obs_rows, dose_rows = [], []
    for i in range(n):
        m = np.asarray(rec.obs[i])
        t = np.asarray(rec.time[i])[m]
        y = np.asarray(rec.dv[i])[m]
        cens = np.asarray(rec.cens[i])[m] != 0 if rec.cens is not None else np.zeros(len(t), bool)
        obs_cmts = set(np.asarray(getattr(rec, "cmt", np.zeros_like(rec.time))[i])[m].tolist())
        obs_rows.append((t, y, cens))
        dm = np.asarray(doses.mask[i])
        dt = np.asarray(doses.time[i])[dm]
        amt = np.asarray(doses.amt[i])[dm]
        cmt = np.asarray(doses.cmt[i])[dm]
        rate = np.asarray(doses.rate[i])[dm]
        dur = np.asarray(doses.dur[i])[dm]
        ssv = np.asarray(doses.ss[i])[dm]
        ii = np.asarray(doses.ii[i])[dm]
        dose_rows.append((dt, amt, cmt, rate, dur, ssv, ii, obs_cmts))
    return _assemble(obs_rows, dose_rows, pop, max_obs, max_doses)


def _routes(cmt, rate, obs_cmt):
    iv = cmt == obs_cmt
    return np.where(iv, np.where(rate > 0, 2, 1), 0)


def _assemble(obs_rows, dose_rows, pop, max_obs, max_doses) -> Studies:
    n = len(obs_rows)
    # which compartment is observed: the one the observation records point to (CMT column),
    # else the highest dosed+1 convention of the bundled data (oral: dose 0, observe 1)
    obs_cmt = _observed_compartment(pop)
    expanded = []
    first_ss = np.zeros(n, bool)
    ii_first = np.ones(n)
    for i, (dt, amt, cmt, rate, dur, ssv, ii, _) in enumerate(dose_rows):
        order = np.argsort(dt, kind="stable")
        dt, amt, cmt, rate, dur, ssv, ii = (a[order] for a in (dt, amt, cmt, rate, dur, ssv, ii))
        route = _routes(cmt, rate, obs_cmt)
        t_l, a_l, r_l, d_l = [], [], [], []
        for k in range(len(dt)):
            if ssv[k] and k == 0:
                first_ss[i], ii_first[i] = True, ii[k]
            elif ssv[k]:
                # A steady-state reset later in the record (NONMEM SS=1): one dose list cannot
                # reset, so the regimen is taken to have run for up to 10 intervals before,
                # filling only the gap after the previous dose. Earlier doses stay (samples
                # before the reset keep their dosing; their residual after the reset is the
                # approximation, small when the gap is long against the half-life).
                prev = t_l[-1] if t_l else -np.inf
                for j in range(10, 0, -1):
                    if dt[k] - j * ii[k] <= prev + 1e-6:
                        continue
                    t_l.append(dt[k] - j * ii[k])
                    a_l.append(amt[k])
                    r_l.append(route[k])
                    d_l.append(dur[k])
            t_l.append(dt[k])
            a_l.append(amt[k])
            r_l.append(route[k])
            d_l.append(dur[k])
        expanded.append((np.array(t_l), np.array(a_l), np.array(r_l, int), np.array(d_l)))
    t_max = max_obs or max(1, max(len(o[0]) for o in obs_rows))
    d_max = max_doses or max(1, max(len(e[0]) for e in expanded))
    arr = {k: np.zeros((1, n, t_max), np.float32) for k in ("obs_t", "obs_y")}
    obs_cens = np.zeros((1, n, t_max), bool)
    obs_mask = np.zeros((1, n, t_max), bool)
    d = {k: np.zeros((1, n, d_max), np.float32) for k in ("dose_t", "dose_amt", "dose_dur")}
    dose_route = np.zeros((1, n, d_max), np.int32)
    dose_mask = np.zeros((1, n, d_max), bool)
    for i, (t, y, cens) in enumerate(obs_rows):
        k = min(len(t), t_max)
        arr["obs_t"][0, i, :k] = t[:k]
        arr["obs_y"][0, i, :k] = y[:k]
        obs_cens[0, i, :k] = cens[:k]
        obs_mask[0, i, :k] = True
        if k < t_max:
            arr["obs_t"][0, i, k:] = t[k - 1] if k else 0.0
    for i, (t, a, r, du) in enumerate(expanded):
        k = min(len(t), d_max)
        keep = slice(len(t) - k, len(t))  # the last d_max doses
        d["dose_t"][0, i, :k] = t[keep]
        d["dose_amt"][0, i, :k] = a[keep]
        d["dose_dur"][0, i, :k] = du[keep]
        dose_route[0, i, :k] = r[keep]
        dose_mask[0, i, :k] = True
    nan7 = np.full((1, n, 1, 7), np.nan, np.float32)
    return Studies(
        obs_t=jnp.asarray(arr["obs_t"]),
        obs_y=jnp.asarray(arr["obs_y"]),
        obs_cens=jnp.asarray(obs_cens),
        obs_mask=jnp.asarray(obs_mask),
        dose_t=jnp.asarray(d["dose_t"]),
        dose_amt=jnp.asarray(d["dose_amt"]),
        dose_route=jnp.asarray(dose_route),
        dose_dur=jnp.asarray(d["dose_dur"]),
        dose_mask=jnp.asarray(dose_mask),
        ind_mask=jnp.ones((1, n), bool),
        lag=jnp.zeros((1, n), F32),
        ss=jnp.asarray(first_ss[None]),
        ii=jnp.asarray(ii_first[None].astype(np.float32)),
        theta=jnp.asarray(nan7),
        knot_t=jnp.zeros((1, n, 1), F32),
        n_cmt=jnp.zeros((1,), jnp.int32),
    )


def _observed_compartment(pop) -> int:
    """0-based compartment of the observations, from the table's CMT of observation rows."""
    table = pop.table
    if "CMT" in table.columns and "EVID" in table.columns:
        obs = table[(table["EVID"] == 0) & (table.get("MDV", 0) == 0)]
        if len(obs):
            return int(obs["CMT"].mode().iloc[0]) - 1
    return 0
