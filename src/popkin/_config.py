"""Process-wide JAX settings popkin needs: float64 for NLME objectives, an optional disk cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Turn on JAX's persistent compilation cache (used by the CLI). Returns the directory."""
    d = Path(path or os.environ.get("POPKIN_CACHE", Path.home() / ".cache" / "popkin" / "jax"))
    d.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return d
