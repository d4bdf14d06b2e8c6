import atexit
import os
import shutil
import tempfile

os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from popkin import enable_compilation_cache  # noqa: E402

# One persistent compilation cache per test session, empty at the start: identical programs
# compiled by several tests (or several fits inside one benchmark's quick run) compile once,
# and no test is timed against programs compiled by an earlier run.
_CACHE = tempfile.mkdtemp(prefix="popkin-test-jax-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
enable_compilation_cache(_CACHE)
