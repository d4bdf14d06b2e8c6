"""Amortized in-context PK: simulator physics, prior distribution, model invariances, training."""

from __future__ import annotations

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import popkin
from popkin.amortized import (
    CheckpointError,
    ModelConfig,
    PriorConfig,
    TrainConfig,
    concentrations,
    load_checkpoint,
    sample_studies,
    superposition_2cmt,
    train,
)
from popkin.amortized._forecast import predict_normalised
from popkin.amortized._train import _val_loss, early_mask, init_model, validation_set
from popkin.models.library import TwoCmtIVComb

F32 = jnp.float32
TINY = ModelConfig(d_model=16, n_heads=2, n_layers=1, z_study=4, z_ind=4)


def _doses(t, amt, route, dur):
    n = len(t)
    return (jnp.asarray(t, F32), jnp.asarray(amt, F32), jnp.asarray(route), jnp.asarray(dur, F32),
            jnp.ones(n, bool))  # fmt: skip


def test_one_compartment_oral_is_bateman():
    ka, cl, v = 1.5, 2.0, 30.0
    theta = jnp.array([[ka, cl, v, 0, 1, 0, 1]], F32)
    t = jnp.linspace(0.1, 24, 12, dtype=F32)
    c = concentrations(theta, jnp.zeros(1, F32), *_doses([0.0], [100.0], [0], [0.0]), t)
    ke = cl / v
    ref = 100 * ka / (v * (ka - ke)) * (np.exp(-ke * np.asarray(t)) - np.exp(-ka * np.asarray(t)))
    np.testing.assert_allclose(np.asarray(c), ref, rtol=2e-5)  # float32


def test_two_compartment_iv_matches_popkin_nlme_model():
    """Bolus + infusion superposition of the simulator == popkin's float64 LinearPK (PRED)."""
    rows = [dict(ID=1, TIME=0.0, AMT=100.0, RATE=0.0, EVID=1, MDV=1, DV=np.nan, CMT=1),
            dict(ID=1, TIME=12.0, AMT=50.0, RATE=25.0, EVID=1, MDV=1, DV=np.nan, CMT=1)]  # fmt: skip
    times = [0.5, 1, 2, 4, 8, 12.5, 13, 14, 16, 24, 36]
    rows += [dict(ID=1, TIME=t, AMT=0.0, RATE=0.0, EVID=0, MDV=0, DV=1.0, CMT=1) for t in times]
    pop = popkin.read_nonmem(pd.DataFrame(rows).sort_values("TIME", kind="stable"))
    model = TwoCmtIVComb()
    sim = popkin.simulate(model, pop, key=jax.random.PRNGKey(0))
    pred = sim.loc[sim.EVID == 0, "PRED"].to_numpy()
    th = popkin.default_params(model).theta
    cl, v, q, vp = (math.exp(float(th[k])) for k in ("tcl", "tv", "tq", "tvp"))
    theta = jnp.array([[1.0, cl, v, q, vp, 0.0, 1.0]], F32)
    doses = _doses([0.0, 12.0], [100.0, 50.0], [1, 2], [0.0, 2.0])
    c = concentrations(theta, jnp.zeros(1, F32), *doses, jnp.asarray(times, F32))
    np.testing.assert_allclose(np.asarray(c), pred, rtol=5e-5)
    c2 = superposition_2cmt(
        jnp.array([1.0, cl, v, q, vp, 0.0], F32), *doses, jnp.asarray(times, F32)
    )
    np.testing.assert_allclose(np.asarray(c2), pred, rtol=5e-5)


@pytest.mark.parametrize("route,dur", [(0, 0.0), (1, 0.0), (2, 2.0)])
def test_steady_state_equals_long_dosing_history(route, dur):
    theta = jnp.array([[1.0, 3.0, 20.0, 4.0, 40.0, 0.0, 1.0]], F32)
    hist = np.arange(-480.0, 0.5, 12.0)
    t = jnp.array([0.5, 3.0, 11.9], F32)
    many = concentrations(theta, jnp.zeros(1, F32), *_doses(hist, [50.0] * len(hist), [route] * len(hist), [dur] * len(hist)), t)  # fmt: skip
    ss = concentrations(theta, jnp.zeros(1, F32), *_doses([0.0], [50.0], [route], [dur]), t, ss=True, ii=12.0)  # fmt: skip
    np.testing.assert_allclose(np.asarray(ss), np.asarray(many), rtol=1e-3)
    p = jnp.array([1.0, 3.0, 20.0, 4.0, 40.0, 0.0], F32)
    ss2 = superposition_2cmt(p, *_doses([0.0], [50.0], [route], [dur]), t, ss=True, ii=12.0)
    np.testing.assert_allclose(np.asarray(ss2), np.asarray(many), rtol=1e-3)


