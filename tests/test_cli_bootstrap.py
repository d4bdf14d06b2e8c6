"""`popkin bootstrap` on a small model file (serial scheduler), and its bad-input errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
from typer.testing import CliRunner

import popkin
from popkin.cli import app

runner = CliRunner()

MODEL_FILE = """
import popkin
from popkin.models import RecordTimes


class Lin(popkin.Model):
    theta = popkin.Params(mu=0.0)
    omega = popkin.Omega(eta=0.5)
    sigma = popkin.Params(sd=popkin.Positive(0.5))
    dynamics = RecordTimes()

    def individual(self, th, eta, cov):
        return dict(m=th.mu + eta.eta)

    def observe(self, p, sol, sg):
        return {"y": popkin.additive(p["m"] + 0.0 * sol.t, sg.sd)}
"""


def _data(path):
    rng = np.random.default_rng(0)
    eta = rng.normal(0.0, 0.7, 12)
    rows = [(i + 1, t, 1.0 + eta[i] + 0.5 * rng.normal()) for i in range(12) for t in range(3)]
    pd.DataFrame(rows, columns=["ID", "TIME", "DV"]).to_csv(path, index=False)


def test_bootstrap_command(tmp_path):
    data, model = tmp_path / "d.csv", tmp_path / "lin.py"
    _data(data)
    model.write_text(MODEL_FILE)
    out, table = tmp_path / "boot.json", tmp_path / "ci.csv"
    args = ["bootstrap", str(model), str(data), "--n", "5", "--seed", "3", "--scheduler",
            "serial", "-o", str(out), "--table", str(table), "--level", "0.9"]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "90% CI" in res.output and "failed 0.0%" in res.output
    boot = popkin.load_bootstrap(out)
    assert boot.n == 5 and boot.seed == 3 and boot.failed_share == 0.0
    assert boot.samples.shape == (5, 12)
    ci = pd.read_csv(table)
    assert list(ci["parameter"]) == ["mu", "omega(eta)", "sd"]
    assert (ci["ci_low"] <= ci["boot_median"]).all() and (ci["boot_median"] <= ci["ci_high"]).all()
    # Same seed, same replicates: the command is reproducible.
    out2 = tmp_path / "boot2.json"
    res = runner.invoke(app, [*args[:-6], "-o", str(out2)])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(popkin.load_bootstrap(out2).estimates, boot.estimates)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "boot.json", "boot2.json", "ci.csv", "d.csv", "lin.py"
    ]  # fmt: skip


def test_bootstrap_command_bad_input(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ID,TIME,DV\n1,0,1\n1,-1,2\n")
    out = tmp_path / "boot.json"
    res = runner.invoke(app, ["bootstrap", "theophylline", str(bad), "--scheduler", "serial",
                              "-o", str(out)])  # fmt: skip
    assert res.exit_code == 2
    assert "TIME must be >= 0" in res.output and not out.exists()
    res = runner.invoke(app, ["bootstrap", "theophylline", str(bad), "--n", "0", "-o", str(out)])
    assert res.exit_code == 2 and "--n must be >= 1" in res.output
