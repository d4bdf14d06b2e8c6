"""Process-wide JAX settings popkin needs: float64 for NLME objectives, an optional disk cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache. Returns the directory.

    Compiled programs are stored on disk and reused whenever the same program (same HLO, e.g.
    one model structure fitted to several endpoints, or a rerun) is compiled again, in this
    process or a later one. Directory: `path`, else the one already configured (a caller such
    as the test suite may have chosen it), else `$POPKIN_CACHE`, else ~/.cache/popkin/jax.
    """
    current = jax.config.jax_compilation_cache_dir
    if path is None and current:
        return Path(current)
    d = Path(path or os.environ.get("POPKIN_CACHE", Path.home() / ".cache" / "popkin" / "jax"))
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return d