def test_knots_with_equal_parameters_change_nothing():
    theta = jnp.array([[1.2, 3.0, 20.0, 4.0, 40.0, 1.0, 80.0]] * 3, F32)
    doses = _doses([0.0, 12.0, 24.0], [100.0, 100.0, 100.0], [2, 2, 1], [2.0, 2.0, 0.0])
    t = jnp.array([0.5, 1, 3, 6, 13, 25, 48], F32)
    split = concentrations(theta, jnp.array([0.0, 5.0, 9.0], F32), *doses, t)
    whole = concentrations(theta[:1], jnp.zeros(1, F32), *doses, t)
    np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-5)


@pytest.fixture(scope="module")
def prior_draw():
    cfg = PriorConfig(ou_sd=(0.3, 0.3), bsv_sd=(0.15, 0.15), ou_tau_rel=(0.5, 0.5))
    return cfg, sample_studies(jax.random.PRNGKey(0), 300, cfg)


def test_prior_ranges_and_design(prior_draw):
    cfg, s = prior_draw
    ind = np.asarray(s.ind_mask)
    n = ind.sum(1)
    assert n.min() >= cfg.n_individuals[0] and n.max() <= cfg.n_individuals[1]
    y, m, c = np.asarray(s.obs_y), np.asarray(s.obs_mask), np.asarray(s.obs_cens)
    assert np.isfinite(y[m]).all() and (y[m] > 0).all()
    assert 0.0 < c[m].mean() < 0.5  # some, not most, samples are BLQ
    nobs = m.sum(-1)[ind]
    assert nobs.min() >= cfg.min_obs and nobs.max() <= cfg.max_obs
    assert set(np.unique(np.asarray(s.n_cmt))) == {1, 2, 3}
    theta = np.asarray(s.theta)[ind]  # (individuals, K, 7)
    ke = theta[:, 0, 1] / theta[:, 0, 2]
    # typical log ke is uniform on [-6, 0]; individuals add BSV 0.15 and OU 0.3 (x 3 SD slack)
    slack = 3 * math.hypot(0.15, 0.3) * 2
    assert np.log(ke).min() > cfg.log_ke[0] - slack and np.log(ke).max() < cfg.log_ke[1] + slack
    one_cmt = (np.asarray(s.n_cmt)[:, None] == 1) & ind
    assert np.all(np.asarray(s.theta)[one_cmt][:, :, 3] == 0)  # no peripheral exchange


def test_ou_paths_are_stationary(prior_draw):
    """Within-study spread of log CL is the same at every knot (BSV^2 + OU^2), knots move."""
    _, s = prior_draw
    ind = np.asarray(s.ind_mask)
    lcl = np.log(np.asarray(s.theta)[..., 1])  # (S, N, K)
    centred = lcl - np.nanmean(np.where(ind[..., None], lcl, np.nan), axis=1, keepdims=True)
    var = np.array([np.var(centred[..., k][ind]) for k in range(lcl.shape[-1])])
    expected = 0.15**2 + 0.3**2
    # ~4000 individuals: SE of a variance ~ 2.5 %; the centring removes ~1/10 of it
    assert np.all(np.abs(var / (expected * 0.9) - 1) < 0.12), var
    step = np.var((lcl[..., 1] - lcl[..., 0])[ind])
    rho = math.exp(-(1 / 4) / 0.5)  # knot spacing H/4, tau = H/2
    assert abs(step / (2 * 0.09 * (1 - rho)) - 1) < 0.12


def test_sampling_is_deterministic_by_key(prior_draw):
    cfg, a = prior_draw  # same shapes and config: no new compile
    b = sample_studies(jax.random.PRNGKey(0), 300, cfg)
    c = sample_studies(jax.random.PRNGKey(6), 300, cfg)
    assert all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    assert not np.array_equal(np.asarray(a.obs_y), np.asarray(c.obs_y))


def _forecast(model, study, order, target):
    from popkin.amortized._tokens import normalise, study_scales

    st = study.take(slice(0, 1))
    st = jax.tree.map(lambda x: x[:, order] if x.ndim >= 2 and x.shape[1] == len(order) else x, st)
    n = len(order)
    t_new = int(np.where(np.asarray(order) == target)[0][0])
    ctx = st.ind_mask & (jnp.arange(n) != t_new)[None]
    norm = normalise(st, study_scales(st, ctx)).take(0)
    early = early_mask(norm.obs_t[t_new], norm.obs_mask[t_new], 3)
    return predict_normalised(model, norm, jnp.int32(t_new), early, norm.obs_t[t_new],
                              jax.random.PRNGKey(1), 16, "attention")  # fmt: skip


