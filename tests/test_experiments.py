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
