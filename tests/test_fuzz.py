"""Property-based fuzzing of `popkin.read_nonmem`: random NONMEM tables, randomly corrupted,
either load or raise `popkin.DataError`, never another exception.

Fast by default (100 examples per property); `-m slow` runs 2000.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import popkin

COLUMNS = ["ID", "TIME", "DV", "AMT", "EVID", "MDV", "CMT", "RATE", "II", "ADDL", "SS", "DVID"]
NUMBER = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e3, max_value=1e3),
    st.integers(-5, 5),
    st.sampled_from([0, 1, 2, 1e300, -1e300, 1e9, 0.5]),
)
BAD_CELL = st.sampled_from(
    ["abc", "nan", "NaN", "inf", "-inf", "Infinity", ".", "", "1e999", "-0", "1,5", '"x"', "\u00e9"]
)


@st.composite
def nonmem_rows(draw) -> list[dict]:
    """A plausible NONMEM table: per subject one dose (maybe infusion / ADDL / SS) and sorted
    observation times, a DVID and a weight covariate."""
    rows = []
    for sid in range(1, draw(st.integers(1, 4)) + 1):
        wt = draw(st.floats(40, 120))
        kind = draw(st.sampled_from(["bolus", "infusion", "addl", "ss"]))
        dose = {"ID": sid, "TIME": 0.0, "DV": ".", "AMT": draw(st.floats(1, 500)), "EVID": 1}
        dose.update({"MDV": 1, "CMT": 1, "RATE": 0, "II": 0, "ADDL": 0, "SS": 0, "DVID": 1})
        if kind == "infusion":
            dose["RATE"] = draw(st.floats(1, 100))
        elif kind == "addl":
            dose.update(II=draw(st.floats(1, 24)), ADDL=draw(st.integers(1, 5)))
        elif kind == "ss":
            dose.update(II=draw(st.floats(1, 24)), SS=1)
        rows.append({**dose, "WT": wt})
        times = sorted(draw(st.lists(st.floats(0, 48), min_size=0, max_size=5)))
        for t in times:
            rows.append(
                {"ID": sid, "TIME": t, "DV": draw(st.floats(-1, 100)), "AMT": 0, "EVID": 0}
                | {"MDV": 0, "CMT": 2, "RATE": 0, "II": 0, "ADDL": 0, "SS": 0}
                | {"DVID": draw(st.sampled_from([1, 2])), "WT": wt}
            )
    return rows


def to_csv(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([r.get(c, "") for c in columns])
    return buf.getvalue()


@st.composite
def corrupted_csv(draw) -> bytes:
    """A table from `nonmem_rows` with 0-4 random corruptions applied, as CSV bytes."""
    rows = draw(nonmem_rows())
    columns = [*COLUMNS, "WT"]
    rows = [dict(r) for r in rows]
    ragged = False
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(
            st.sampled_from(
                [
                    "drop_column",
                    "bad_cell",
                    "random_number",
                    "negative_time",
                    "swap_rows",
                    "duplicate_header",
                    "duplicate_column",
                    "empty_rows",
                    "ragged_row",
                    "lowercase_header",
                ]
            )
        )
        if kind == "drop_column" and len(columns) > 1:
            columns.remove(draw(st.sampled_from(columns)))
        elif kind in ("bad_cell", "random_number") and rows:
            r = draw(st.integers(0, len(rows) - 1))
            c = draw(st.sampled_from(columns))
            rows[r][c] = draw(BAD_CELL if kind == "bad_cell" else NUMBER)
        elif kind == "negative_time" and rows:
            rows[draw(st.integers(0, len(rows) - 1))]["TIME"] = -draw(st.floats(0.1, 10))
        elif kind == "swap_rows" and len(rows) > 1:
            i, j = draw(st.integers(0, len(rows) - 1)), draw(st.integers(0, len(rows) - 1))
            rows[i], rows[j] = rows[j], rows[i]
        elif kind == "duplicate_header":
            rows.insert(draw(st.integers(0, len(rows))), {c: c for c in columns})
        elif kind == "duplicate_column" and columns:
            columns.append(draw(st.sampled_from(columns)))
        elif kind == "empty_rows":
            rows = rows[: draw(st.integers(0, 1))]
        elif kind == "ragged_row":
            ragged = True
        elif kind == "lowercase_header":
            columns = [c.lower() if draw(st.booleans()) else c for c in columns]
    text = to_csv(rows, columns)
    if ragged:  # an extra field on one line
        lines = text.split("\n")
        k = draw(st.integers(1, max(1, len(lines) - 1)))
        lines[k] = lines[k] + ",99"
        text = "\n".join(lines)
    data = text.encode()
    ending = draw(st.sampled_from(["keep", "keep", "truncate", "empty", "garbage", "bom"]))
    if ending == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif ending == "empty":
        data = b""
    elif ending == "garbage":
        data = data[: draw(st.integers(0, len(data)))] + draw(st.binary(min_size=1, max_size=20))
    elif ending == "bom":
        data = b"\xef\xbb\xbf" + data
    return data


def check_loads_or_data_error(source) -> None:
    """The property: `read_nonmem` returns a consistent Population or raises DataError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pop = popkin.read_nonmem(source)
        except popkin.DataError as e:
            assert str(e)  # a message, and every problem is located or described
            assert all(p.message for p in e.problems)
            return
    table = pop.table
    assert pop.n_subjects == len(pop.ids) == table["ID"].nunique()
    assert np.all(np.isfinite(table["TIME"].to_numpy(float)))
    assert np.all(table["TIME"].to_numpy(float) >= 0)
    rec = pop.subjects.records
    assert np.asarray(rec.time).shape[0] == pop.n_subjects
    assert np.all(np.isfinite(np.asarray(rec.dv)[np.asarray(rec.obs)]))


