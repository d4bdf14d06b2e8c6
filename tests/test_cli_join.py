"""`popkin join`, `evaluate`, `report` on small inputs, JointModel save/load, and bad input."""

from __future__ import annotations

import json

import jax
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from _builders import biomarker_data, synthetic_fit
from popkin.cli import app
from popkin.join import JointModel, fit_flow, join, load_joint, save_joint

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two endpoint fits (train, 30 subjects) saved as JSON, and held-out CSVs (10 subjects)."""
    d = tmp_path_factory.mktemp("join")
    paths = {}
    for k, seed in ((1, 11), (2, 12)):
        data = biomarker_data(40, seed=seed)
        train, test = data[data.ID <= 30], data[data.ID > 30]
        paths[f"fit{k}"] = synthetic_fit(train).save(d / f"fit{k}.json")
        test[["ID", "TIME", "DV"]].to_csv(d / f"test{k}.csv", index=False)
        paths[f"test{k}"] = d / f"test{k}.csv"
        if k == 1:  # all 40 subjects: the shapes the diagnostics tests compile for
            paths["fit_all"] = synthetic_fit(data).save(d / "fit_all.json")
    paths["dir"] = d
    return paths


def _ok(res):
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output


def _err(res, *needles):
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())  # rich wraps long messages at the terminal width
    assert "error:" in text and "Traceback" not in text
    for n in needles:
        assert n in text, text


def test_every_command_has_help_with_an_example():
    for cmd in ("join", "evaluate", "report"):
        res = runner.invoke(app, [cmd, "--help"])
        _ok(res)
        assert "Example" in res.output and f"popkin {cmd}" in res.output


@pytest.mark.slow  # compiles the joint evaluator twice (~50 s CPU)
def test_join_then_evaluate(saved):
    out = saved["dir"] / "joined.json"
    res = runner.invoke(app, ["join", str(saved["fit1"]), str(saved["fit2"]), "-o", str(out)])
    _ok(res)
    assert "correlation" in res.output and out.exists()
    joint = load_joint(out)
    assert joint.kind == "gaussian" and len(joint.eta_names) == 4
    # the command's prior is the library's join() with the same key
    from popkin import load_fit

    direct = join([load_fit(saved["fit1"]), load_fit(saved["fit2"])], "gaussian",
                  key=jax.random.key(0))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(joint.prior.cov), np.asarray(direct.prior.cov))
    csv = saved["dir"] / "heldout.csv"
    res = runner.invoke(app, ["evaluate", str(out), str(saved["test1"]), str(saved["test2"]),
                              "--n-is", "200", "-o", str(csv)])  # fmt: skip
    _ok(res)
    assert "ΔLL Laplace" in res.output and "over 10 subjects" in res.output
    tab = pd.read_csv(csv)
    assert len(tab) == 10 and tab["converged"].all()
    tests = [pd.read_csv(saved["test1"]), pd.read_csv(saved["test2"])]
    ref = direct.log_likelihood(tests, n_is=200, key=jax.random.key(0))
    np.testing.assert_allclose(tab["ll_joint_laplace"], ref["ll_laplace"], rtol=1e-10)
    np.testing.assert_allclose(tab["dll_is"], tab["ll_joint_is"] - tab["ll_indep_is"])


def test_joint_save_load_round_trip_gaussian(saved, tmp_path):
    from popkin import load_fit

    fits = [load_fit(saved["fit1"]), load_fit(saved["fit2"])]
    g = join(fits, "gaussian", key=jax.random.key(1))
    g2 = load_joint(save_joint(g, tmp_path / "g.json"))
    np.testing.assert_array_equal(np.asarray(g2.prior.mean), np.asarray(g.prior.mean))
    np.testing.assert_array_equal(np.asarray(g2.prior.cov), np.asarray(g.prior.cov))
    np.testing.assert_array_equal(g2.fits[1].eta, g.fits[1].eta)
    assert g2.fits[0].params.to_dict() == g.fits[0].params.to_dict()


@pytest.mark.slow  # trains a (tiny) flow: ~25 s of compilation
@pytest.mark.parametrize("whiten", ["full", "diag"])
def test_joint_save_load_round_trip_flow(saved, tmp_path, whiten):
    """Flows reload exactly; "diag" files are also read without the `whiten` key (files
    written before it existed)."""
    import json

    from popkin import load_fit

    fits = [load_fit(saved["fit1"]), load_fit(saved["fit2"])]
    x = np.random.default_rng(0).normal(size=(400, 4))
    flow, losses = fit_flow(x, key=jax.random.key(2), max_epochs=2, transformer="spline",
                            flow_layers=2, nn_width=8, whiten=whiten)  # fmt: skip
    j = JointModel(fits, flow, "flow", losses)
    j.save(tmp_path / "f.json")
    if whiten == "diag":
        doc = json.loads((tmp_path / "f.json").read_text())
        assert doc["prior"]["config"].pop("whiten") == "diag"
        (tmp_path / "f.json").write_text(json.dumps(doc))
    j2 = load_joint(tmp_path / "f.json")
    np.testing.assert_allclose(np.asarray(j2.prior.log_prob(x[:20])),
                               np.asarray(flow.log_prob(x[:20])), rtol=0, atol=0)  # fmt: skip
    np.testing.assert_array_equal(j2.losses["train"], losses["train"])


def test_join_bad_inputs(saved, tmp_path):
    out = tmp_path / "j.json"
    _err(runner.invoke(app, ["join", str(saved["fit1"]), str(tmp_path / "nope.json"), "-o",
                             str(out)]), "no such file")  # fmt: skip
    _err(runner.invoke(app, ["join", str(saved["fit1"]), str(saved["fit2"]), "--prior", "t",
                             "-o", str(out)]), "--prior must be")  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "popkin-fit", "model": "x"}')
    _err(runner.invoke(app, ["join", str(saved["fit1"]), str(bad), "-o", str(out)]),
         "truncated or corrupted")  # fmt: skip
    assert not out.exists()


def test_evaluate_bad_inputs(saved, tmp_path):
    joined = tmp_path / "joined.json"
    _ok(runner.invoke(app, ["join", str(saved["fit1"]), str(saved["fit2"]), "-o", str(joined)]))
    _err(runner.invoke(app, ["evaluate", str(joined), str(saved["test1"])]),
         "give 2 held-out CSVs")  # fmt: skip
    _err(runner.invoke(app, ["evaluate", str(saved["fit1"]), str(saved["test1"]),
                             str(saved["test2"])]), "not a popkin joint-model file")  # fmt: skip
    broken = tmp_path / "broken.csv"
    broken.write_text("ID,TIME,DV\n1,0,1\n1,-2,x\n")
    _err(runner.invoke(app, ["evaluate", str(joined), str(saved["test1"]), str(broken)]),
         "TIME")  # fmt: skip
    trunc = tmp_path / "trunc.json"
    trunc.write_text(joined.read_text()[:200])
    _err(runner.invoke(app, ["evaluate", str(trunc), str(saved["test1"]), str(saved["test2"])]),
         "not a readable popkin joint-model file")  # fmt: skip


def test_report_bad_inputs(saved, tmp_path):
    out = tmp_path / "r.html"
    _err(runner.invoke(app, ["report", str(tmp_path / "none.json"), "-o", str(out)]),
         "no such file")  # fmt: skip
    _err(runner.invoke(app, ["report", str(saved["test1"]), "-o", str(out)]),
         "not a popkin fit or joint-model file")  # fmt: skip
    doc = json.loads(saved["fit1"].read_text())
    doc["model"] = "no_such_module:Nothing"
    (tmp_path / "m.json").write_text(json.dumps(doc))
    _err(runner.invoke(app, ["report", str(tmp_path / "m.json"), "-o", str(out)]),
         "cannot import model")  # fmt: skip
    assert not out.exists()


def test_report_command_on_a_fit(saved, tmp_path):
    out = tmp_path / "r.html"
    res = runner.invoke(app, ["report", str(saved["fit_all"]), "-o", str(out), "--n-sim", "200",
                              "--dv-unit", "U/L", "--time-unit", "week"])  # fmt: skip
    _ok(res)
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 5 and "Biomarker" in html
