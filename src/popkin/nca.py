"""Non-compartmental analysis (NCA) of concentration-time profiles, one row per individual.

Per individual and analysed dose (times relative to that dose, units of the table):

- Cmax, Tmax: the largest observed concentration and its time (first one on ties).
- AUClast: area from the dose to the last positive concentration, linear trapezoid where the
  concentration rises or is flat, log trapezoid where it falls ("linear-up / log-down"):
  (C1 - C2) / ln(C1 / C2) * (t2 - t1) when C2 < C1 and both > 0.
- lambda_z: minus the slope of ln C against t over the last n >= 3 positive points after Tmax
  (Tmax itself excluded), n chosen by the largest adjusted R^2 = 1 - (1 - R^2)(n - 1)/(n - 2);
  among fits within `adj_r2_tol` of the best, the one with the most points wins (the
  WinNonlin / PKNCA rule). Rejected (NaN, with a note) when the slope is not negative or the
  adjusted R^2 is below `min_r2_adj` (PKNCA's default 0.9).
- t_half = ln 2 / lambda_z; AUCinf = AUClast + Clast / lambda_z (observed Clast);
  AUCinf_extrap_pct = 100 (AUCinf - AUClast) / AUCinf.
- CL = dose / AUCinf (single dose; CL/F after extravascular dosing) or dose / AUCtau (multiple
  dosing, at steady state); Vz = CL / lambda_z (Vz/F after extravascular dosing).

Concentration at the dose time when no sample is there: 0 for extravascular doses and
infusions without earlier doses; for an IV bolus, C0 back-extrapolated log-linearly from the
first two positive samples when they decline (else the first one), as WinNonlin does. BLQ
samples (CENS = 1) count as 0 before the first positive sample and are dropped after it.

Multiple dosing: when an individual has more than one dose, the *last* dosing interval is
analysed (`dose="last"`, the default; `dose="first"` analyses the first interval, from the first
dose to the second): samples from that dose on (up to the next dose for the first interval);
tau = the dose's II when given, else the spacing to the previous (or next) dose, and AUCtau is
the area from the dose to dose + tau (log-linear interpolation inside the data, extrapolation
with lambda_z past Tlast; NaN when neither is possible). With earlier doses and no sample at
the dose time, the area starts at the first sample (noted). Single dose (one dose row): every
sample from the dose on; AUCtau is NaN.

`nca` takes a NONMEM-style table (as `popkin.read_nonmem` reads it), a CSV path or a
`Population`; or an observation-only table (ID, TIME, DV, e.g. `popkin.generate`'s output)
together with `dose=` (amount, scalar or per ID) and `route=`, the dose given at `dose_time`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "nca",
    "nca_profile",
    "lambda_z",
    "auc_linup_logdown",
    "realism_check",
    "pk_reference",
    "NCA_COLUMNS",
]

ROUTES = ("auto", "extravascular", "iv", "infusion")

NCA_COLUMNS = [
    "ID", "route", "n_doses", "dose_time", "dose", "tau", "n_obs", "Cmax", "Tmax", "Clast",
    "Tlast", "AUClast", "AUCinf", "AUCinf_extrap_pct", "AUCtau", "lambda_z", "t_half",
    "r2_adj", "lz_n", "lz_t_start", "lz_t_end", "CL", "Vz", "note",
]  # fmt: skip


def auc_linup_logdown(t: np.ndarray, c: np.ndarray) -> float:
    """Area under (t, c) by the linear-up / log-down trapezoid rule (t increasing)."""
    t, c = np.asarray(t, float), np.asarray(c, float)
    if len(t) < 2:
        return 0.0
    dt = np.diff(t)
    c1, c2 = c[:-1], c[1:]
    down = (c2 < c1) & (c1 > 0) & (c2 > 0)
    lin = 0.5 * (c1 + c2) * dt
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.where(down, (c1 - c2) / np.log(c1 / np.where(down, c2, 1.0)) * dt, 0.0)
    return float(np.sum(np.where(down, log, lin)))


def lambda_z(t: np.ndarray, c: np.ndarray, *, min_points: int = 3, adj_r2_tol: float = 1e-4):
    """Best terminal log-linear fit over the last n >= `min_points` positive points of (t, c).

    Returns (lambda_z, adjusted R^2, number of points, first time used) or None when fewer
    than `min_points` positive points exist. lambda_z = -slope of ln c on t (1/time unit).
    """
    t, c = np.asarray(t, float), np.asarray(c, float)
    pos = c > 0
    t, lc = t[pos], np.log(c[pos])
    if len(t) < min_points:
        return None
    fits = []
    for n in range(min_points, len(t) + 1):
        x, y = t[-n:], lc[-n:]
        xm, ym = x.mean(), y.mean()
        sxx = np.sum((x - xm) ** 2)
        if sxx <= 0:
            continue
        slope = np.sum((x - xm) * (y - ym)) / sxx
        syy = np.sum((y - ym) ** 2)
        r2 = 1.0 if syy == 0 else 1.0 - np.sum((y - ym - slope * (x - xm)) ** 2) / syy
        adj = 1.0 - (1.0 - r2) * (n - 1) / (n - 2)
        fits.append((adj, n, -slope, x[0]))
    if not fits:
        return None
    best = max(f[0] for f in fits)
    adj, n, lz, t0 = max((f for f in fits if f[0] >= best - adj_r2_tol), key=lambda f: f[1])
    return float(lz), float(adj), int(n), float(t0)


def _interp_conc(t, c, x, lz):
    """Concentration at time x: log-linear between positive neighbours (linear otherwise),
    lambda_z extrapolation past the last point (NaN without lambda_z)."""
    if x <= t[-1]:
        j = int(np.searchsorted(t, x, side="right")) - 1
        j = min(max(j, 0), len(t) - 2)
        t1, t2, c1, c2 = t[j], t[j + 1], c[j], c[j + 1]
        w = (x - t1) / (t2 - t1)
        if c2 < c1 and c1 > 0 and c2 > 0:
            return float(c1 * (c2 / c1) ** w)
        return float(c1 + w * (c2 - c1))
    if not np.isfinite(lz):
        return float("nan")
    return float(c[-1] * math.exp(-lz * (x - t[-1])))


def _one(t, c, cens, dose_times, dose_amts, dose_iis, route, which, *, min_points, adj_r2_tol,
         min_r2_adj):  # fmt: skip
    """NCA of one individual: times t (absolute), concentrations c, BLQ flags, doses."""
    notes = []
    order = np.argsort(dose_times, kind="stable")
    dose_times, dose_amts, dose_iis = dose_times[order], dose_amts[order], dose_iis[order]
    nd = len(dose_times)
    k = nd - 1 if which == "last" else 0
    td, amt = float(dose_times[k]), float(dose_amts[k])
    tau = float("nan")
    if nd > 1:
        if dose_iis[k] > 0:
            tau = float(dose_iis[k])
        else:
            tau = float(dose_times[k] - dose_times[k - 1] if k > 0 else dose_times[1] - td)
    end = float(dose_times[k + 1]) if k + 1 < nd else np.inf
    keep = (t >= td) & (t < end) if np.isfinite(end) else t >= td
    t, c, cens = t[keep] - td, c[keep].astype(float), cens[keep]
    # BLQ: 0 before the first positive sample, dropped after it
    positive = (~cens) & (c > 0)
    first_pos = np.argmax(positive) if positive.any() else len(c)
    c = np.where(cens & (np.arange(len(c)) < first_pos), 0.0, c)
    drop = cens & (np.arange(len(c)) > first_pos)
    t, c = t[~drop], c[~drop]
    row = dict(route=route, n_doses=nd, dose_time=td, dose=amt, tau=tau, n_obs=len(t))
    nan = float("nan")
    out = dict.fromkeys(
        ["Cmax", "Tmax", "Clast", "Tlast", "AUClast", "AUCinf", "AUCinf_extrap_pct", "AUCtau",
         "lambda_z", "t_half", "r2_adj", "lz_t_start", "lz_t_end", "CL", "Vz"], nan)  # fmt: skip
    out["lz_n"] = 0
    if len(t) == 0 or not np.any(c > 0):
        notes.append("no positive concentration after the dose")
        return {**row, **out, "note": "; ".join(notes)}
    imax = int(np.argmax(c))
    out["Cmax"], out["Tmax"] = float(c[imax]), float(t[imax])
    ilast = int(np.flatnonzero(c > 0)[-1])
    out["Clast"], out["Tlast"] = float(c[ilast]), float(t[ilast])
    # concentration at the dose time
    tt, cc = t[: ilast + 1], c[: ilast + 1]
    if tt[0] > 0:
        if nd > 1 and k > 0:
            notes.append("no pre-dose sample: area starts at the first sample")
        elif route == "iv":
            p = np.flatnonzero(cc > 0)[:2]
            if len(p) == 2 and cc[p[1]] < cc[p[0]] and tt[p[1]] > tt[p[0]]:
                slope = np.log(cc[p[1]] / cc[p[0]]) / (tt[p[1]] - tt[p[0]])
                c0 = float(cc[p[0]] * math.exp(-slope * tt[p[0]]))
            else:
                c0 = float(cc[p[0]])
            tt, cc = np.r_[0.0, tt], np.r_[c0, cc]
        else:
            tt, cc = np.r_[0.0, tt], np.r_[0.0, cc]
    out["AUClast"] = auc_linup_logdown(tt, cc) if len(tt) >= 2 else nan
    # terminal phase: positive points strictly after Tmax
    after = np.arange(len(t)) > imax
    fit = lambda_z(t[after], c[after], min_points=min_points, adj_r2_tol=adj_r2_tol)
    lz = nan
    if fit is None:
        notes.append(f"fewer than {min_points} positive points after Tmax: no lambda_z")
    else:
        lz_, adj, n, t0 = fit
        out["r2_adj"], out["lz_n"], out["lz_t_start"] = adj, n, t0
        out["lz_t_end"] = out["Tlast"]
        if lz_ <= 0:
            notes.append("terminal slope not negative: no lambda_z")
        elif adj < min_r2_adj:
            notes.append(f"adjusted R2 {adj:.3f} < {min_r2_adj}: no lambda_z")
        else:
            lz = lz_
    if np.isfinite(lz):
        out["lambda_z"], out["t_half"] = lz, math.log(2.0) / lz
        out["AUCinf"] = out["AUClast"] + out["Clast"] / lz
        out["AUCinf_extrap_pct"] = 100.0 * (out["AUCinf"] - out["AUClast"]) / out["AUCinf"]
    if nd > 1 and np.isfinite(tau) and len(tt) >= 2:
        if tau <= tt[-1]:
            ct = _interp_conc(tt, cc, tau, lz)
            inside = tt < tau
            out["AUCtau"] = auc_linup_logdown(np.r_[tt[inside], tau], np.r_[cc[inside], ct])
        elif np.isfinite(lz):
            ct = cc[-1] * math.exp(-lz * (tau - tt[-1]))
            out["AUCtau"] = out["AUClast"] + (cc[-1] - ct) / lz
        auc_cl = out["AUCtau"]
    else:
        auc_cl = out["AUCinf"]
    if np.isfinite(auc_cl) and auc_cl > 0:
        out["CL"] = amt / auc_cl
        if np.isfinite(lz):
            out["Vz"] = out["CL"] / lz
    return {**row, **out, "note": "; ".join(notes)}


def nca_profile(t, c, dose_times, dose_amts, *, route: str, cens=None, ii=None,
                interval: str = "last", min_points: int = 3, adj_r2_tol: float = 1e-4,
                min_r2_adj: float = 0.9) -> dict:  # fmt: skip
    """NCA of one profile given as arrays (times, concentrations, dose times and amounts); the
    same summaries as one row of `nca` (without ID). `route`: "extravascular", "iv" or
    "infusion"; `cens` BLQ flags; `ii` the doses' intervals (0 = not given)."""
    if route not in ROUTES[1:]:
        raise ValueError(f"route must be one of {ROUTES[1:]}, got {route!r}")
    t, c = np.asarray(t, float), np.asarray(c, float)
    order = np.argsort(t, kind="stable")
    t, c = t[order], c[order]
    cens = np.zeros(len(t), bool) if cens is None else np.asarray(cens, bool)[order]
    dt, da = (
        np.atleast_1d(np.asarray(dose_times, float)),
        np.atleast_1d(np.asarray(dose_amts, float)),
    )
    if len(dt) == 0 or len(dt) != len(da):
        raise ValueError("need at least one dose, with as many amounts as times")
    ii = np.zeros(len(dt)) if ii is None else np.broadcast_to(np.asarray(ii, float), dt.shape)
    return _one(t, c, cens, dt, da, ii, route, interval, min_points=min_points,
                adj_r2_tol=adj_r2_tol, min_r2_adj=min_r2_adj)  # fmt: skip


