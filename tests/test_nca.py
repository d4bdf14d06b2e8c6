"""NCA (popkin.nca) against closed forms and WinNonlin, realism check against the shipped table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import popkin
from popkin.nca import auc_linup_logdown, lambda_z, pk_reference, realism_check

# WinNonlin 6.3/7.0 results on R's Theoph (extravascular, linear-up/log-down), as published in
# Han S. (2018) "Validation of Noncompartmental Analysis Performed by NonCompart R package"
# (asancpt/NonCompart-tests, test 2): per subject 1..12.
WNL_THEOPH = {
    "lz_n": [3, 4, 3, 3, 4, 7, 4, 6, 3, 3, 3, 3],
    "lambda_z": [0.0484570, 0.1040864, 0.1024443, 0.0992870, 0.0866189, 0.0877957, 0.0883365,
                 0.0814505, 0.0824586, 0.0749598, 0.0954586, 0.1102595],
    "Tmax": [1.12, 1.92, 1.02, 1.07, 1.00, 1.15, 3.48, 2.02, 0.63, 3.55, 0.98, 3.52],
    "Cmax": [10.5, 8.33, 8.2, 8.6, 11.4, 6.44, 7.09, 7.56, 9.03, 10.21, 8.0, 9.75],
    "AUClast": [147.2347485, 88.7312755, 95.8781978, 102.6336232, 118.1793538, 71.6970150,
                87.9692274, 86.8065635, 83.9374360, 135.5760701, 77.8934723, 115.2202082],
    "AUCinf": [214.9236316, 97.3779346, 106.1276685, 114.2162046, 136.3047316, 82.1758833,
               100.9876292, 102.1533003, 97.5200039, 167.8600307, 86.9026173, 125.8315397],
}  # fmt: skip


def test_theophylline_matches_winnonlin():
    """Every subject, every summary, to the 7 decimals WinNonlin printed (half a unit of the
    last printed digit)."""
    d = popkin.nca(popkin.datasets.theophylline()).sort_values("ID")
    assert list(d["ID"]) == list(range(1, 13))
    assert (d["route"] == "extravascular").all()
    for col, ref in WNL_THEOPH.items():
        np.testing.assert_allclose(d[col].to_numpy(float), ref, rtol=0, atol=5.01e-8, err_msg=col)
    np.testing.assert_allclose(d["t_half"], math.log(2) / np.array(WNL_THEOPH["lambda_z"]),
                               rtol=1e-6)  # fmt: skip


def _bolus_table(times, dose=100.0, v=10.0, cl=2.0):
    k = cl / v
    rows = [dict(ID=1, TIME=0.0, DV=np.nan, AMT=dose, EVID=1, MDV=1, CMT=1)]
    rows += [dict(ID=1, TIME=t, DV=dose / v * math.exp(-k * t), AMT=0.0, EVID=0, MDV=0, CMT=1)
             for t in times]  # fmt: skip
    return pd.DataFrame(rows)


def test_one_compartment_bolus_is_exact():
    """Monoexponential decay: log-linear regression gives k exactly, C0 back-extrapolation and
    the log-down trapezoid integrate exp(-kt) exactly, so AUCinf = D / CL to rounding."""
    dose, v, cl = 100.0, 10.0, 2.0
    d = popkin.nca(_bolus_table([0.5, 1, 2, 4, 6, 8, 12, 16, 24], dose, v, cl)).iloc[0]
    assert d["route"] == "iv"
    k = cl / v
    assert d["lambda_z"] == pytest.approx(k, rel=1e-12)
    assert d["t_half"] == pytest.approx(math.log(2) / k, rel=1e-12)
    assert d["AUCinf"] == pytest.approx(dose / cl, rel=1e-12)
    assert d["CL"] == pytest.approx(cl, rel=1e-12)
    assert d["Vz"] == pytest.approx(v, rel=1e-12)
    # all points after Tmax (the first sample) lie on one line: the longest window wins
    assert d["lz_n"] == 8 and d["r2_adj"] == pytest.approx(1.0)


def test_one_compartment_oral_within_trapezoid_error():
    """C(t) = D ka / (V (ka - k)) (e^-kt - e^-ka t). The best-adjusted-R^2 rule (longest window
    within 1e-4 of the best) reaches back to t ~ 2-3 h, where the absorption term is still
    e^-(ka-k)t ~ 0.3-2 % of the elimination term: lambda_z is biased by < 0.5 %. AUC error comes from the
    rising part only (linear trapezoid, step h = 0.25 h up to Tmax ~ 1.6 h): |E| <= T h^2/12
    max|C''| = 1.75 * 0.0625 / 12 * 41.6 ~ 0.38 mg h/L on D / CL = 100, i.e. < 0.4 %; the
    log-down part has a smaller error (the curve is nearly monoexponential after Tmax)."""
    dose, v, cl, ka = 100.0, 10.0, 1.0, 2.0
    k = cl / v
    t = np.r_[np.arange(0.25, 2.01, 0.25), 3, 4, 6, 8, 12, 16, 24, 36, 48, 72]
    c = dose * ka / (v * (ka - k)) * (np.exp(-k * t) - np.exp(-ka * t))
    table = pd.DataFrame({"ID": 7, "TIME": t, "DV": c})
    d = popkin.nca(table, dose=dose, route="extravascular").iloc[0]
    assert d["lambda_z"] == pytest.approx(k, rel=5e-3)
    late = popkin.nca(table[table.TIME >= 8], dose=dose, route="extravascular").iloc[0]
    assert late["lambda_z"] == pytest.approx(k, rel=1e-6)  # e^-1.9*8 ~ 2.5e-7
    auc = dose / cl
    c2max = dose * ka / (v * (ka - k)) * (ka**2 - k**2)  # |C''| is largest at t = 0
    bound = 1.75 * 0.25**2 / 12 * c2max
    assert abs(d["AUCinf"] - auc) < bound
    assert abs(d["AUCinf"] - auc) / auc < 0.004
    tmax = math.log(ka / k) / (ka - k)
    assert abs(d["Tmax"] - tmax) <= 0.125 + 1e-12  # on the 0.25 h grid


def test_lambda_z_rule_prefers_more_points_within_tolerance():
    t = np.array([1.0, 2, 3, 4, 5, 6])
    c = np.exp(-0.3 * t) * np.array([1.3, 1.0, 1.0, 1.0, 1.0, 1.0])  # first point off the line
    lz, adj, n, t0 = lambda_z(t, c)
    assert n == 5 and t0 == 2.0 and lz == pytest.approx(0.3)
    assert lambda_z(t[:2], c[:2]) is None


def test_linup_logdown_rule():
    # rising segment: linear; falling: logarithmic
    assert auc_linup_logdown([0, 1], [0, 2]) == pytest.approx(1.0)
    assert auc_linup_logdown([0, 1], [2, 1]) == pytest.approx(1 / math.log(2))
    assert auc_linup_logdown([0, 1], [1, 0]) == pytest.approx(0.5)  # to zero: linear


def test_multiple_dosing_last_interval_auctau():
    """Steady state of a 1-cmt bolus every tau: AUCtau = D / CL (the last interval)."""
    dose, v, cl, tau = 100.0, 10.0, 2.0, 12.0
    k = cl / v
    rows = [dict(ID=1, TIME=i * tau, DV=np.nan, AMT=dose, EVID=1, MDV=1, CMT=1)
            for i in range(8)]  # fmt: skip
    last = 7 * tau
    for dt in [0.0, 0.5, 1, 2, 4, 6, 8, 12]:
        tt = last + dt
        conc = sum(dose / v * math.exp(-k * (tt - i * tau)) for i in range(8) if i * tau <= tt)
        rows.append(dict(ID=1, TIME=tt, DV=conc, AMT=0.0, EVID=0, MDV=0, CMT=1))
    table = pd.DataFrame(rows).sort_values(["TIME", "EVID"], ascending=[True, False])
    d = popkin.nca(table).iloc[0]
    assert d["n_doses"] == 8 and d["dose_time"] == last and d["tau"] == tau
    # the 8-dose accumulation is 1 - e^-8 k tau ~ 1 - 5e-9 of steady state
    assert d["AUCtau"] == pytest.approx(dose / cl, rel=1e-6)
    assert d["CL"] == pytest.approx(cl, rel=1e-6)
    first = popkin.nca(table, interval="first").iloc[0]
    assert first["dose_time"] == 0.0 and first["n_obs"] == 0  # no samples in the first interval
    assert np.isnan(first["Cmax"]) and "no positive" in first["note"]


def test_bad_input_is_reported():
    table = _bolus_table([1, 2, 4])
    bad = table.astype({"DV": object})
    bad.loc[2, "DV"] = "abc"
    with pytest.raises(popkin.DataError) as e:
        popkin.nca(bad)
    assert "DV" in str(e.value) and "row" in str(e.value)
    obs = pd.DataFrame({"ID": [1, 1], "TIME": [1.0, "x"], "DV": [1.0, -2.0]})
    with pytest.raises(popkin.DataError, match="row 2, column TIME"):
        popkin.nca(obs, dose=1.0, route="iv")
    with pytest.raises(ValueError, match="dose="):
        popkin.nca(obs[["ID", "DV"]].assign(TIME=1.0))
    with pytest.raises(ValueError, match="route="):
        popkin.nca(obs.assign(TIME=1.0, DV=1.0), dose=1.0)
    with pytest.raises(ValueError, match="only for observation-only"):
        popkin.nca(table, dose=1.0)
    with pytest.raises(ValueError, match="no dose"):
        popkin.nca(table.assign(AMT=0.0, EVID=0, MDV=np.where(table.EVID == 1, 1, 0)))
    with pytest.raises(ValueError, match="interval"):
        popkin.nca(table, interval="middle")


def test_reference_table_is_sourced_and_theophylline_is_realistic():
    ref = pk_reference()
    assert set(ref["compound"]) == {"theophylline", "indometacin", "phenobarbital", "quinidine"}
    assert (ref["low"] < ref["high"]).all() and (ref["low"] > 0).all()
    assert ref["source"].str.len().min() > 10 and ref["url"].str.startswith("http").all()
    # the observed theophylline cohort against literature ranges: medians inside every range
    t = popkin.datasets.theophylline_table()
    weights = dict(zip(t["ID"], t["WT"], strict=True))
    r = realism_check(popkin.nca(t), "theophylline", weights=weights).set_index("quantity")
    assert set(r.index) == {"t_half", "CL_per_kg", "Vz_per_kg", "Tmax"}
    assert (r["n"] == 12).all() and r["median_inside"].all()
    assert r.loc["t_half", "inside"] == pytest.approx(1.0)  # 6.3-14.3 h within 3-16 h
    no_w = realism_check(popkin.nca(t), "theophylline").set_index("quantity")
    assert no_w.loc["CL_per_kg", "n"] == 0 and "weights" in no_w.loc["CL_per_kg", "note"]
    with pytest.raises(ValueError, match="no reference rows"):
        realism_check(popkin.nca(t), "aspirin")
