"""Errors raised for bad input data."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One problem found in an input table.

    `row` is the 1-based data row number (the header is row 0), or None when the problem
    concerns the whole table (e.g. a missing column).
    """

    row: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"column {self.column}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class DataError(ValueError):
    """A table failed validation. `problems` lists every problem found (not just the first)."""

    def __init__(self, problems: list[Problem], source: str | None = None, max_shown: int = 50):
        self.problems = list(problems)
        self.source = source
        head = f"{len(self.problems)} problem(s) in {source or 'the data table'}:"
        lines = [f"  - {p}" for p in self.problems[:max_shown]]
        if len(self.problems) > max_shown:
            lines.append(f"  ... and {len(self.problems) - max_shown} more")
        super().__init__("\n".join([head, *lines]))
