"""`popkin forecast`, `generate` and `pretrain` on small inputs, including bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from popkin.cli import app
from popkin.data import datasets

runner = CliRunner()


def _split(tmp_path):
    table = datasets.theophylline_table()
    new = table[table.ID == 2]
    early = new[(new.EVID == 1) | ((new.TIME > 0) & (new.TIME < 2.5))]
    table[table.ID != 2].to_csv(tmp_path / "context.csv", index=False)
    early.to_csv(tmp_path / "new.csv", index=False)
    new[new.EVID == 1].to_csv(tmp_path / "regimen.csv", index=False)
    return table


def test_forecast_and_generate(tmp_path):
    _split(tmp_path)
    r = runner.invoke(app, ["forecast", str(tmp_path / "context.csv"), str(tmp_path / "new.csv"),
                            "--times", "3:24:8", "-o", str(tmp_path / "f.csv"),
                            "--png", str(tmp_path / "f.png")])  # fmt: skip
    assert r.exit_code == 0, r.output
    f = pd.read_csv(tmp_path / "f.csv")
    assert len(f) == 8 and (f.LO90 <= f.HI90).all() and (f.PRED > 0).all()
    assert (tmp_path / "f.png").stat().st_size > 1000
    r = runner.invoke(app, ["generate", str(tmp_path / "context.csv"), str(tmp_path / "regimen.csv"),
                            "--n", "5", "--times", "1,4,12", "-o", str(tmp_path / "g.csv")])  # fmt: skip
    assert r.exit_code == 0, r.output
    g = pd.read_csv(tmp_path / "g.csv")
    assert sorted(g.ID.unique()) == [1, 2, 3, 4, 5] and len(g) == 15


def test_bad_inputs_give_one_clear_message(tmp_path):
    _split(tmp_path)
    r = runner.invoke(app, ["forecast", str(tmp_path / "context.csv"), str(tmp_path / "new.csv"),
                            "--times", "a,b", "-o", str(tmp_path / "f.csv")])  # fmt: skip
    assert r.exit_code == 2 and "--times" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "f.csv").exists()
    r = runner.invoke(app, ["forecast", str(tmp_path / "context.csv"), str(tmp_path / "new.csv"),
                            "--times", "1,2", "--model", "nope", "-o", str(tmp_path / "f.csv")])  # fmt: skip
    assert r.exit_code == 2 and "no checkpoint 'nope'" in r.output
    (tmp_path / "cfg.json").write_text(json.dumps({"steps": 1, "bogus": 1}))
    r = runner.invoke(app, ["pretrain", str(tmp_path / "cfg.json"), "-o", str(tmp_path / "run")])
    assert r.exit_code == 2 and "bogus" in r.output


@pytest.mark.slow  # compiles a (tiny) training step
def test_pretrain_writes_a_checkpoint_and_resumes(tmp_path):
    cfg = {"steps": 2, "batch": 2, "val_studies": 2, "val_every": 2, "checkpoint_every": 1,
           "warmup": 1, "model": {"d_model": 8, "n_heads": 2, "n_layers": 1, "z_study": 2,
                                  "z_ind": 2}}  # fmt: skip
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["pretrain", str(tmp_path / "cfg.json"), "-o", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["step"] == 2 and (tmp_path / "run" / "state.eqx").stat().st_size > 0
    r = runner.invoke(app, ["pretrain", str(tmp_path / "cfg.json"), "-o", str(tmp_path / "run")])
    assert r.exit_code == 0 and "step 2/2" in r.output  # resumed: nothing left to do