def _route_of(dose_cmt, rate, obs_cmts) -> str:
    if rate > 0:
        return "infusion"
    return "iv" if dose_cmt in obs_cmts else "extravascular"


def _from_population(pop, endpoint):
    """Per subject: (id, t, c, cens, dose times, amounts, IIs, auto route)."""
    s = pop.subjects
    rec, dz = s.records, s.doses
    table = pop.table
    cmt_col = table["CMT"].to_numpy() if "CMT" in table.columns else np.ones(len(table))
    ep = 0 if endpoint is None else list(pop.endpoints).index(endpoint)
    items = []
    for i, sid in enumerate(pop.ids):
        m = np.asarray(rec.obs[i]) & (np.asarray(rec.endpoint[i]) == ep)
        rows = np.asarray(rec.row[i])[m]
        obs_cmts = set(np.asarray(cmt_col)[rows].astype(int).tolist())
        dm = np.asarray(dz.mask[i]) & (np.asarray(dz.amt[i]) > 0)
        cmt = np.asarray(dz.cmt[i])[dm] + 1
        rate = np.asarray(dz.rate[i])[dm]
        route = _route_of(int(cmt[0]), float(rate[0]), obs_cmts) if dm.any() else "none"
        items.append(
            (sid, np.asarray(rec.time[i])[m], np.asarray(rec.dv[i])[m],
             np.asarray(rec.cens[i])[m] == 1, np.asarray(dz.time[i])[dm],
             np.asarray(dz.amt[i])[dm], np.asarray(dz.ii[i])[dm], route)
        )  # fmt: skip
    return items