def test_forecast_is_invariant_to_context_order(prior_draw):
    model = init_model(TrainConfig(model=TINY))
    study = prior_draw[1].take(slice(3, 4))
    n = int(study.ind_mask[0].sum())
    n_max = study.ind_mask.shape[1]
    order = np.arange(n_max)
    perm = np.concatenate([np.random.default_rng(0).permutation(n), np.arange(n, n_max)])
    m1, q1 = _forecast(model, study, order, 0)
    m2, q2 = _forecast(model, study, perm, 0)
    np.testing.assert_allclose(np.asarray(m1), np.asarray(m2), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(q1), np.asarray(q2), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # three compiles of the training step: minutes on 2 cores
def test_tiny_training_lowers_validation_loss_and_resumes_exactly(tmp_path):
    cfg = TrainConfig(steps=40, batch=8, lr=3e-3, warmup=4, val_studies=16, val_every=40,
                      checkpoint_every=20, model=TINY)  # fmt: skip
    val, key = validation_set(cfg), jax.random.PRNGKey(20_000)
    before = float(_val_loss(init_model(cfg), val, key)[0])
    model, log = train(cfg, tmp_path / "a", resume=False, progress=False)
    after = float(_val_loss(model, val, key)[0])
    assert after < before - 0.2, (before, after)
    assert log[-1]["val_loss"] == pytest.approx(after)
    # stop at step 20 (checkpoint), resume to 40: bit-identical to the uninterrupted run
    short = cfg
    train(short, tmp_path / "b", resume=False, progress=False, max_seconds=0.0)
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["step"] == 1
    resumed, _ = train(short, tmp_path / "b", resume=True, progress=False)
    for x, y in zip(jax.tree.leaves(eqx.filter(model, eqx.is_array)),
                    jax.tree.leaves(eqx.filter(resumed, eqx.is_array)), strict=True):  # fmt: skip
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_broken_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a popkin checkpoint"):
        load_checkpoint(tmp_path)
    src = popkin.amortized._forecast.CHECKPOINTS / "small"
    for name in ("meta.json", "state.eqx"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    data = (tmp_path / "state.eqx").read_bytes()
    (tmp_path / "state.eqx").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_checkpoint(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(tmp_path)


def test_shipped_checkpoint_forecasts_theophylline():
    table = popkin.datasets.theophylline_table()
    target = table[table.ID == 1]
    early = target[(target.EVID == 1) | ((target.TIME > 0) & (target.TIME <= 1.2))]
    later = target[(target.EVID == 0) & (target.TIME > 1.2)]
    out = popkin.forecast(table[table.ID != 1], early, later.TIME.to_numpy())
    assert list(out.columns) == ["TIME", "PRED", "LO90", "LO50", "HI50", "HI90"]
    v = out[["PRED", "LO90", "LO50", "HI50", "HI90"]].to_numpy()
    assert np.isfinite(v).all() and (v > 0).all()
    assert (
        np.all(out.LO90 <= out.LO50)
        and np.all(out.LO50 <= out.PRED)
        and np.all(out.PRED <= out.HI90)
    )
    # zero-shot accuracy on this subject: every later observation inside the 90 % interval,
    # and log-RMSE below the published NLME mean on this protocol (0.732, PFF paper)
    dv = later.DV.to_numpy()
    assert np.all((dv >= out.LO90.to_numpy()) & (dv <= out.HI90.to_numpy()))
    assert np.sqrt(np.mean(np.log(out.PRED.to_numpy() / dv) ** 2)) < 0.732
    # a virtual cohort under a dose at t = 2 h has (almost) nothing before the dose
    dosing = target[target.EVID == 1].assign(TIME=2.0)
    cohort = popkin.generate(table, dosing, 8, [1.0, 3.0, 6.0], decoder="physics")
    before = cohort[cohort.TIME == 1.0].PRED.to_numpy()
    after = cohort[cohort.TIME == 3.0].PRED.to_numpy()
    assert np.all(before < 1e-3 * after)


_SHARD_SCRIPT = """
import json, sys
import equinox as eqx, jax, numpy as np
import popkin
from popkin.amortized import ModelConfig, TrainConfig, train
assert len(jax.devices()) == 2
cfg = TrainConfig(steps=3, batch=4, val_studies=0, checkpoint_every=100, warmup=1,
                  model=ModelConfig(d_model=16, n_heads=2, n_layers=1, z_study=4, z_ind=4))
m1, l1 = train(cfg, sys.argv[1] + "/one", resume=False, progress=False)
m2, l2 = train(cfg, sys.argv[1] + "/two", resume=False, progress=False, data_parallel=True)
leaves = zip(jax.tree.leaves(eqx.filter(m1, eqx.is_array)),
             jax.tree.leaves(eqx.filter(m2, eqx.is_array)), strict=True)
print(json.dumps({"one": [e["loss"] for e in l1], "two": [e["loss"] for e in l2],
                  "maxdiff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                 for a, b in leaves)}))
"""


@pytest.mark.slow  # a subprocess with two forced host devices compiles the step twice
def test_data_parallel_training_matches_one_device(tmp_path):
    """Batch sharded over 2 (forced host) devices: same losses and parameters as one device, up
    to float32 summation order."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    script = tmp_path / "shard.py"
    script.write_text(_SHARD_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(res["two"], res["one"], rtol=1e-5)
    assert res["maxdiff"] < 1e-5


def test_forecast_ignores_padding(prior_draw):
    """Garbage in masked sample slots, masked doses and padded individuals changes nothing."""
    model = init_model(TrainConfig(model=TINY))
    study = prior_draw[1].take(slice(3, 4))
    order = np.arange(study.ind_mask.shape[1])
    m1, q1 = _forecast(model, study, order, 0)
    junk = eqx.tree_at(
        lambda s: (s.obs_y, s.obs_t, s.dose_amt, s.dose_t),
        study,
        (jnp.where(study.obs_mask, study.obs_y, 1e3), jnp.where(study.obs_mask, study.obs_t, 7.0),
         jnp.where(study.dose_mask, study.dose_amt, 1e4), jnp.where(study.dose_mask, study.dose_t, 3.0)),
    )  # fmt: skip
    m2, q2 = _forecast(model, junk, order, 0)
    real = np.asarray(study.obs_mask[0, 0])  # query slots that are real samples of the target
    np.testing.assert_allclose(np.asarray(m1)[real], np.asarray(m2)[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(q1)[:, real], np.asarray(q2)[:, real], rtol=1e-5, atol=1e-5
    )


def test_from_population_keeps_dosing_before_a_steady_state_reset():
    """A mid-record SS=1 dose (as in the quinidine data) must not erase the doses that act on
    earlier samples; the regimen is back-filled only in the gap after the previous dose."""
    table = pd.DataFrame(
        [
            (1, 0.0, np.nan, 100.0, 1, 0, 0.0),
            (1, 6.0, np.nan, 100.0, 1, 0, 0.0),
            (1, 10.0, 2.0, 0.0, 0, 0, 0.0),  # a sample between the first doses and the reset
            (1, 100.0, np.nan, 50.0, 1, 1, 8.0),  # SS reset, q8h
            (1, 104.0, 1.0, 0.0, 0, 0, 0.0),
            (1, 120.0, np.nan, 50.0, 1, 1, 8.0),  # SS again 20 h later: only 2 periods to fill
            (1, 122.0, 1.0, 0.0, 0, 0, 0.0),
        ],
        columns=["ID", "TIME", "DV", "AMT", "EVID", "SS", "II"],
    )
    st = popkin.amortized.from_population(popkin.read_nonmem(table))
    t = np.asarray(st.dose_t[0, 0])[np.asarray(st.dose_mask[0, 0])]
    amt = np.asarray(st.dose_amt[0, 0])[np.asarray(st.dose_mask[0, 0])]
    first = [0.0, 6.0]
    fill1 = [100.0 - 8 * j for j in range(10, 0, -1)]  # 20..92, all after the dose at 6
    fill2 = [104.0, 112.0]  # 120 - 8 j for j = 2, 1 (j >= 3 would reach back to <= 100)
    np.testing.assert_allclose(t, first + fill1 + [100.0] + fill2 + [120.0])
    np.testing.assert_allclose(amt, [100.0] * 2 + [50.0] * 14)
    assert not bool(st.ss[0, 0])


def test_shipped_cpu_checkpoint_is_its_config_trained_to_the_end():
    """The `cpu` checkpoint (issue 5: trained on the 2-core CPU in < 2 h) holds the full run of
    configs/cpu.json: same config, last step, training time in its log, and it forecasts."""
    from popkin.amortized._train import TrainConfig, load_checkpoint

    pkg = popkin.amortized.__path__[0]
    cfg = TrainConfig.load(f"{pkg}/configs/cpu.json")
    _, _, step, ckpt_cfg, log = load_checkpoint(f"{pkg}/checkpoints/cpu")
    assert ckpt_cfg == cfg and step == cfg.steps
    assert log[-1]["seconds"] < 2 * 3600 and log[-1]["val_loss"] < log[0]["loss"]
    table = popkin.datasets.theophylline_table()
    target = table[table.ID == 2]
    early = target[(target.EVID == 1) | ((target.TIME > 0) & (target.TIME <= 1.2))]
    out = popkin.forecast(table[table.ID != 2], early, [4.0, 8.0, 24.0], model="cpu")
    assert np.isfinite(out[["PRED", "LO90", "HI90"]].to_numpy()).all()
