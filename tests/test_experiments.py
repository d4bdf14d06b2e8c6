"""Seed experiments run end to end in their quick versions (benchmarks/ is not a package)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (equinox modules) look their module up
    spec.loader.exec_module(module)
    return module


def test_exp2_quick(tmp_path):
    """Yang-half toy: the flow join beats the Gaussian join on held-out subjects."""
    exp2 = _load("exp2_yang")
    exp2.main(["--quick", "--out", str(tmp_path)])
    path = tmp_path / "exp2.json"
    assert path.exists()
    assert (tmp_path / "exp2.md").exists() and (tmp_path / "exp2_yang.png").exists()
    res = json.loads(path.read_text())
    test = {r["prior"]: r for r in res["rows"] if r["split"] == "test"}
    assert set(test) == {"independent", "gaussian", "flow", "oracle"}
    assert test["independent"]["dll"] == 0.0
    assert test["oracle"]["dll"] > 0
    assert test["flow"]["dll"] > test["gaussian"]["dll"]


def test_exp3_quick(tmp_path):
    """Interim prediction: the joined priors use the biomarkers to predict the unobserved PE
    slope, so their R² beats the independent prior's (~55 s on the 2-core machine)."""
    exp3 = _load("exp3_interim")
    exp3.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "exp3.json").read_text())
    assert (tmp_path / "exp3.md").exists() and (tmp_path / "exp3_interim.png").exists()
    r2 = {r["prior"]: r["r2"] for r in res["rows"]}
    assert set(r2) == {"independent", "gaussian", "flow", "oracle"}
    assert r2["gaussian"] > r2["independent"] + 0.05
    assert r2["flow"] > r2["independent"]
    assert r2["oracle"] > r2["independent"] + 0.05


def test_exp1_quick(tmp_path):
    """PK + 3 PD endpoints: joint fit >= post-hoc Gaussian > independent (test ΔLL): a PK fit,
    three PD fits, two joins and a 6x6-Omega joint fit (~80 s on the 2-core machine)."""
    exp1 = _load("exp1_pkpd")
    exp1.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "exp1.json").read_text())
    rows = {r["prior"]: r for r in res["rows"]}
    assert rows["independent"]["dll"] == 0.0
    assert rows["gaussian"]["dll"] > 0
    # post-hoc Gaussian > independent: more than two SEs of the per-subject differences
    assert rows["gaussian"]["dll"] > 2 * rows["gaussian"]["se"]
    # joint >= post-hoc Gaussian: not worse by more than two paired SEs (the two priors are
    # evaluated on the same test subjects; with 60 training subjects both Omegas are noisy)
    jg = res["joint_minus_gaussian"]
    assert jg["dll"] >= -2 * jg["se"]
    assert res["closed_form_vs_ode_max_rel_diff"] < 1e-5
