"""`read_nonmem`: validate a NONMEM-style table and build a `Population`.

Conventions (NONMEM): one row per event, rows of a subject contiguous and in time order.

- EVID 0 observation, 1 dose, 2 other record (no observation), 3 reset, 4 reset and dose.
- Dose rows: AMT (amount, e.g. mg) into CMT (1-based). RATE > 0: zero-order infusion,
  duration AMT/RATE. RATE = -2: duration from DUR. RATE = 0: bolus. ADDL additional doses
  every II (time). SS = 1 (reset, then steady state) or 2 (steady state added) with interval II;
  with ADDL the steady-state dose is the first and the copies are ordinary doses.
  A steady-state constant infusion is SS > 0, AMT = 0, RATE > 0 (II may be 0); it is stored
  as `amt = 0`, `rate = RATE`, `dur = +inf`.
- Resets: a dose stops contributing at the first reset row (EVID 3/4) after it in row order
  (for an EVID 4 row, the reset happens before its own dose). TIME may restart (decrease) on a
  reset row or on the row right after one; the internal time axis then gets an offset so that
  it stays non-decreasing (the table keeps the original TIME).
- Missing values: empty cells, NA and "." (NONMEM's missing value).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pandas as pd

from popkin.data._errors import DataError, Problem
from popkin.data._population import (
    ROW_AFTER,
    Doses,
    Population,
    PopulationInfo,
    Records,
    Subjects,
    dose_kinds,
)

__all__ = ["read_nonmem", "RESERVED_COLUMNS", "OUTPUT_COLUMNS", "is_output_column"]

#: Columns popkin writes (simulation, residuals); never taken as covariates.
OUTPUT_COLUMNS: tuple[str, ...] = (
    "PRED",
    "IPRED",
    "RES",
    "WRES",
    "CWRES",
    "IWRES",
    "NPDE",
    "REP",
    "SIM",
)


def is_output_column(name: str) -> bool:
    """True for columns popkin writes itself (PRED, IPRED, residuals, REP, ETA_*)."""
    return name in OUTPUT_COLUMNS or name.startswith("ETA_")


#: NONMEM columns with a fixed meaning (everything else may be a covariate), canonical order.
RESERVED_COLUMNS: tuple[str, ...] = (
    "ID",
    "TIME",
    "DV",
    "AMT",
    "EVID",
    "MDV",
    "CMT",
    "RATE",
    "DUR",
    "II",
    "ADDL",
    "SS",
    "CENS",
    "LIMIT",
    "DVID",
)
_DEFAULTS: dict[str, float] = {
    "AMT": 0.0,
    "CMT": 1.0,
    "RATE": 0.0,
    "DUR": 0.0,
    "II": 0.0,
    "ADDL": 0.0,
    "SS": 0.0,
    "CENS": 0.0,
    "LIMIT": -math.inf,
    "DVID": 1.0,
}
#: Largest ADDL accepted: every additional dose becomes an entry of the dose arrays.
MAX_ADDL = 100_000
_INT_COLUMNS = ("EVID", "MDV", "CMT", "ADDL", "SS", "CENS")
_MISSING_TOKENS = ("", ".", "NA", "NaN", "nan", "NULL", "null")


class _Collector:
    """Collects problems, at most one per (row, column)."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self._seen: set[tuple[int | None, str | None]] = set()

    def add(self, row: int | None, column: str | None, message: str) -> None:
        key = (row, column)
        if row is not None and key in self._seen:
            return
        self._seen.add(key)
        self.problems.append(Problem(row=row, column=column, message=message))

    def add_rows(self, mask: np.ndarray, column: str, message) -> None:
        """`message(i)` for each 0-based row `i` where `mask` holds (reported 1-based)."""
        for i in np.flatnonzero(mask):
            self.add(int(i) + 1, column, message(int(i)))

    def sorted(self) -> list[Problem]:
        return sorted(self.problems, key=lambda p: -1 if p.row is None else p.row)


def _fmt(x) -> str:
    """A value for a message: integers without '.0', missing as 'missing'."""
    if x is None:
        return "missing"
    if isinstance(x, float | np.floating):
        if math.isnan(x):
            return "missing"
        if math.isfinite(x) and float(x).is_integer():
            return str(int(x))
        return repr(float(x))
    return repr(x) if isinstance(x, str) else str(x)


