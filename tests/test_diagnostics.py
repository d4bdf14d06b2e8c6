"""pcVPC, NPDE, eta pairs and forecast bands: calibration on data simulated from the model
(the diagnostic must not flag it) and on misspecified data (it must), plus plotted geometry."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy import stats

from _builders import biomarker_data, synthetic_fit
from popkin import diagnostics as dg
from popkin.diagnostics._sim import replicates


@pytest.fixture(scope="module")
def good_fit():
    return synthetic_fit(biomarker_data(40, seed=1))


@pytest.fixture(scope="module")
def bad_fit():
    """Data with twice the residual SD of the model the fit holds (misspecified)."""
    return synthetic_fit(biomarker_data(40, seed=1, sigma_scale=2.0))


# Every simulation below uses 40 subjects x 7 records and N = 200 replicates: one compilation.
N = 200


def test_npde_is_standard_normal_when_the_model_is_true(good_fit):
    tab = dg.npde_table(good_fit, N, seed=2)
    z = tab["NPDE"].to_numpy()
    assert len(z) == 40 * 7 and np.all(np.isfinite(z))
    # 280 values: |mean| < 4 SE (SE = 1/sqrt(280) = 0.06); variance within its 99.9% interval.
    assert abs(z.mean()) < 4 / np.sqrt(z.size)
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], z.size - 1) / (z.size - 1)
    assert lo < z.var(ddof=1) < hi
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert tab.attrs["tests"]["variance_p"] > 1e-3


def test_npde_flags_a_misspecified_residual_error(bad_fit):
    t = dg.npde_table(bad_fit, N, seed=2).attrs["tests"]
    assert t["variance"] > 1.5 and t["variance_p"] < 1e-6


def test_npde_needs_more_replicates_than_observations(good_fit):
    with pytest.raises(ValueError, match="more simulated replicates"):
        dg.npde_table(good_fit, 5, seed=0)


def test_pcvpc_brackets_the_true_model_and_not_a_misspecified_one():
    def outside(fit):
        t = dg.pcvpc_table(fit, N, seed=3)
        outer = t[t["level"] != 0.5]
        lo, hi = outer["sim_lo"], outer["sim_hi"]
        return np.mean((outer["observed"] < lo) | (outer["observed"] > hi))

    # 95% CIs, so ~5% of observed 5th/95th percentiles fall outside under the true model. The
    # bins share the same 40 subjects, so one dataset's misses come in runs (a subject with a
    # large eta_base lifts the 95th percentile in every bin): average over 4 datasets.
    good = [outside(synthetic_fit(biomarker_data(40, seed=s))) for s in (1, 2, 3, 4)]
    assert np.mean(good) <= 0.2, good
    # between-subject SDs twice the model's: the observed 5th/95th percentiles lie outside in
    # most bins. (A residual SD twice the model's is not visible here: the between-subject SD of
    # the baseline, ~8 U/L, dominates the spread; NPDE catches that one, see above.)
    assert outside(synthetic_fit(biomarker_data(40, seed=1, omega_scale=4.0))) >= 0.6


def test_pcvpc_prediction_correction_matches_the_formula(good_fit):
    sim = replicates(good_fit, N, __import__("jax").random.key(4))
    tab, ysim = sim
    edges = [0.0, 5.0, 13.0]
    out = dg.pcvpc_table(good_fit, N, bins=edges, _sim=sim)
    assert set(out["correction"]) == {"proportional"}  # Biomarker PRED > 0
    t, y, pred = tab["TIME"].to_numpy(), tab["DV"].to_numpy(), tab["PRED"].to_numpy()
    sel = t > 5.0  # second bin (5, 13]
    pc = y[sel] * np.median(pred[sel]) / pred[sel]
    row = out[(out["bin"] == 1) & (out["level"] == 0.95)].iloc[0]
    np.testing.assert_allclose(row["observed"], np.quantile(pc, 0.95), rtol=1e-12)
    pcs = ysim[:, sel] * (np.median(pred[sel]) / pred[sel])
    np.testing.assert_allclose(row["sim_median"], np.median(np.quantile(pcs, 0.95, axis=1)))
    raw = dg.pcvpc_table(good_fit, N, bins=edges, _sim=sim, pred_correct=False)
    row = raw[(raw["bin"] == 1) & (raw["level"] == 0.5)].iloc[0]
    np.testing.assert_allclose(row["observed"], np.median(y[sel]), rtol=1e-12)


def test_pcvpc_and_npde_figures_are_labelled(good_fit):
    fig = dg.pcvpc(good_fit, N, seed=0, dv_unit="U/L", time_unit="week")
    a = fig.axes[0]
    assert a.get_xlabel() == "time (week)" and "(U/L)" in a.get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("observed 50th" in s for s in labels) and any("CI" in s for s in labels)
    tab, fig = dg.npde(good_fit, N, seed=0, dv_unit="U/L", time_unit="week")
    assert [x.get_xlabel() for x in fig.axes] == [
        "N(0, 1) quantile (-)", "time (week)", "PRED (U/L)"
    ]  # fmt: skip
    assert len(tab) == 280


def _inside_fraction(ax, pts, level_index):
    line = ax.get_lines()[level_index]
    path = MplPath(np.column_stack(line.get_data()))
    return path.contains_points(pts).mean()


def test_eta_pairs_gaussian_contours_hold_their_probability(good_fit):
    import jax

    fig = dg.eta_pairs(good_fit, levels=(0.5, 0.9))
    ax = fig.axes[2]  # row 1, col 0: eta_slope vs eta_base
    assert ax.get_xlabel() == "eta_base (-)" and ax.get_ylabel() == "eta_slope (-)"
    om = np.asarray(good_fit.params.omega)
    pts = np.asarray(jax.random.multivariate_normal(jax.random.key(9), np.zeros(2), om, (20000,)))
    # independent Monte Carlo: 20000 draws, SE of a fraction <= 0.0035
    assert abs(_inside_fraction(ax, pts, 0) - 0.5) < 0.015
    assert abs(_inside_fraction(ax, pts, 1) - 0.9) < 0.01


class _Banana:
    """A non-Gaussian prior (no cov): eta2 = 0.5 (eta1^2 - 1) + N(0, 0.3^2), eta1 ~ N(0, 1)."""

    def sample(self, key, shape=()):
        import jax

        z = jax.random.normal(key, (*shape, 2))
        return np.stack([z[..., 0], 0.5 * (z[..., 0] ** 2 - 1) + 0.3 * z[..., 1]], -1)


def test_eta_pairs_kde_contours_for_a_non_gaussian_prior(good_fit):
    import dataclasses

    import jax

    fit = dataclasses.replace(good_fit, prior=_Banana())
    fig = dg.eta_pairs(fit, levels=(0.9,), n_samples=4000)
    cs = [c for c in fig.axes[2].get_children() if hasattr(c, "get_paths") and
          type(c).__name__ == "QuadContourSet"][0]  # fmt: skip
    verts = [p for p in cs.get_paths() if len(p.vertices)]
    pts = np.asarray(_Banana().sample(jax.random.key(5), (20000,)))
    inside = np.zeros(len(pts), bool)
    for p in verts:
        for poly in p.to_polygons():
            inside ^= MplPath(poly).contains_points(pts)
    # KDE smoothing widens the region a little: 90% HPD +- 0.04
    assert abs(inside.mean() - 0.9) < 0.04


def test_forecast_band_draws_and_validates():
    t = np.linspace(0, 24, 25)
    m = 5 * np.exp(-t / 8)
    fig = dg.forecast_band(t, m, 0.7 * m, 1.3 * m, observed=([1, 2], [4.5, 4.0]),
                           future=([12], [1.2]), dv_unit="mg/L")  # fmt: skip
    a = fig.axes[0]
    assert a.get_ylabel() == "concentration (mg/L)" and a.get_xlabel() == "time (h)"
    labels = a.get_legend_handles_labels()[1]
    assert "forecast 90% interval" in labels and "held out (not seen)" in labels
    with pytest.raises(ValueError, match="same length"):
        dg.forecast_band(t, m[:-1], m, m)
    with pytest.raises(ValueError, match="exceed"):
        dg.forecast_band(t, m, 1.3 * m, 0.7 * m)
