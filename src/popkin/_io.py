"""Atomic file output and the error raised for unreadable popkin files.

Every file popkin writes goes to a temporary file in the destination folder first and is moved
into place with `os.replace` (atomic on POSIX and Windows within one file system), so an
exception or Ctrl-C during the write never leaves a partial output file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["FileFormatError", "atomic_path", "atomic_write"]


class FileFormatError(ValueError):
    """A popkin file (saved fit, bootstrap result) is truncated, corrupted or not ours.

    `path` is the offending file; the message names it and says what is wrong.
    """

    def __init__(self, path, message: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {message}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it onto `path`, else delete it.

    For writers that take a path (`DataFrame.to_csv`, `Figure.savefig`)::

        with atomic_path("sim.csv") as tmp:
            df.to_csv(tmp, index=False)
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp = Path(name)
    # mkstemp makes the file private (0600); give it the mode an ordinary write would.
    with contextlib.suppress(OSError):
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on success flush, fsync and move it
    onto `path`; on any exception (KeyboardInterrupt included) delete it and leave `path`
    untouched. `mode` is "w" (text, UTF-8 by default) or "wb"."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    if mode == "w":
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())
