"""Copy the benchmark tables from `benchmarks/results/*.md` into README.md.

README.md marks each table with `<!-- results:NAME -->` ... `<!-- /results:NAME -->`; this script
replaces what stands between the markers with `benchmarks/results/NAME.md`, so the README quotes
the files the benchmark scripts wrote and no number is typed by hand. `--check` exits 1 when the
README is out of date (used by the test suite).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERN = re.compile(
    r"(<!-- results:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S
)


def render(text: str, results: Path) -> str:
    def repl(m: re.Match) -> str:
        f = results / f"{m.group('name')}.md"
        body = (
            f.read_text() if f.exists() else f"(no results yet: run the script writing {f.name})\n"
        )
        if not body.endswith("\n"):
            body += "\n"
        return m.group(1) + body + m.group(4)

    return PATTERN.sub(repl, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if README.md is out of date")
    args = ap.parse_args(argv)
    readme = ROOT / "README.md"
    old = readme.read_text()
    new = render(old, ROOT / "benchmarks" / "results")
    if args.check:
        if new != old:
            print("README.md is out of date: run python benchmarks/render_readme.py")
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