def _is_missing(v) -> bool:
    if v is None:
        return True
    if isinstance(v, str):
        return v.strip() in _MISSING_TOKENS
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def _numeric(s: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convert to float64. Returns (values with NaN for missing/bad, missing mask, bad mask)."""
    if pd.api.types.is_bool_dtype(s.dtype) or (
        pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_object_dtype(s.dtype)
    ):
        vals = s.to_numpy(dtype=np.float64, na_value=np.nan)
        missing = np.isnan(vals)
        return vals, missing, np.zeros(len(s), dtype=bool)
    raw = s.astype(object).to_numpy()
    missing = np.array([_is_missing(v) for v in raw], dtype=bool)
    vals = np.full(len(raw), np.nan)
    bad = np.zeros(len(raw), dtype=bool)
    for i, v in enumerate(raw):
        if missing[i]:
            continue
        try:
            if isinstance(v, bool | np.bool_):
                vals[i] = float(v)
            else:
                vals[i] = float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError):
            bad[i] = True
        else:
            if math.isnan(vals[i]):
                missing[i] = True
    return vals, missing, bad


def _python_scalar(v):
    """numpy scalar -> Python scalar; integral floats -> int; strings stripped."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        return v.strip()
    return v


def _load(source) -> tuple[pd.DataFrame, str, str | None]:
    if isinstance(source, pd.DataFrame):
        return source.copy(), "DataFrame", None
    if not isinstance(source, str | PathLike):
        raise TypeError(f"source must be a path or a pandas DataFrame, got {type(source)!r}")
    path = str(Path(source))
    try:
        df = pd.read_csv(path, na_values=["."], skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError([Problem(None, None, "the file is empty (no header)")], path) from None
    except UnicodeDecodeError as e:
        msg = f"not a UTF-8 text (CSV) file: byte {e.start} cannot be decoded"
        raise DataError([Problem(None, None, msg)], path) from None
    except pd.errors.ParserError as e:  # ragged rows, an unclosed quote, ...
        msg = f"not a well-formed CSV table: {str(e).strip()}"
        raise DataError([Problem(None, None, msg)], path) from None
    return df, path, path


def _n_compartments(compartments) -> int | None:
    if compartments is None:
        return None
    if isinstance(compartments, bool):
        raise TypeError("compartments must be None, an int or a sequence of names")
    if isinstance(compartments, int | np.integer):
        return int(compartments)
    if isinstance(compartments, str) or not isinstance(compartments, Sequence):
        raise TypeError("compartments must be None, an int or a sequence of names")
    return len(compartments)


def read_nonmem(
    source: str | PathLike | pd.DataFrame,
    *,
    compartments: int | Sequence[str] | None = None,
    endpoints: Sequence | None = None,
    covariates: Sequence[str] | None = None,
) -> Population:
    """Read and validate a NONMEM-style table (CSV path or DataFrame) into a `Population`.

    Column names are case-insensitive. ID, TIME, DV are required (AMT too when there are doses);
    AMT, EVID, MDV, CMT, RATE, DUR, II, ADDL, SS, CENS, LIMIT, DVID get NONMEM defaults when
    absent. Every other numeric column is a covariate (carried forward within an ID, and its
    first value carried backward); non-numeric extra columns are ignored.

    Args:
        source: path to a CSV file or a DataFrame.
        compartments: None (any positive CMT), the number of compartments, or their names
            (CMT must then be in 1..n on dose rows).
        endpoints: allowed DVID values, in order (endpoint index k <-> endpoints[k]); None uses
            the sorted DVID values of the observation rows (EVID 0).
        covariates: covariate columns to keep (must exist and be numeric); None keeps all
            other numeric columns.

    Raises:
        DataError: listing every problem found (1-based data rows), nothing is half-loaded.
    """
    df, label, path = _load(source)
    n_comp = _n_compartments(compartments)
    pc = _Collector()
    df = df.reset_index(drop=True)
    names = [str(c).strip().upper() for c in df.columns]
    dupes = sorted({c for c in names if names.count(c) > 1})
    for c in dupes:
        pc.add(None, c, "column appears more than once (names are case-insensitive)")
    df.columns = names
    if dupes:
        df = df.loc[:, ~pd.Index(names).duplicated()]
    n = len(df)
    if n == 0:
        pc.add(None, None, "the table has no data rows")

    for c in ("ID", "TIME", "DV"):
        if c not in df.columns:
            pc.add(None, c, f"required column {c} is missing")

    # --- numeric conversion of the reserved columns -------------------------------------
    num: dict[str, np.ndarray] = {}
    given: dict[str, np.ndarray] = {}  # True where a value was given (not missing, not bad)
    bad_any: dict[str, np.ndarray] = {}
    raw_tab = {c: df[c].astype(object).to_numpy() for c in df.columns}
    for c in RESERVED_COLUMNS[1:]:
        if c not in df.columns:
            continue
        vals, missing, bad = _numeric(df[c])
        pc.add_rows(bad, c, lambda i, c=c: f"expected a number, found {raw_tab[c][i]!r}")
        num[c] = vals
        given[c] = ~missing & ~bad
        bad_any[c] = bad

    def col(c: str) -> np.ndarray:
        """Reserved column with defaults filled (bad values replaced by the default)."""
        if c in num:
            return np.where(given[c], num[c], _DEFAULTS[c])
        return np.full(n, _DEFAULTS[c])

    def has(c: str) -> np.ndarray:
        return given[c] if c in given else np.zeros(n, dtype=bool)

    # IDs
    if "ID" in df.columns:
        id_raw = df["ID"].to_numpy(dtype=object)
        id_missing = np.array([_is_missing(v) for v in id_raw], dtype=bool)
        pc.add_rows(id_missing, "ID", lambda i: "ID is missing")
        ids = np.array(
            [None if m else _python_scalar(v) for v, m in zip(id_raw, id_missing, strict=True)],
            dtype=object,
        )
    else:
        ids = np.arange(n).astype(object)  # placeholder; a problem is already recorded
        id_missing = np.zeros(n, dtype=bool)

    # TIME, DV
    time = num.get("TIME", np.full(n, np.nan))
    if "TIME" in df.columns:
        pc.add_rows(~has("TIME") & ~bad_any["TIME"], "TIME", lambda i: "TIME is missing")
        pc.add_rows(
            has("TIME") & ~np.isfinite(np.where(has("TIME"), time, 0.0)),
            "TIME",
            lambda i: f"TIME must be finite, found {_fmt(time[i])}",
        )
        pc.add_rows(
            has("TIME") & (np.nan_to_num(time) < 0),
            "TIME",
            lambda i: f"TIME must be >= 0, found {_fmt(time[i])}",
        )
    dv = num.get("DV", np.full(n, np.nan))
    dv_given = has("DV")
    pc.add_rows(
        dv_given & ~np.isfinite(np.where(dv_given, dv, 0.0)),
        "DV",
        lambda i: f"DV must be finite, found {_fmt(dv[i])}",
    )

    amt = col("AMT")

    # EVID (default 0 if AMT == 0 else 1)
    evid_default = np.where(amt != 0, 1.0, 0.0)
    evid_f = np.where(has("EVID"), num.get("EVID", evid_default), evid_default)
    evid_ok = np.isin(evid_f, [0.0, 1.0, 2.0, 3.0, 4.0])
    pc.add_rows(
        ~evid_ok, "EVID", lambda i: f"EVID must be one of 0, 1, 2, 3, 4; found {_fmt(evid_f[i])}"
    )
    evid = np.where(evid_ok, evid_f, -1).astype(np.int64)
    dose = (evid == 1) | (evid == 4)
    reset = (evid == 3) | (evid == 4)

    if "AMT" not in df.columns and dose.any():
        pc.add(None, "AMT", "required column AMT is missing (the table has dose rows, EVID 1/4)")

    # MDV (default: 1 on non-observation rows; on EVID 0 rows 1 if DV is missing else 0)
    mdv_default = np.where(evid != 0, 1.0, np.where(dv_given, 0.0, 1.0))
    mdv = np.where(has("MDV"), num.get("MDV", mdv_default), mdv_default)
    pc.add_rows(
        has("MDV") & ~np.isin(mdv, [0.0, 1.0]),
        "MDV",
        lambda i: f"MDV must be 0 or 1, found {_fmt(mdv[i])}",
    )
    pc.add_rows(
        (evid == 0)
        & ("DV" in df.columns)
        & ~dv_given
        & ~bad_any.get("DV", np.zeros(n, bool))
        & has("MDV")
        & (mdv == 0),
        "DV",
        lambda i: "DV is missing on an observation row (EVID 0) with MDV=0; give DV or set MDV=1",
    )
    obs = (evid == 0) & (mdv == 0) & dv_given

    # CMT
    cmt = col("CMT")
    cmt_int = np.isfinite(cmt) & (cmt == np.round(cmt))
    pc.add_rows(~cmt_int, "CMT", lambda i: f"CMT must be an integer, found {_fmt(cmt[i])}")
    upper = n_comp if n_comp is not None else np.inf
    bad_cmt = dose & cmt_int & ((cmt < 1) | (cmt > upper))
    rng = f"1..{n_comp}" if n_comp is not None else "a positive integer"
    pc.add_rows(
        bad_cmt,
        "CMT",
        lambda i: f"CMT on a dose row must be {rng} (a known compartment), found {_fmt(cmt[i])}",
    )

    # RATE, DUR, II, ADDL, SS, CENS, LIMIT
    rate = col("RATE")
    dur = col("DUR")
    ii = col("II")
    addl = col("ADDL")
    ss = col("SS")
    cens = col("CENS")
    limit = col("LIMIT")
    pc.add_rows(~np.isfinite(amt), "AMT", lambda i: f"AMT must be finite, found {_fmt(amt[i])}")
    pc.add_rows(~np.isfinite(rate), "RATE", lambda i: f"RATE must be finite, found {_fmt(rate[i])}")
    pc.add_rows(
        ~np.isfinite(dur) | (dur < 0), "DUR", lambda i: f"DUR must be >= 0, found {_fmt(dur[i])}"
    )
    pc.add_rows(
        ~np.isfinite(ii) | (ii < 0), "II", lambda i: f"II must be >= 0, found {_fmt(ii[i])}"
    )
    pc.add_rows(
        ~np.isfinite(addl) | (addl < 0) | (addl != np.round(addl)),
        "ADDL",
        lambda i: f"ADDL must be a non-negative integer, found {_fmt(addl[i])}",
    )
    pc.add_rows(
        np.isfinite(addl) & (addl > MAX_ADDL),
        "ADDL",
        lambda i: f"ADDL must be <= {MAX_ADDL} (each dose is expanded), found {_fmt(addl[i])}",
    )
    pc.add_rows(
        ~np.isin(ss, [0.0, 1.0, 2.0]), "SS", lambda i: f"SS must be 0, 1 or 2, found {_fmt(ss[i])}"
    )
    pc.add_rows(
        ~np.isin(cens, [-1.0, 0.0, 1.0]),
        "CENS",
        lambda i: f"CENS must be -1, 0 or 1, found {_fmt(cens[i])}",
    )
    pc.add_rows(
        np.isnan(limit) | (limit == np.inf),
        "LIMIT",
        lambda i: f"LIMIT must be a number or -inf, found {_fmt(limit[i])}",
    )

    # Dose-row rules
    continuous = dose & (ss > 0) & (rate > 0) & (amt == 0)
    pc.add_rows(
        dose & ("AMT" in df.columns) & ~(amt > 0) & ~continuous & np.isfinite(amt),
        "AMT",
        lambda i: (
            f"AMT must be > 0 on a dose row (EVID {evid[i]}), found "
            f"{_fmt(amt[i]) if has('AMT')[i] else 'missing'}"
        ),
    )
    pc.add_rows(
        dose & (ii > 0) & (addl <= 0) & (ss <= 0),
        "II",
        lambda i: (
            f"II > 0 needs ADDL > 0 or SS > 0 on a dose row, found II={_fmt(ii[i])}, "
            f"ADDL={_fmt(addl[i])}, SS={_fmt(ss[i])}"
        ),
    )
    pc.add_rows(
        dose & (addl > 0) & ~(ii > 0),
        "ADDL",
        lambda i: f"ADDL > 0 needs II > 0, found ADDL={_fmt(addl[i])}, II={_fmt(ii[i])}",
    )
    pc.add_rows(
        dose & (ss > 0) & ~(ii > 0) & ~continuous,
        "SS",
        lambda i: (
            f"SS > 0 needs II > 0 (except a steady-state constant infusion, AMT=0 "
            f"with RATE>0), found SS={_fmt(ss[i])}, II={_fmt(ii[i])}"
        ),
    )
    pc.add_rows(
        continuous & (addl > 0),
        "ADDL",
        lambda i: (
            "ADDL must be 0 for a steady-state constant infusion (SS>0, AMT=0, "
            f"RATE>0), found ADDL={_fmt(addl[i])}"
        ),
    )
    pc.add_rows(
        dose & (rate == -2) & ~(dur > 0),
        "DUR",
        lambda i: (
            "RATE=-2 needs a positive DUR, found "
            + (_fmt(dur[i]) if "DUR" in df.columns else "no DUR column")
        ),
    )
    pc.add_rows(
        dose & (rate == -1),
        "RATE",
        lambda i: "RATE=-1 (modelled rate) is not supported; give RATE>0 or RATE=-2 with DUR",
    )
    pc.add_rows(
        dose & (rate < 0) & (rate != -1) & (rate != -2),
        "RATE",
        lambda i: f"RATE must be >= 0 or -2 (duration in DUR), found {_fmt(rate[i])}",
    )

    # DVID / endpoints
    dvid = col("DVID")
    pc.add_rows(~np.isfinite(dvid), "DVID", lambda i: f"DVID must be finite, found {_fmt(dvid[i])}")
    if endpoints is not None:
        endpoints_t = tuple(_python_scalar(e) for e in endpoints)
        allowed = set(endpoints_t)
        known = np.array([_python_scalar(v) in allowed for v in dvid], dtype=bool)
        pc.add_rows(
            (evid == 0) & ~known,
            "DVID",
            lambda i: f"DVID must be one of {list(endpoints_t)}, found {_fmt(dvid[i])}",
        )
    else:
        pool = dvid[evid == 0] if (evid == 0).any() else dvid
        endpoints_t = tuple(_python_scalar(v) for v in np.unique(pool[np.isfinite(pool)]))
        if not endpoints_t:
            endpoints_t = (1,)

    # --- subjects: contiguity, time order, internal time -------------------------------
    starts = [0] if n else []
    for i in range(1, n):
        if id_missing[i] or id_missing[i - 1] or ids[i] != ids[i - 1]:
            starts.append(i)
    runs = list(zip(starts, [*starts[1:], n], strict=True)) if n else []
    seen: dict = {}
    for s, _e in runs:
        key = ids[s]
        if id_missing[s]:
            continue
        if key in seen:
            pc.add(
                s + 1,
                "ID",
                f"ID {key!r} reappears after other IDs (first seen at row "
                f"{seen[key] + 1}); rows of one ID must be contiguous",
            )
        else:
            seen[key] = s

    t_int = np.where(np.isfinite(time), time, np.nan)
    time_ok = has("TIME") & np.isfinite(time)
    for s, e in runs:
        offset = 0.0
        prev: float | None = None
        prev_reset = False
        for i in range(s, e):
            if not time_ok[i]:
                prev_reset = bool(reset[i])
                continue
            ti = time[i] + offset
            if prev is not None and ti < prev:
                if reset[i] or prev_reset:
                    offset = prev - time[i]
                    ti = prev
                else:
                    pc.add(
                        i + 1,
                        "TIME",
                        f"TIME decreases within ID {ids[i]!r} (from "
                        f"{_fmt(prev - offset)} to {_fmt(time[i])}); TIME may restart only on "
                        "or right after a reset row (EVID 3/4)",
                    )
            t_int[i] = ti
            prev = ti
            prev_reset = bool(reset[i])

    # --- covariates ----------------------------------------------------------------------
    extra = [c for c in df.columns if c not in RESERVED_COLUMNS and not is_output_column(c)]
    cov_names: list[str] = []
    cov_vals: dict[str, np.ndarray] = {}
    if covariates is not None:
        for name in covariates:
            c = str(name).strip().upper()
            if c in RESERVED_COLUMNS:
                pc.add(None, c, f"{c} is a reserved NONMEM column, not a covariate")
                continue
            if c not in df.columns:
                pc.add(None, c, f"requested covariate column {c} is missing")
                continue
            vals, missing, bad = _numeric(df[c])
            pc.add_rows(
                bad, c, lambda i, c=c: f"covariate {c} must be numeric, found {raw_tab[c][i]!r}"
            )
            if missing.all() and n:
                pc.add(None, c, f"requested covariate column {c} has no values")
            if c not in cov_names:
                cov_names.append(c)
                cov_vals[c] = vals
    else:
        for c in extra:
            vals, missing, bad = _numeric(df[c])
            if bad.any() or missing.all():
                continue
            cov_names.append(c)
            cov_vals[c] = vals

    if pc.problems:
        raise DataError(pc.sorted(), label)

    # --- build the arrays -----------------------------------------------------------------
    run_of_row = np.zeros(n, dtype=np.int64)
    for k, (s, e) in enumerate(runs):
        run_of_row[s:e] = k
    cov_filled = np.zeros((n, len(cov_names)))
    for j, c in enumerate(cov_names):
        ser = pd.Series(cov_vals[c])
        filled = ser.groupby(run_of_row).ffill().groupby(run_of_row).bfill().to_numpy()
        hole = np.isnan(filled)
        if hole.any():
            median = float(np.nanmedian(cov_vals[c]))
            empty_ids = [ids[s] for s, _e in runs if hole[s]]
            warnings.warn(
                f"covariate {c} is missing for every row of ID(s) {empty_ids}; filled with the "
                f"column median {median:g}",
                stacklevel=2,
            )
            filled = np.where(hole, median, filled)
        cov_filled[:, j] = filled

    ep_index = {e: k for k, e in enumerate(endpoints_t)}
    end = np.full(n, np.inf)
    subj_records: list[list[int]] = []
    subj_doses: list[list[tuple]] = []
    subj_resets: list[list[float]] = []
    for s, e in runs:
        next_reset = np.inf
        for i in range(e - 1, s - 1, -1):
            if dose[i]:
                end[i] = next_reset
            if reset[i]:
                next_reset = t_int[i]
        recs = [i for i in range(s, e) if evid[i] in (0, 2)]
        dlist: list[tuple] = []
        for i in range(s, e):
            if not dose[i]:
                continue
            if continuous[i]:
                a, r, d = 0.0, rate[i], np.inf
            elif rate[i] > 0:
                a, r, d = amt[i], rate[i], amt[i] / rate[i]
            elif rate[i] == -2:
                a, r, d = amt[i], amt[i] / dur[i], dur[i]
            else:
                a, r, d = amt[i], 0.0, 0.0
            for k in range(int(addl[i]) + 1):
                is_ss = k == 0 and ss[i] > 0
                dlist.append(
                    (
                        t_int[i] + k * ii[i],
                        a,
                        int(cmt[i]) - 1,
                        r,
                        d,
                        int(ss[i]) if is_ss else 0,
                        ii[i] if is_ss else 0.0,
                        end[i],
                        i if k == 0 else ROW_AFTER,
                    )
                )
        subj_records.append(recs)
        subj_doses.append(dlist)
        subj_resets.append([float(t_int[i]) for i in range(s, e) if reset[i]])

    S = len(runs)
    R = max([1, *(len(r) for r in subj_records)])
    D = max([1, *(len(d) for d in subj_doses)])
    K = max([1, *(len(r) for r in subj_resets)])
    C = len(cov_names)

    r_time = np.zeros((S, R))
    r_dv = np.zeros((S, R))
    r_obs = np.zeros((S, R), dtype=bool)
    r_rec = np.zeros((S, R), dtype=bool)
    r_ep = np.zeros((S, R), dtype=np.int32)
    r_cens = np.zeros((S, R), dtype=np.int32)
    r_limit = np.full((S, R), -np.inf)
    r_cov = np.zeros((S, R, C))
    r_row = np.full((S, R), -1, dtype=np.int32)
    cov0 = np.zeros((S, C))
    d_time = np.zeros((S, D))
    d_amt = np.zeros((S, D))
    d_cmt = np.zeros((S, D), dtype=np.int32)
    d_rate = np.zeros((S, D))
    d_dur = np.zeros((S, D))
    d_ss = np.zeros((S, D), dtype=np.int32)
    d_ii = np.zeros((S, D))
    d_end = np.zeros((S, D))
    d_mask = np.zeros((S, D), dtype=bool)
    d_row = np.full((S, D), ROW_AFTER, dtype=np.int32)
    resets_arr = np.full((S, K), np.inf)

    for k, (s, e) in enumerate(runs):
        recs = np.asarray(subj_records[k], dtype=np.int64)
        m = len(recs)
        cov0[k] = cov_filled[s]
        last_t = t_int[recs[-1]] if m else t_int[e - 1]
        r_time[k] = last_t
        r_cov[k] = cov_filled[recs[-1]] if m else cov0[k]
        if m:
            r_time[k, :m] = t_int[recs]
            r_dv[k, :m] = np.where(dv_given[recs], dv[recs], 0.0)
            r_obs[k, :m] = obs[recs]
            r_rec[k, :m] = True
            r_ep[k, :m] = [ep_index.get(_python_scalar(v), 0) for v in dvid[recs]]
            r_cens[k, :m] = cens[recs].astype(np.int32)
            r_limit[k, :m] = limit[recs]
            r_cov[k, :m] = cov_filled[recs]
            r_row[k, :m] = recs
        dl = subj_doses[k]
        if dl:
            arr = np.array(dl, dtype=np.float64)
            q = len(dl)
            d_time[k, :q] = arr[:, 0]
            d_amt[k, :q] = arr[:, 1]
            d_cmt[k, :q] = arr[:, 2].astype(np.int32)
            d_rate[k, :q] = arr[:, 3]
            d_dur[k, :q] = arr[:, 4]
            d_ss[k, :q] = arr[:, 5].astype(np.int32)
            d_ii[k, :q] = arr[:, 6]
            d_end[k, :q] = arr[:, 7]
            d_mask[k, :q] = True
            d_row[k, :q] = arr[:, 8].astype(np.int32)
        rs = subj_resets[k]
        resets_arr[k, : len(rs)] = rs

    subjects = Subjects(
        doses=Doses(
            time=jnp.asarray(d_time),
            amt=jnp.asarray(d_amt),
            cmt=jnp.asarray(d_cmt),
            rate=jnp.asarray(d_rate),
            dur=jnp.asarray(d_dur),
            ss=jnp.asarray(d_ss),
            ii=jnp.asarray(d_ii),
            end=jnp.asarray(d_end),
            mask=jnp.asarray(d_mask),
            row=jnp.asarray(d_row),
            kinds=dose_kinds(d_mask, d_dur, d_rate, d_ss),
        ),
        records=Records(
            time=jnp.asarray(r_time),
            dv=jnp.asarray(r_dv),
            obs=jnp.asarray(r_obs),
            rec=jnp.asarray(r_rec),
            endpoint=jnp.asarray(r_ep),
            cens=jnp.asarray(r_cens),
            limit=jnp.asarray(r_limit),
            cov=jnp.asarray(r_cov),
            row=jnp.asarray(r_row),
        ),
        cov0=jnp.asarray(cov0),
        resets=jnp.asarray(resets_arr),
    )

    # --- canonical table -------------------------------------------------------------------
    table = pd.DataFrame({"ID": pd.Series(list(ids), dtype=object)})
    if all(isinstance(v, int) and -(2**63) <= v < 2**63 for v in ids):
        table["ID"] = table["ID"].astype(np.int64)
    table["TIME"] = time
    table["DV"] = np.where(dv_given, dv, np.nan)
    table["AMT"] = amt
    table["EVID"] = evid
    table["MDV"] = mdv.astype(np.int64)
    table["CMT"] = cmt.astype(np.int64)
    for c in ("RATE", "DUR", "II"):
        table[c] = col(c)
    table["ADDL"] = addl.astype(np.int64)
    table["SS"] = ss.astype(np.int64)
    table["CENS"] = cens.astype(np.int64)
    table["LIMIT"] = limit
    table["DVID"] = dvid.astype(np.int64) if np.all(dvid == np.round(dvid)) else dvid
    for c in extra:
        table[c] = cov_vals[c] if c in cov_vals else df[c].to_numpy()

    info = PopulationInfo(
        ids=tuple(ids[s] for s, _e in runs),
        covariates=tuple(cov_names),
        endpoints=endpoints_t,
        table=table,
        source=path,
    )
    return Population(subjects=subjects, info=info)
