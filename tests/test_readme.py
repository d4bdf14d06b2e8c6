"""The README quotes benchmarks/results/*.md verbatim (no number typed by hand)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_match_results_files():
    spec = importlib.util.spec_from_file_location(
        "render_readme", ROOT / "benchmarks" / "render_readme.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0, "run: python benchmarks/render_readme.py"