def check_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.csv")
        with open(path, "wb") as fh:
            fh.write(data)
        check_loads_or_data_error(path)


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(corrupted_csv())
def test_fuzz_csv_file(data):
    check_bytes(data)


@FAST
@given(nonmem_rows())
def test_valid_tables_load(rows):
    """Uncorrupted generated tables are valid NONMEM data and must load."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "data.csv")
        with open(path, "w") as fh:
            fh.write(to_csv(rows, [*COLUMNS, "WT"]))
        pop = popkin.read_nonmem(path)
    assert pop.n_subjects == len({r["ID"] for r in rows})
    assert pop.n_observations == sum(r["EVID"] == 0 for r in rows)


@FAST
@given(
    st.data(),
    nonmem_rows(),
    st.lists(st.sampled_from([np.nan, np.inf, -np.inf, "x", None, -1.0, 1e300]), max_size=4),
)
def test_fuzz_dataframe(data, rows, values):
    """DataFrame input with NaN / inf / text / None planted in random cells."""
    df = pd.DataFrame(rows).astype(object)
    for v in values:
        r = data.draw(st.integers(0, len(df) - 1))
        c = data.draw(st.sampled_from(list(df.columns)))
        df.iloc[r, df.columns.get_loc(c)] = v
    check_loads_or_data_error(df)


@pytest.mark.slow
@SLOW
@given(corrupted_csv())
def test_fuzz_csv_file_long(data):
    check_bytes(data)


@pytest.mark.slow
@SLOW
@given(st.binary(max_size=400))
def test_fuzz_random_bytes_long(data):
    check_bytes(data)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n",
        "ID,TIME,DV\n",
        "ID,TIME,DV\n1,0,1\n1,1",
        'ID,TIME,DV\n1,0,"1\n',
        "ID,TIME,DV\n1,0,1,7,8\n",
        "ID,TIME\n1,0\n",
        "ID,TIME,DV,AMT\n1,0,.,100\n1,1,5,0\n1,0.5,4,0\n",
        "ID,TIME,DV\n1,-1,1\n",
        "ID,TIME,DV\n1,inf,1\n",
        "ID,TIME,DV\nID,TIME,DV\n1,0,1\n",
        "ID,TIME,DV,AMT,II,ADDL\n1,0,.,100,1,1e12\n1,1,5,0,0,0\n",
    ],
)
def test_known_bad_inputs(text):
    """Hand-picked corruptions (empty, header only, truncated, quote left open, ragged,
    missing DV column, unsorted, negative, infinite time, duplicated header, absurd ADDL)."""
    check_bytes(text.encode())


def test_huge_integral_id_regression():
    """Found by the fuzzer: an integral ID beyond int64 (1e300) overflowed a cast."""
    df = pd.DataFrame({"ID": [1e300, 1e300], "TIME": [0.0, 1.0], "DV": [1.0, 2.0]})
    check_loads_or_data_error(df)
