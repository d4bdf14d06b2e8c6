"""The `popkin` command line on small inputs, including bad input."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from popkin.cli import app
from popkin.data import datasets

runner = CliRunner()

MODEL_FILE = """
import jax.numpy as jnp
import popkin


class MyTheo(popkin.Model):
    theta = popkin.Params(tka=0.45, tcl=1.0, tv=3.45)
    omega = popkin.Omega(eta_ka=0.6, eta_cl=0.3, eta_v=0.1)
    sigma = popkin.Params(add_sd=popkin.Positive(0.7))
    dynamics = popkin.OneCmtOral()

    def individual(self, th, eta, cov):
        return dict(ka=jnp.exp(th.tka + eta.eta_ka), cl=jnp.exp(th.tcl + eta.eta_cl),
                    v=jnp.exp(th.tv + eta.eta_v))

    def observe(self, p, sol, sg):
        return {"cp": popkin.Normal(sol.central / p["v"], sg.add_sd)}
"""


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ["fit", "simulate", "demo"]:
        assert cmd in res.output


def test_fit_with_model_file_and_reload(tmp_path):
    data = tmp_path / "theo.csv"
    datasets.theophylline_table().to_csv(data, index=False)
    model = tmp_path / "model.py"
    model.write_text(MODEL_FILE)
    out = tmp_path / "fit.json"
    res = runner.invoke(app, ["fit", str(model), str(data), "-o", str(out), "--maxeval", "0",
                              "--covariance", "none"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "OFV" in res.output and out.exists()
    sim = tmp_path / "sim.csv"
    res = runner.invoke(app, ["simulate", str(model), str(data), "-o", str(sim), "--fit", str(out),
                              "--replicates", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    df = pd.read_csv(sim)
    assert df["ID"].nunique() == 24 and "IPRED" in df


def test_bad_data_gives_one_clear_error(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,TIME,DV,AMT\n1,0,.,100\n1,-1,5,0\n")
    res = runner.invoke(app, ["fit", "theophylline", str(bad)])
    assert res.exit_code == 2
    assert "error:" in res.output and "row 2" in res.output and "TIME" in res.output
    assert "Traceback" not in res.output


def test_unknown_model_is_reported(tmp_path):
    data = tmp_path / "theo.csv"
    datasets.theophylline_table().to_csv(data, index=False)
    res = runner.invoke(app, ["fit", "no-such-model", str(data)])
    assert res.exit_code == 2 and "neither a built-in model" in res.output


@pytest.mark.slow
def test_demo_writes_its_outputs(tmp_path):
    res = runner.invoke(app, ["demo", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    for name in ["gof.png", "individual_fits.png", "observed_vs_simulated.png",
                 "joined_prior_pairs.png", "parameters.md", "theophylline_fit.json", "join.md"]:  # fmt: skip
        assert (tmp_path / name).stat().st_size > 0, name
