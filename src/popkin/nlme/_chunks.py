"""Per-subject work split over CPU threads.

A vmapped program over all subjects runs on one core of a CPU backend, and its inner while
loops run until the slowest subject of the batch has finished. Splitting the subjects into
equal chunks, one per core, and running the same compiled program on each chunk from a thread
pool (XLA releases the GIL while it runs) uses the other cores, and each chunk waits only for
its own slowest subject. Chunks are padded to equal size (by repeating the last subject) so
that one program is compiled; the padding is cut from the results. Results do not depend on
the number of chunks (subjects are independent).

The number of threads is `$POPKIN_THREADS` if set, else 1 (no splitting); chunking is used
only on a CPU backend and with at least `MIN_PER_CHUNK` subjects per chunk.

Opt-in because it can hang: with jaxlib 0.10.2, exp1's joint fit (200 subjects, a 6-eta
closed-form PD model) hung at its first evaluation on 2 chunks, deterministically, both chunk
threads in `block_until_ready` and no XLA worker running; it completes with one thread, and
neither `--xla_cpu_multi_thread_eigen=false` nor `jax_cpu_enable_async_dispatch=False`
prevents it. The cause inside XLA:CPU is not known. The EBE benchmark's ODE mode program ran
on 2 chunks without hanging (~1.4x faster on this 2-vCPU machine) until the ODE solver's
stages were unrolled (`UnrolledTsit5`); that program then hung the same way, idle, while on
one thread it runs 2.4x faster than before, so the benchmark now runs one program.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp

MIN_PER_CHUNK = 64


def n_threads() -> int:
    """Threads for per-subject work: `$POPKIN_THREADS`, else 1 (see the module docstring)."""
    env = os.environ.get("POPKIN_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError as e:
            raise ValueError(f"POPKIN_THREADS must be a positive integer, got {env!r}") from e
        if n < 1:
            raise ValueError(f"POPKIN_THREADS must be a positive integer, got {env!r}")
        return n
    return 1


def n_chunks(n_subjects: int) -> int:
    """How many chunks `map_subjects` uses for `n_subjects` (1: no splitting)."""
    if jax.default_backend() != "cpu":
        return 1
    return max(1, min(n_threads(), n_subjects // MIN_PER_CHUNK))


def _take(tree, start: int, stop: int, size: int):
    """Rows [start, stop) of every leaf, padded to `size` rows with the last row."""

    def one(x):
        x = x[start:stop]
        pad = size - x.shape[0]
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)])
        return x

    return jax.tree.map(one, tree)


def map_subjects(fn: Callable, batched: tuple, chunks: int | None = None):
    """`fn(*batched)` where every leaf of `batched` has the subject axis first, and every leaf
    of the result too; computed in `chunks` (default `n_chunks`) thread-parallel pieces."""
    n = jax.tree.leaves(batched)[0].shape[0]
    k = n_chunks(n) if chunks is None else max(1, min(int(chunks), n))
    if k == 1:
        return fn(*batched)
    size = -(-n // k)
    bounds = [(i * size, min(n, (i + 1) * size)) for i in range(k)]
    bounds = [(a, b) for a, b in bounds if a < b]
    with ThreadPoolExecutor(max_workers=len(bounds)) as pool:
        futures = [
            pool.submit(lambda a=a, b=b: jax.block_until_ready(fn(*_take(batched, a, b, size))))
            for a, b in bounds
        ]
        parts = [f.result() for f in futures]
    lengths = [b - a for a, b in bounds]
    return jax.tree.map(
        lambda *xs: jnp.concatenate([x[:m] for x, m in zip(xs, lengths, strict=True)]), *parts
    )
