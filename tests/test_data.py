"""Tests for `popkin.data`: reading/validating NONMEM tables and the bundled data sets."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

jax.config.update("jax_enable_x64", True)

from popkin.data import DataError, Population, Problem, datasets, read_nonmem  # noqa: E402

INF = math.inf
NA = np.nan

# A valid table exercising most features (1-based data rows in the comments).
VALID = pd.DataFrame(
    [
        # ID TIME DV  AMT  EVID MDV CMT RATE DUR II ADDL SS CENS DVID WT
        (1, 0.0, NA, 100, 1, 1, 1, 0, 0, 12, 2, 0, 0, NA, 70),  # 1 dose, ADDL 2 / II 12
        (1, 1.0, 5.0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, NA),  # 2 obs, WT carried forward
        (1, 2.0, 3.0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 72),  # 3 obs of DVID 2, WT changes
        (1, 4.0, NA, 0, 2, 1, 1, 0, 0, 0, 0, 0, 0, NA, NA),  # 4 EVID 2 record
        (1, 30.0, NA, 0, 3, 1, 1, 0, 0, 0, 0, 0, 0, NA, NA),  # 5 reset
        (1, 0.0, NA, 50, 1, 1, 1, 25, 0, 0, 0, 0, 0, NA, NA),  # 6 TIME restarts; infusion
        (1, 1.0, 2.0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, NA),  # 7 obs (internal 31)
        (2, 0.0, NA, 200, 1, 1, 2, -2, 4, 0, 0, 0, 0, NA, NA),  # 8 RATE -2, DUR 4 into CMT 2
        (2, 6.0, 10.0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 80),  # 9 obs, WT carried back to row 8
        (2, 24.0, NA, 100, 1, 1, 1, 0, 0, 24, 1, 1, 0, NA, NA),  # 10 SS dose + 1 ADDL copy
        (2, 50.0, NA, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, NA),  # 11 EVID 0, MDV 1 (no DV)
        (3, 0.0, 0.1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 1, 60),  # 12 BLQ observation (CENS 1)
        (3, 10.0, NA, 10, 1, 1, 1, 0, 0, 0, 0, 0, 0, NA, NA),  # 13 dose, ended by row 14
        (3, 0.0, NA, 20, 4, 1, 1, 0, 0, 0, 0, 0, 0, NA, NA),  # 14 reset+dose, TIME restarts
        (3, 2.0, 4.0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, NA),  # 15 obs (internal 12)
    ],
    columns=["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "II", "ADDL", "SS",
             "CENS", "DVID", "WT"],
)  # fmt: skip


def _write(tmp_path: Path, df: pd.DataFrame, name: str = "data.csv") -> Path:
    path = tmp_path / name
    df.to_csv(path, index=False, na_rep=".")
    return path


def _a(x) -> np.ndarray:
    return np.asarray(x)


@pytest.fixture(scope="module")
def valid_pop(tmp_path_factory) -> Population:
    path = _write(tmp_path_factory.mktemp("valid"), VALID)
    return read_nonmem(path)


def test_valid_table_structure(valid_pop: Population):
    pop = valid_pop
    assert pop.n_subjects == 3
    assert pop.ids == (1, 2, 3)
    assert pop.endpoints == (1, 2)
    assert pop.covariates == ("WT",)
    assert pop.n_observations == 6
    s = pop.subjects
    assert s.records.time.shape == (3, 4)
    assert s.doses.time.shape == (3, 4)
    assert s.resets.shape == (3, 1)
    assert s.records.time.dtype == np.float64
    assert s.records.endpoint.dtype == np.int32
    assert s.doses.mask.dtype == np.bool_
    assert pop.info.source is not None and pop.info.source.endswith("data.csv")


def test_valid_table_doses(valid_pop: Population):
    d = valid_pop.subjects.doses
    np.testing.assert_array_equal(_a(d.mask), [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(_a(d.time)[0], [0, 12, 24, 30])  # ADDL expanded; reset offset
    np.testing.assert_allclose(_a(d.amt)[0], [100, 100, 100, 50])
    np.testing.assert_allclose(_a(d.rate)[0], [0, 0, 0, 25])
    np.testing.assert_allclose(_a(d.dur)[0], [0, 0, 0, 2])
    np.testing.assert_allclose(_a(d.end)[0], [30, 30, 30, INF])
    # Subject 2: RATE -2 with DUR 4, then an SS dose with one ordinary ADDL copy.
    np.testing.assert_allclose(_a(d.time)[1, :3], [0, 24, 48])
    np.testing.assert_allclose(_a(d.rate)[1, :3], [50, 0, 0])
    np.testing.assert_allclose(_a(d.dur)[1, :3], [4, 0, 0])
    np.testing.assert_array_equal(_a(d.cmt)[1, :3], [1, 0, 0])
    np.testing.assert_array_equal(_a(d.ss)[1, :3], [0, 1, 0])
    np.testing.assert_allclose(_a(d.ii)[1, :3], [0, 24, 0])
    np.testing.assert_allclose(_a(d.end)[1, :3], [INF, INF, INF])
    # Subject 3: EVID 4 row restarts TIME; the earlier dose ends there, its own does not.
    np.testing.assert_allclose(_a(d.time)[2, :2], [10, 10])
    np.testing.assert_allclose(_a(d.amt)[2, :2], [10, 20])
    np.testing.assert_allclose(_a(d.end)[2, :2], [10, INF])
    assert np.all(np.isfinite(_a(d.time)))


def test_valid_table_records(valid_pop: Population):
    r = valid_pop.subjects.records
    np.testing.assert_array_equal(_a(r.rec), [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_array_equal(_a(r.obs), [[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(_a(r.time)[0], [1, 2, 4, 31])
    np.testing.assert_allclose(_a(r.time)[1], [6, 50, 50, 50])  # padded with the last time
    np.testing.assert_allclose(_a(r.time)[2, :2], [0, 12])
    np.testing.assert_array_equal(_a(r.endpoint)[0], [0, 1, 0, 0])
    np.testing.assert_allclose(_a(r.dv)[0], [5, 3, 0, 2])
    np.testing.assert_array_equal(_a(r.cens)[2, :2], [1, 0])
    assert np.all(_a(r.limit) == -INF)
    np.testing.assert_array_equal(_a(r.row), [[1, 2, 3, 6], [8, 10, -1, -1], [11, 14, -1, -1]])
    np.testing.assert_allclose(_a(r.cov)[0, :, 0], [70, 72, 72, 72])
    np.testing.assert_allclose(_a(r.cov)[1, :2, 0], [80, 80])
    np.testing.assert_allclose(_a(valid_pop.subjects.cov0)[:, 0], [70, 80, 60])
    np.testing.assert_allclose(_a(valid_pop.subjects.resets)[:, 0], [30, INF, 10])


def test_valid_table_canonical(valid_pop: Population):
    t = valid_pop.to_dataframe()
    reserved = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "II", "ADDL",
                "SS", "CENS", "LIMIT", "DVID"]  # fmt: skip
    assert list(t.columns[:15]) == reserved
    assert len(t) == len(VALID)
    np.testing.assert_allclose(t["TIME"], VALID["TIME"])  # original TIME kept
    assert (t["LIMIT"] == -INF).all()
    assert t["DVID"].tolist()[:3] == [1, 1, 2]


def test_roundtrip_via_canonical_table(valid_pop: Population, tmp_path: Path):
    again = read_nonmem(_write(tmp_path, valid_pop.to_dataframe()))
    for a, b in zip(jax.tree.leaves(valid_pop.subjects), jax.tree.leaves(again.subjects),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(_a(a), _a(b))


def test_dataframe_source_and_dot_missing():
    df = VALID.astype(object).where(VALID.notna(), ".")
    pop = read_nonmem(df)
    assert pop.info.source is None
    assert pop.n_observations == 6


def test_case_insensitive_and_defaults(tmp_path: Path):
    path = tmp_path / "lower.csv"
    path.write_text(
        "id,Time,dv,amt,wt\n1,0,.,100,70\n1,1,5,0,70\n1,2,.,0,70\n2,0,.,50,60\n2,3,2,0,60\n"
    )
    pop = read_nonmem(path)
    t = pop.table
    assert t["EVID"].tolist() == [1, 0, 0, 1, 0]
    assert t["MDV"].tolist() == [1, 0, 1, 1, 0]
    assert t["CMT"].tolist() == [1] * 5
    assert (t["RATE"] == 0).all() and (t["SS"] == 0).all() and (t["DVID"] == 1).all()
    assert pop.covariates == ("WT",)
    assert pop.n_observations == 2
    np.testing.assert_array_equal(_a(pop.subjects.records.rec), [[1, 1], [1, 0]])


def test_non_numeric_extra_column_ignored(tmp_path: Path):
    df = VALID.assign(SEX=["m"] * 7 + ["f"] * 4 + ["m"] * 4)
    pop = read_nonmem(_write(tmp_path, df))
    assert pop.covariates == ("WT",)
    pop = read_nonmem(df, covariates=["wt"])
    assert pop.covariates == ("WT",)


def test_covariate_missing_for_a_whole_id_is_filled_with_median(tmp_path: Path):
    df = VALID.copy()
    df.loc[df["ID"] == 3, "WT"] = NA
    with pytest.warns(UserWarning, match="WT"):
        pop = read_nonmem(df)
    median = float(np.nanmedian(df["WT"].astype(float)))
    np.testing.assert_allclose(_a(pop.subjects.cov0)[2, 0], median)
    assert np.all(np.isfinite(_a(pop.subjects.records.cov)))


def test_steady_state_constant_infusion():
    df = pd.DataFrame(
        {"ID": [1, 1], "TIME": [0, 5], "DV": [NA, 3.0], "AMT": [0, 0], "EVID": [1, 0],
         "RATE": [10, 0], "SS": [1, 0]}
    )  # fmt: skip
    d = read_nonmem(df).subjects.doses
    assert float(d.amt[0, 0]) == 0 and float(d.rate[0, 0]) == 10
    assert float(d.dur[0, 0]) == INF and int(d.ss[0, 0]) == 1


def test_endpoints_and_compartments_arguments():
    pop = read_nonmem(VALID, endpoints=[2, 1], compartments=["depot", "central"])
    assert pop.endpoints == (2, 1)
    np.testing.assert_array_equal(_a(pop.subjects.records.endpoint)[0, :3], [1, 0, 1])


# --- validation ---------------------------------------------------------------------------

BASE = (
    "ID,TIME,DV,AMT,EVID,MDV,CMT,RATE,DUR,II,ADDL,SS,CENS,LIMIT,DVID,WT\n"
    "1,0,.,100,1,1,1,0,0,0,0,0,0,.,1,70\n"
    "1,1,5,0,0,0,1,0,0,0,0,0,0,.,1,70\n"
    "1,2,4,0,0,0,1,0,0,0,0,0,0,.,1,70\n"
    "2,0,.,100,1,1,1,0,0,0,0,0,0,.,1,80\n"
    "2,1,6,0,0,0,1,0,0,0,0,0,0,.,1,80\n"
    "2,2,3,0,0,0,1,0,0,0,0,0,0,.,1,80\n"
)


def _edit(row: int, **values) -> str:
    """BASE with cells of 1-based data row `row` replaced."""
    df = pd.read_csv(pd.io.common.StringIO(BASE), dtype=str, keep_default_na=False)
    for c, v in values.items():
        df.loc[row - 1, c] = str(v)
    return df.to_csv(index=False)


def _drop(column: str) -> str:
    df = pd.read_csv(pd.io.common.StringIO(BASE), dtype=str, keep_default_na=False)
    return df.drop(columns=[column]).to_csv(index=False)


def test_base_table_is_valid(tmp_path: Path):
    path = tmp_path / "base.csv"
    path.write_text(BASE)
    assert read_nonmem(path).n_observations == 4


NUMERIC = ["TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "DUR", "II", "ADDL", "SS", "CENS",
           "LIMIT", "DVID"]  # fmt: skip

CASES = [
    pytest.param(_drop("ID"), {}, None, "ID", id="missing-ID"),
    pytest.param(_drop("TIME"), {}, None, "TIME", id="missing-TIME"),
    pytest.param(_drop("DV"), {}, None, "DV", id="missing-DV"),
    pytest.param(_drop("AMT"), {}, None, "AMT", id="missing-AMT-with-doses"),
    *[pytest.param(_edit(2, **{c: "x1"}), {}, 2, c, id=f"non-numeric-{c}") for c in NUMERIC],
    pytest.param(_edit(2, WT="heavy"), {"covariates": ["WT"]}, 2, "WT", id="non-numeric-cov"),
    pytest.param(BASE, {"covariates": ["HT"]}, None, "HT", id="missing-covariate"),
    pytest.param(_edit(1, TIME=-1), {}, 1, "TIME", id="negative-TIME"),
    pytest.param(_edit(3, TIME=0.5), {}, 3, "TIME", id="decreasing-TIME"),
    pytest.param(_edit(2, EVID=5), {}, 2, "EVID", id="EVID-5"),
    pytest.param(_edit(1, AMT=0), {}, 1, "AMT", id="dose-AMT-0"),
    pytest.param(_edit(4, AMT=-5), {}, 4, "AMT", id="dose-AMT-negative"),
    pytest.param(_edit(2, DV="."), {}, 2, "DV", id="missing-DV-with-MDV-0"),
    pytest.param(_edit(1, CMT=0), {}, 1, "CMT", id="CMT-0"),
    pytest.param(_edit(1, CMT=1.5), {}, 1, "CMT", id="CMT-non-integer"),
    pytest.param(_edit(4, CMT=3), {"compartments": 2}, 4, "CMT", id="CMT-beyond-n"),
    pytest.param(
        _edit(4, CMT=3), {"compartments": ["depot", "central"]}, 4, "CMT", id="CMT-beyond-names"
    ),  # fmt: skip
    pytest.param(_edit(5, DVID=3), {"endpoints": [1, 2]}, 5, "DVID", id="unknown-DVID"),
    pytest.param(_edit(1, II=12), {}, 1, "II", id="II-without-ADDL-or-SS"),
    pytest.param(_edit(1, ADDL=2), {}, 1, "ADDL", id="ADDL-without-II"),
    pytest.param(_edit(1, SS=1), {}, 1, "SS", id="SS-without-II"),
    pytest.param(_edit(1, RATE=-2), {}, 1, "DUR", id="RATE-2-without-DUR"),
    pytest.param(_edit(1, RATE=-1), {}, 1, "RATE", id="RATE-1"),
    pytest.param(_edit(1, RATE=-3), {}, 1, "RATE", id="RATE-negative"),
    pytest.param(_edit(1, SS=3, II=12), {}, 1, "SS", id="SS-3"),
    pytest.param(_edit(3, CENS=2), {}, 3, "CENS", id="CENS-2"),
    pytest.param(_edit(6, ID=1), {}, 6, "ID", id="ID-not-contiguous"),
    pytest.param(BASE.splitlines()[0] + "\n", {}, None, None, id="empty-table"),
]


@pytest.mark.parametrize(("text", "kwargs", "row", "column"), CASES)
def test_validation_rule(tmp_path: Path, text: str, kwargs: dict, row, column):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_nonmem(path, **kwargs)
    err = info.value
    assert err.source == str(path)
    assert all(isinstance(p, Problem) for p in err.problems)
    assert any(p.row == row and p.column == column for p in err.problems), err.problems


def test_rate_minus_one_message():
    with pytest.raises(DataError, match=r"RATE=-1 \(modelled rate\) is not supported"):
        read_nonmem(pd.read_csv(pd.io.common.StringIO(_edit(1, RATE=-1))))


def test_dataframe_error_source():
    with pytest.raises(DataError) as info:
        read_nonmem(pd.read_csv(pd.io.common.StringIO(_edit(1, AMT=0))))
    assert info.value.source == "DataFrame"
    assert "row 1, column AMT" in str(info.value)


def test_all_problems_are_listed(tmp_path: Path):
    df = pd.read_csv(pd.io.common.StringIO(BASE), dtype=str, keep_default_na=False)
    df.loc[0, "AMT"] = "0"  # row 1
    df.loc[1, "EVID"] = "7"  # row 2
    df.loc[2, "TIME"] = "abc"  # row 3
    df.loc[4, "CENS"] = "5"  # row 5
    df.loc[5, "RATE"] = "-1"  # row 6 (not a dose row: ignored)
    df.loc[3, "RATE"] = "-1"  # row 4
    path = tmp_path / "many.csv"
    df.to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        read_nonmem(path)
    found = {(p.row, p.column) for p in info.value.problems}
    assert found == {(1, "AMT"), (2, "EVID"), (3, "TIME"), (4, "RATE"), (5, "CENS")}
    assert [p.row for p in info.value.problems] == [1, 2, 3, 4, 5]


# --- bundled data sets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n_subjects", "n_obs"),
    [("theophylline", 12, 132), ("indometacin", 6, 66), ("phenobarbital", 59, 155),
     ("quinidine", 136, 361)],
)  # fmt: skip
def test_datasets(name: str, n_subjects: int, n_obs: int):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pop = getattr(datasets, name)()
    assert pop.n_subjects == n_subjects
    assert pop.n_observations == n_obs
    table = getattr(datasets, f"{name}_table")()
    assert int(((table["EVID"] == 0) & (table["MDV"] == 0)).sum()) == n_obs
    assert np.all(np.isfinite(_a(pop.subjects.records.cov)))


def test_theophylline_details():
    pop = datasets.theophylline()
    assert pop.covariates == ("WT",)
    d = pop.subjects.doses
    np.testing.assert_allclose(float(d.amt[0, 0]), 4.02 * 79.6)
    assert float(pop.subjects.records.time[0, 0]) == 0.0  # t=0 sample kept, after the dose


def test_quinidine_steady_state():
    pop = datasets.quinidine()
    ss = _a(pop.subjects.doses.ss)
    ii = _a(pop.subjects.doses.ii)
    assert ss.sum() > 0 and np.all(ii[ss == 1] > 0)
    assert "CRCL_LT50" in pop.covariates


# --- property test ------------------------------------------------------------------------------


@st.composite
def _tables(draw) -> pd.DataFrame:
    rows = []
    for sid in range(1, draw(st.integers(1, 4)) + 1):
        t = 0.0
        for _ in range(draw(st.integers(1, 6))):
            t += draw(st.sampled_from([0.0, 0.5, 1.0, 2.5, 12.0]))
            if draw(st.booleans()):
                addl = draw(st.integers(0, 3))
                ii = draw(st.floats(0.5, 24)) if addl else 0.0
                amt = draw(st.floats(0.1, 1e3))
                rows.append(dict(ID=sid, TIME=t, DV=NA, AMT=amt, EVID=1, ADDL=addl, II=ii))
            else:
                dv = draw(st.one_of(st.just(NA), st.floats(-1e3, 1e3)))
                rows.append(dict(ID=sid, TIME=t, DV=dv, AMT=0.0, EVID=0, ADDL=0, II=0.0))
    return pd.DataFrame(rows)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_tables())
def test_random_valid_tables_load(df: pd.DataFrame):
    pop = read_nonmem(df)
    expected = int(((df["EVID"] == 0) & df["DV"].notna()).sum())
    assert pop.n_observations == expected
    assert int(_a(pop.subjects.doses.mask).sum()) == int((df["EVID"] == 1).sum() + df["ADDL"].sum())
    assert pop.n_subjects == df["ID"].nunique()
    assert np.all(np.isfinite(_a(pop.subjects.records.time)))


def test_select_keeps_dose_and_record_row_order():
    """`Population.select` renumbers table rows: dose rows must follow the record rows, so a
    sample on the row before a dose at the same time (a trough) still does not see it."""
    table = pd.DataFrame(
        [
            (1, 0.0, np.nan, 100.0, 1),
            (1, 2.0, 1.0, 0.0, 0),
            (2, 0.0, np.nan, 50.0, 1),
            (2, 12.0, 3.0, 0.0, 0),  # trough: row before the dose at the same time
            (2, 12.0, np.nan, 50.0, 1),
            (2, 14.0, 4.0, 0.0, 0),
        ],
        columns=["ID", "TIME", "DV", "AMT", "EVID"],
    )
    pop = read_nonmem(table)
    sub = pop.select([1])
    full, part = pop.subjects, sub.subjects

    def order(s, i):
        rec = np.asarray(s.records.row[i])[np.asarray(s.records.rec[i])]
        dose = np.asarray(s.doses.row[i])[np.asarray(s.doses.mask[i])]
        return np.sign(dose[:, None] - rec[None, :])

    np.testing.assert_array_equal(order(part, 0), order(full, 1))
    assert np.asarray(part.doses.row[0])[np.asarray(part.doses.mask[0])].max() < len(sub.table)
