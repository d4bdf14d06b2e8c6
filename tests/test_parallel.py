"""popkin.parallel on a 2-worker LocalCluster: fan-out results equal the serial ones, bit for bit;
and the case bootstrap (resampling, intervals, failures, save/load)."""

from __future__ import annotations

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import popkin
from popkin.nlme import resample_subjects
from popkin.reference import LinearEndpoint

pytest.importorskip("distributed")


def linear_data(seed: int, n: int = 20) -> pd.DataFrame:
    """`LinearEndpoint` data: y_ij = 1 + eta_i + eps_ij, eta ~ N(0, 0.7^2), eps ~ N(0, 0.5^2)."""
    rng = np.random.default_rng(seed)
    eta = rng.normal(0.0, 0.7, n)
    rows = [(i + 1, t, 1.0 + eta[i] + 0.5 * rng.normal()) for i in range(n) for t in range(4)]
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV"])


def _warm_up(_=None):
    """Compile the fit and a 2-replicate simulation of `LinearEndpoint` in this process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = popkin.fit(LinearEndpoint(), linear_data(0))
    popkin.simulate(f.model, f.population, key=jax.random.key(0), n_replicates=2)
    return f


@pytest.fixture(scope="module")
def dask_client():
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    with popkin.parallel.client(n_workers=2, threads_per_worker=1) as c:
        # Compile on both workers while this process compiles the same programs (saves time
        # on free cores; the tests below compare warm results).
        workers = list(c.scheduler_info()["workers"])
        warm = [c.submit(_warm_up, w, workers=[w], pure=False) for w in workers]
        _warm_up()
        c.gather(warm)
        yield c


@pytest.fixture(scope="module")
def base_fit(dask_client):
    return _warm_up()


def test_cluster_shape_and_worker_float64(dask_client):
    info = dask_client.scheduler_info()["workers"]
    assert len(info) == 2 and all(w["nthreads"] == 1 for w in info.values())
    pids = popkin.parallel.map(
        lambda _: (jnp.ones(1).dtype.name, __import__("os").getpid()),
        range(4),
        client=dask_client,
        progress=False,
    )
    assert {d for d, _ in pids} == {"float64"}
    assert len({p for _, p in pids} - {__import__("os").getpid()}) >= 1  # ran elsewhere


def test_map_keeps_order_and_raises_task_errors(dask_client):
    items = list(range(7))
    assert popkin.parallel.map(lambda x: x * x, items, client=dask_client, progress=False) == [
        x * x for x in items
    ]
    assert popkin.parallel.map(lambda s, x: s + x, items, shared=10, scheduler="serial") == [
        10 + x for x in items
    ]

    def boom(x):
        if x == 3:
            raise ZeroDivisionError("item 3")
        return x

    with pytest.raises(ZeroDivisionError, match="item 3"):
        popkin.parallel.map(boom, items, client=dask_client, progress=False)


def test_fit_many_equals_serial(dask_client):
    jobs = [(LinearEndpoint(), linear_data(s), {"covariance": None}) for s in (1, 2, 3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par = popkin.parallel.fit_many(jobs, client=dask_client, progress=False)
        ser = popkin.parallel.fit_many(jobs, scheduler="serial", progress=False)
    assert len({f.ofv for f in ser}) == 3  # three different problems
    for a, b in zip(par, ser, strict=True):
        assert a.status == b.status == popkin.FitStatus.SUCCESS
        assert a.ofv == b.ofv
        np.testing.assert_array_equal(a.u_hat, b.u_hat)
        np.testing.assert_array_equal(a.eta, b.eta)


def test_simulate_chunks_equal_serial_and_chunk_keys(dask_client):
    pop = popkin.read_nonmem(linear_data(0))
    model = LinearEndpoint()
    key = jax.random.key(7)
    kw = dict(key=key, n_replicates=6, chunk_size=2, progress=False)
    par = popkin.parallel.simulate_chunks(model, pop, client=dask_client, **kw)
    ser = popkin.parallel.simulate_chunks(model, pop, scheduler="serial", **kw)
    pd.testing.assert_frame_equal(par, ser, check_exact=True)
    T = len(pop.table)
    assert len(par) == 6 * T and list(par["REP"].unique()) == [1, 2, 3, 4, 5, 6]
    assert par.groupby("REP")["ID"].nunique().eq(20).all() and par["ID"].nunique() == 120
    # The last chunk (replicates 5, 6) is popkin.simulate with the third key of the split.
    last = popkin.simulate(model, pop, key=jax.random.split(key, 3)[2], n_replicates=2)
    np.testing.assert_array_equal(par["DV"].to_numpy()[4 * T :], last["DV"].to_numpy())
    assert not np.array_equal(par["DV"].to_numpy()[:T], par["DV"].to_numpy()[T : 2 * T])


def test_bootstrap_equals_serial(dask_client, base_fit):
    par = popkin.bootstrap(base_fit, 4, seed=3, client=dask_client, progress=False)
    ser = popkin.bootstrap(base_fit, 4, seed=3, scheduler="serial", progress=False)
    np.testing.assert_array_equal(par.samples, ser.samples)
    np.testing.assert_array_equal(par.estimates, ser.estimates)
    np.testing.assert_array_equal(par.ofv, ser.ofv)
    assert par.status == ser.status == ["SUCCESS"] * 4 and par.failed_share == 0.0
    assert np.unique(par.estimates[:, 0]).size == 4  # replicates differ


def test_resample_matches_reading_the_resampled_table(base_fit):
    """Resampled subjects (repeats renumbered) give the same fit as a table written by hand."""
    pop = base_fit.population
    idx = np.array([3, 3, 0, 19, 7, 7, 7, 1, 2, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15])
    res = resample_subjects(pop, idx)
    assert res.ids == tuple(range(1, 21))
    table = pd.concat(
        [pop.table[pop.table["ID"] == pop.ids[i]].assign(ID=k + 1) for k, i in enumerate(idx)],
        ignore_index=True,
    )
    by_hand = popkin.read_nonmem(table)
    leaves_a, leaves_b = jax.tree.leaves(res.subjects), jax.tree.leaves(by_hand.subjects)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pd.testing.assert_frame_equal(res.table, by_hand.table, check_dtype=False)


def test_bootstrap_se_matches_theory(base_fit):
    """For the balanced linear-Gaussian model the ML estimate of mu is the grand mean, so the
    bootstrap SE of mu should be sqrt((N-1)/N) * SD(subject means) / sqrt(N). With B = 100
    replicates a bootstrap SD has a relative standard error ~ 1/sqrt(2(B-1)) = 7%; 25% is
    3.5 of those."""
    b = popkin.bootstrap(base_fit, 100, seed=11, scheduler="serial", progress=False)
    assert b.failed_share == 0.0
    means = linear_data(0).groupby("ID")["DV"].mean().to_numpy()
    n = means.size
    expected = np.sqrt((n - 1) / n) * means.std(ddof=1) / np.sqrt(n)
    ci = b.ci(0.9).set_index("parameter")
    assert abs(ci.loc["mu", "boot_se"] / expected - 1) < 0.25
    # The grand mean of each resample is the replicate's mu estimate (to optimiser tolerance).
    grand = means[b.samples].mean(axis=1)
    np.testing.assert_allclose(b.estimates[:, 0], grand, atol=2e-4)
    good = b.estimates[:, 0]
    assert ci.loc["mu", "ci_low"] == pytest.approx(np.quantile(good, 0.05))
    assert ci.loc["mu", "ci_high"] == pytest.approx(np.quantile(good, 0.95))
    df = b.to_dataframe()
    assert list(df.columns[:4]) == ["replicate", "status", "ok", "ofv"] and len(df) == 100


def test_bootstrap_reports_failures_and_round_trips(base_fit, tmp_path):
    """maxeval=1 stops every refit early: all replicates fail, the CI is NaN, nothing raises."""
    b = popkin.bootstrap(base_fit, 3, seed=0, scheduler="serial", maxeval=1, progress=False)
    assert b.failed_share == 1.0 and set(b.status) == {"MAX_EVALUATIONS"}
    assert b.ci()["ci_low"].isna().all()
    path = b.save(tmp_path / "boot.json")
    back = popkin.load_bootstrap(path)
    np.testing.assert_array_equal(back.estimates, b.estimates)
    assert back.status == b.status and back.seed == 0
    path.write_text(path.read_text()[:-40])
    with pytest.raises(popkin.FileFormatError, match="boot.json"):
        popkin.load_bootstrap(path)
