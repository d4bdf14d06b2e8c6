import atexit
import os
import shutil
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
# The suite is compile-bound (each test compiles its own small programs), so it trades run time
# for compile time: XLA:CPU's legacy fusion emitters compile ~30% faster than the default MLIR
# ones (the quick experiments: 168 s -> 145 s on the 2-core machine), and LLVM optimisation
# level 0 compiles about twice as fast again at up to ~2x the run time (quick experiments with
# both, same results to the printed digits: 82 s vs 118 s at the default level 2).
# Benchmarks and users keep XLA's defaults. Set before JAX creates its CPU client.
_FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false", "--xla_backend_optimization_level=0")
_flags = os.environ.get("XLA_FLAGS", "")
for _flag in _FAST_COMPILE:
    if _flag.split("=")[0] not in _flags:
        _flags = f"{_flags} {_flag}".strip()
os.environ["XLA_FLAGS"] = _flags

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from popkin import enable_compilation_cache  # noqa: E402

# One persistent compilation cache per test session, empty at the start: identical programs
# compiled by several tests (or several fits inside one benchmark's quick run) compile once,
# and no test is timed against programs compiled by an earlier run.
_CACHE = tempfile.mkdtemp(prefix="popkin-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
enable_compilation_cache(_CACHE)