def _observation_only(df: pd.DataFrame, dose, dose_time):
    from popkin.data import DataError
    from popkin.data._errors import Problem

    cols = {str(c).strip().upper(): c for c in df.columns}
    problems = [Problem(None, c, f"required column {c} is missing") for c in ("ID", "TIME", "DV")
                if c not in cols]  # fmt: skip
    if problems:
        raise DataError(problems)
    t = pd.to_numeric(df[cols["TIME"]], errors="coerce").to_numpy(float)
    y = pd.to_numeric(df[cols["DV"]], errors="coerce").to_numpy(float)
    for name, v in (("TIME", t), ("DV", y)):
        for r in np.flatnonzero(~np.isfinite(v))[:50]:
            problems.append(Problem(int(r) + 1, name, f"expected a finite number, found "
                                                      f"{df[cols[name]].iloc[r]!r}"))  # fmt: skip
    for r in np.flatnonzero(np.isfinite(y) & (y < 0))[:50]:
        problems.append(Problem(int(r) + 1, "DV", f"concentration must be >= 0, found {y[r]}"))
    if problems:
        raise DataError(problems)
    items = []
    for sid, g in df.groupby(cols["ID"], sort=False):
        amt = dose[sid] if isinstance(dose, Mapping) else dose
        if amt is None or not np.isfinite(amt) or amt <= 0:
            raise ValueError(f"ID {sid}: dose must be a positive amount, got {amt!r}")
        idx = g.index.to_numpy()
        pos = df.index.get_indexer(idx)
        order = np.argsort(t[pos], kind="stable")
        items.append((sid, t[pos][order], y[pos][order], np.zeros(len(pos), bool),
                      np.array([float(dose_time)]), np.array([float(amt)]), np.zeros(1),
                      "none"))  # fmt: skip
    return items


