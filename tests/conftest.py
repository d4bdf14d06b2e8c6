import atexit
import os
import shutil
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")
# The suite is compile-bound (each test compiles its own small programs). XLA:CPU's legacy
# fusion emitters compile ~30% faster than the default MLIR ones (the quick experiments:
# 168 s -> 145 s on the 2-core machine) at some cost in run time, which tests barely have.
# Benchmarks and users keep XLA's defaults. Set before JAX creates its CPU client.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_fusion_emitters=false"
    ).strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from popkin import enable_compilation_cache  # noqa: E402

# One persistent compilation cache per test session, empty at the start: identical programs
# compiled by several tests (or several fits inside one benchmark's quick run) compile once,
# and no test is timed against programs compiled by an earlier run.
_CACHE = tempfile.mkdtemp(prefix="popkin-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
enable_compilation_cache(_CACHE)
