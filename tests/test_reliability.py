"""Faults: corrupted / truncated saved fits give one clear error naming the file; the same seed
gives bit-identical fits and samples; interrupted writes leave no partial files."""

from __future__ import annotations

import json
import os
import warnings

import jax
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import popkin
from popkin._io import atomic_path, atomic_write
from popkin.reference import LinearEndpoint


def linear_data(seed: int, n: int = 20) -> pd.DataFrame:
    """`LinearEndpoint` data: y_ij = 1 + eta_i + eps_ij, eta ~ N(0, 0.7^2), eps ~ N(0, 0.5^2)."""
    rng = np.random.default_rng(seed)
    eta = rng.normal(0.0, 0.7, n)
    rows = [(i + 1, t, 1.0 + eta[i] + 0.5 * rng.normal()) for i in range(n) for t in range(4)]
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV"])


def _fit():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return popkin.fit(LinearEndpoint(), linear_data(0))


@pytest.fixture(scope="module")
def fit_file(tmp_path_factory):
    f = _fit()
    path = tmp_path_factory.mktemp("fits") / "good_fit.json"
    f.save(path)
    return f, path


# -- saved-fit files ---------------------------------------------------------------------------
def test_round_trip(fit_file):
    f, path = fit_file
    back = popkin.load_fit(path)
    assert back.ofv == f.ofv and back.status == f.status
    np.testing.assert_array_equal(back.u_hat, f.u_hat)
    np.testing.assert_array_equal(back.eta, f.eta)


@settings(max_examples=40, deadline=None)
@given(frac=st.floats(0.0, 0.999))
def test_any_truncation_is_a_clear_error(fit_file, frac, tmp_path_factory):
    _, path = fit_file
    text = path.read_text()
    bad = tmp_path_factory.mktemp("trunc") / "truncated_fit.json"
    bad.write_text(text[: int(frac * len(text))])
    with pytest.raises(popkin.FileFormatError, match="truncated_fit.json") as e:
        popkin.load_fit(bad)
    assert e.value.path == bad


def _edit(doc: dict, key: str, value):
    doc = json.loads(json.dumps(doc))
    if value is KeyError:
        del doc[key]
    else:
        doc[key] = value
    return doc


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("u_hat", "abc", "corrupted"),
        ("status", "BOGUS", "corrupted"),
        ("eta", [[1.0, 2.0]], "corrupted"),
        ("eta_cov", None, "corrupted"),
        ("params", {"theta": {"mu": 1.0}}, "corrupted"),
        ("params", {"theta": {"zz": 1.0}, "omega": [[1.0]], "sigma": {"sd": 1.0}}, "match"),
        ("table", {"ID": [1, 2], "TIME": [0, "x"], "DV": [1, 2]}, "corrupted"),
        ("ofv", [1, 2], "corrupted"),
        ("table", KeyError, "missing"),
        ("format", "something-else", "not a popkin fit"),
        ("model", "no.such.module:Model", "cannot import model"),
    ],
)
def test_corrupted_fields(fit_file, tmp_path, key, value, why):
    _, path = fit_file
    bad = tmp_path / "corrupt_fit.json"
    bad.write_text(json.dumps(_edit(json.loads(path.read_text()), key, value)))
    with pytest.raises(popkin.FileFormatError, match=why) as e:
        popkin.load_fit(bad)
    assert "corrupt_fit.json" in str(e.value)


@pytest.mark.parametrize(
    "content", [b"", b"\x00\xff\xfe garbage", b"[1, 2, 3]", b'"popkin"', b"{}", b"null"]
)
def test_not_a_fit_file(tmp_path, content):
    bad = tmp_path / "junk.json"
    bad.write_bytes(content)
    with pytest.raises(popkin.FileFormatError, match="junk.json"):
        popkin.load_fit(bad)


def test_missing_file(tmp_path):
    with pytest.raises(popkin.FileFormatError, match="nowhere.json"):
        popkin.load_fit(tmp_path / "nowhere.json")


# -- determinism -------------------------------------------------------------------------------
def test_same_seed_bit_identical_fits(fit_file):
    a, _ = fit_file
    b = _fit()
    assert a.ofv == b.ofv  # exact equality: same programs, same inputs, one machine
    np.testing.assert_array_equal(a.u_hat, b.u_hat)
    np.testing.assert_array_equal(a.eta, b.eta)
    np.testing.assert_array_equal(a.eta_cov, b.eta_cov)
    np.testing.assert_array_equal(a.cov_u, b.cov_u)
    assert a.history == b.history


def test_same_key_bit_identical_samples():
    pop = popkin.read_nonmem(linear_data(0))
    model = LinearEndpoint()
    a = popkin.simulate(model, pop, key=jax.random.key(5), n_replicates=3)
    b = popkin.simulate(model, pop, key=jax.random.key(5), n_replicates=3)
    c = popkin.simulate(model, pop, key=jax.random.key(6), n_replicates=3)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert not np.array_equal(a["DV"].to_numpy(), c["DV"].to_numpy())


# -- atomic output -----------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_write_leaves_no_file_on_error(tmp_path, exc):
    target = tmp_path / "out.json"
    with pytest.raises(exc), atomic_write(target) as fh:
        fh.write("partial")
        raise exc("interrupted")
    assert os.listdir(tmp_path) == []
    target.write_text("old")
    with pytest.raises(exc), atomic_path(target) as tmp:
        pd.DataFrame({"a": range(1000)}).to_csv(tmp)
        raise exc("interrupted")
    assert target.read_text() == "old"  # the previous file is untouched
    assert os.listdir(tmp_path) == ["out.json"]  # and no temporary file is left
    with atomic_write(target) as fh:
        fh.write("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["out.json"]
    assert (target.stat().st_mode & 0o777) != 0o600  # not mkstemp's private mode


def test_fit_save_interrupted_leaves_previous_file(fit_file, tmp_path, monkeypatch):
    f, _ = fit_file
    target = tmp_path / "fit.json"
    f.save(target)
    before = target.read_text()

    class Interrupt:
        def __init__(self, fh):
            self.fh = fh

        def write(self, text):
            self.fh.write(text[: len(text) // 2])
            raise KeyboardInterrupt

    import popkin.nlme._result as result

    real = result.atomic_write

    def interrupted(path):
        class Ctx:
            def __enter__(self):
                self.cm = real(path)
                return Interrupt(self.cm.__enter__())

            def __exit__(self, *a):
                return self.cm.__exit__(*a)

        return Ctx()

    monkeypatch.setattr(result, "atomic_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        f.save(target)
    assert target.read_text() == before and os.listdir(tmp_path) == ["fit.json"]
    with pytest.raises(KeyboardInterrupt):
        f.save(tmp_path / "new_fit.json")
    assert os.listdir(tmp_path) == ["fit.json"]