def nca(data, *, dose: float | Mapping | None = None, dose_time: float = 0.0,
        route: str = "auto", interval: str = "last", endpoint=None, min_points: int = 3,
        adj_r2_tol: float = 1e-4, min_r2_adj: float = 0.9) -> pd.DataFrame:  # fmt: skip
    """NCA summaries per individual (columns `NCA_COLUMNS`; maths in the module docstring).

    Args:
        data: NONMEM-style DataFrame / CSV path / `Population`; or an observation-only
            DataFrame (ID, TIME, DV and no AMT column) with `dose` given.
        dose: for observation-only tables, the dose amount (scalar or {ID: amount}) given at
            `dose_time`. Not allowed with a table that has dose rows.
        route: "auto" (from the table: a dose into a compartment that is not observed is
            extravascular, RATE > 0 an infusion, else an IV bolus), "extravascular", "iv",
            "infusion". Observation-only tables need an explicit route.
        interval: "last" or "first" dosing interval when an individual has several doses.
        endpoint: DVID of the analysed endpoint (default: the first one).
        min_points, adj_r2_tol, min_r2_adj: lambda_z selection (see the module docstring).

    Raises:
        popkin.DataError for invalid tables (row, column, what was expected); ValueError for
        bad arguments or individuals without a dose.
    """
    from popkin.data import Population, read_nonmem

    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if interval not in ("last", "first"):
        raise ValueError(f"interval must be 'last' or 'first', got {interval!r}")
    if min_points < 3:
        raise ValueError(f"min_points must be >= 3 (adjusted R^2 needs n > 2), got {min_points}")
    if isinstance(data, (str, Path)):
        data = pd.read_csv(data) if dose is not None else read_nonmem(data)
    if isinstance(data, pd.DataFrame) and not {"AMT", "EVID"} & {
        str(c).strip().upper() for c in data.columns
    }:
        if dose is None:
            raise ValueError("the table has no dose rows (no AMT / EVID column): pass dose=")
        if route == "auto":
            raise ValueError("an observation-only table needs route= (extravascular/iv/infusion)")
        items = _observation_only(data.reset_index(drop=True), dose, dose_time)
    else:
        if dose is not None:
            raise ValueError("dose= is only for observation-only tables; this one has dose rows")
        pop = data if isinstance(data, Population) else read_nonmem(data)
        items = _from_population(pop, endpoint)
    rows = []
    for sid, t, c, cens, dt, amt, ii, auto_route in items:
        if len(dt) == 0:
            raise ValueError(f"ID {sid}: no dose with AMT > 0; NCA needs the dose")
        r = auto_route if route == "auto" else route
        one = _one(t, c, cens, dt, amt, ii, r, interval, min_points=min_points,
                   adj_r2_tol=adj_r2_tol, min_r2_adj=min_r2_adj)  # fmt: skip
        rows.append({"ID": sid, **one})
    return pd.DataFrame(rows, columns=NCA_COLUMNS)


