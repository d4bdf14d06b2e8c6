"""Thread-parallel subject chunks give the same results as one batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import popkin
from popkin.models.library import Theophylline
from popkin.nlme import _chunks
from popkin.nlme._fit import _modes_jit, _ofv_and_jac
from popkin.nlme._objective import SubjectProblem
from popkin.params import default_params, pack
from popkin.simulate import predictor_for


def test_map_subjects_pads_splits_and_trims():
    x = jnp.arange(7.0)[:, None] * jnp.ones((7, 3))
    fn = jax.jit(lambda a, b: {"s": a.sum(1) + b, "a": a * 2})
    b = jnp.arange(7.0) ** 2
    ref = fn(x, b)
    for k in (1, 2, 3, 7):
        got = _chunks.map_subjects(fn, (x, b), chunks=k)
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key])
            assert got[key].shape == ref[key].shape


def test_modes_and_ofv_jacobian_do_not_depend_on_chunks():
    """12 theophylline subjects in 5 chunks (padded to 3 each) vs one batch: identical modes,
    Hessians, OFV terms and Jacobians (subjects are independent; same compiled program)."""
    model = Theophylline()
    pop = popkin.datasets.theophylline()
    problem = SubjectProblem(predictor_for(model, pop), "focei")
    u = pack(model, default_params(model), True)
    eta0 = jnp.full((pop.n_subjects, 3), 0.05)
    run = lambda e, s: _modes_jit(problem, True, u, e, s, None, True)
    one = run(eta0, pop.subjects)
    five = _chunks.map_subjects(run, (eta0, pop.subjects), chunks=5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(five), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)
    oj = lambda e, h, s: _ofv_and_jac(problem, True, u, e, h, s, None)
    ref = oj(one.eta, one.hess_inv, pop.subjects)
    got = _chunks.map_subjects(oj, (one.eta, one.hess_inv, pop.subjects), chunks=5)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-12, atol=1e-12)


def test_thread_count_from_environment(monkeypatch):
    monkeypatch.setenv("POPKIN_THREADS", "3")
    assert _chunks.n_threads() == 3
    assert _chunks.n_chunks(10 * _chunks.MIN_PER_CHUNK) == (
        3 if jax.default_backend() == "cpu" else 1
    )
    assert _chunks.n_chunks(_chunks.MIN_PER_CHUNK - 1) == 1
    monkeypatch.setenv("POPKIN_THREADS", "zero")
    with pytest.raises(ValueError, match="POPKIN_THREADS"):
        _chunks.n_threads()