# -- realism against literature ranges ---------------------------------------------------------

REFERENCE = Path(__file__).parent / "data" / "pk_reference.csv"
_QUANTITIES = {"t_half": "t_half", "Tmax": "Tmax", "CL_per_kg": "CL", "Vz_per_kg": "Vz"}


def pk_reference(compound: str | None = None) -> pd.DataFrame:
    """The shipped literature table (`popkin/data/pk_reference.csv`): one row per compound and
    quantity with its range [low, high], unit, route ("oral", "iv" or "any"), population, basis
    and source (name and address)."""
    ref = pd.read_csv(REFERENCE)
    if compound is None:
        return ref
    if compound not in set(ref["compound"]):
        raise ValueError(f"no reference rows for {compound!r}; known: {sorted(set(ref.compound))}")
    return ref[ref["compound"] == compound].reset_index(drop=True)


def realism_check(nca_df: pd.DataFrame, compound: str, *, weights: Mapping | None = None,
                  per_kg: bool = False) -> pd.DataFrame:  # fmt: skip
    """Share of individuals whose NCA summary lies inside each literature range of `compound`.

    Quantities: t_half (h), Tmax (h), CL_per_kg = CL / WT (L/h/kg; CL/F after oral dosing),
    Vz_per_kg = Vz / WT (L/kg). Per-kg rows need `weights` ({ID: kg}) or `per_kg=True` (doses
    already per kg of body weight, as in the phenobarbital data). Rows whose route ("oral" /
    "iv") differs from the individuals' route are left out; "any" rows always apply. Times
    and concentrations must be in h and mg/L (amounts in mg or mg/kg).

    Returns one row per reference row: n (individuals with a finite value), inside (share of
    them inside [low, high]; NaN when n = 0), median, median_inside, and the reference columns.
    """
    missing = {"ID", "route", *_QUANTITIES.values()} - set(nca_df.columns)
    if missing:
        raise ValueError(f"nca_df lacks columns {sorted(missing)} (pass popkin.nca output)")
    ref = pk_reference(compound)
    routes = {"extravascular": "oral", "iv": "iv", "infusion": "iv"}
    ind_routes = {routes.get(r, r) for r in nca_df["route"]}
    rows = []
    for _, r in ref.iterrows():
        if r["route"] != "any" and r["route"] not in ind_routes:
            continue
        sel = nca_df if r["route"] == "any" else nca_df[nca_df["route"].map(routes) == r["route"]]
        v = sel[_QUANTITIES[r["quantity"]]].to_numpy(float)
        note = ""
        if r["quantity"].endswith("_per_kg") and not per_kg:
            if weights is None:
                v, note = np.array([]), "needs body weights (weights=) or per_kg=True"
            else:
                w = np.array([weights.get(i, np.nan) for i in sel["ID"]], float)
                v = v / w
        v = v[np.isfinite(v)]
        inside = (v >= r["low"]) & (v <= r["high"])
        med = float(np.median(v)) if len(v) else float("nan")
        rows.append(
            dict(compound=compound, quantity=r["quantity"], route=r["route"], low=r["low"],
                 high=r["high"], unit=r["unit"], n=len(v),
                 inside=float(inside.mean()) if len(v) else float("nan"), median=med,
                 median_inside=bool(r["low"] <= med <= r["high"]) if len(v) else False,
                 note=note, source=r["source"])
        )  # fmt: skip
    return pd.DataFrame(rows)
