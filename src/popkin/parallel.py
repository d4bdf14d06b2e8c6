"""Fan-out of independent work on Dask (`dask.distributed`): endpoint fits, bootstrap
replicates, simulation chunks.

Results come back in input order and equal the serial path's for the same seeds: every task is
a pure function of its item (randomness enters only through seeds/keys carried by the items),
and each worker runs the same float64 JAX programs as the caller.

- `client(scheduler)`: a `LocalCluster` (processes, 1 thread each) by default, or a connection
  to a running scheduler at `scheduler` ("tcp://host:8786").
- `map(fn, items, scheduler=..., client=...)`: `[fn(x) for x in items]`, on the cluster;
  `scheduler="serial"` runs in this process.
- `fit_many`, `simulate_chunks`: `popkin.fit` / `popkin.simulate` on top of `map`.

Needs the `parallel` extra (`dask`, `distributed`) except for `scheduler="serial"`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["client", "map", "fit_many", "simulate_chunks", "SERIAL"]

#: The scheduler name that runs everything in the calling process.
SERIAL = "serial"
_NOTHING = object()


def _setup_process() -> bool:
    """Worker set-up: popkin's float64 JAX config. Returns whether x64 is on."""
    import jax

    import popkin  # noqa: F401  (switches jax_enable_x64 on)

    jax.config.update("jax_enable_x64", True)
    return bool(jax.config.jax_enable_x64)


def _plugin():
    from distributed import WorkerPlugin

    class PopkinSetup(WorkerPlugin):
        """Runs `_setup_process` on every worker, including workers that join later."""

        name = "popkin-setup"

        def setup(self, worker):  # noqa: D401
            _setup_process()

    return PopkinSetup()


def client(
    scheduler: str | None = None,
    n_workers: int = 2,
    threads_per_worker: int = 1,
    **cluster_kwargs,
):
    """A `distributed.Client` whose workers have popkin's JAX config (float64).

    `scheduler`: None or "local" starts a `LocalCluster` of `n_workers` processes with
    `threads_per_worker` threads (closed with the client); otherwise the address of a running
    scheduler. Use as a context manager (`with popkin.parallel.client() as c: ...`).
    """
    try:
        from distributed import Client
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "popkin.parallel needs dask.distributed: pip install 'popkin[parallel]'"
        ) from e
    if scheduler == SERIAL:
        raise ValueError("scheduler='serial' runs without a cluster; pass it to map() instead")
    if scheduler in (None, "local"):
        c = Client(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=None,
            **cluster_kwargs,
        )
    else:
        c = Client(scheduler, **cluster_kwargs)
    c.register_plugin(_plugin())
    return c


@contextlib.contextmanager
def _client_for(scheduler: str | None, given) -> Iterator[Any]:
    """The client to use: `given`, else the active default client (when `scheduler` is None),
    else a new one (closed on exit)."""
    if given is not None:
        yield given
        return
    if scheduler is None:
        try:
            from distributed import default_client

            yield default_client()
            return
        except (ImportError, ValueError):
            pass
    c = client(scheduler)
    try:
        yield c
    finally:
        c.close()


def _call(fn: Callable, with_shared: bool, shared, item):
    """One task: `fn(item)` or `fn(shared, item)`, after the process set-up."""
    _setup_process()
    return fn(shared, item) if with_shared else fn(item)


@contextlib.contextmanager
def _progress(total: int, description: str, show: bool) -> Iterator[Callable[[], None]]:
    if not show or total < 2:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn(f"[bold]{description}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    task = bar.add_task(description, total=total)
    with bar:
        yield lambda: bar.advance(task)


def map(  # noqa: A001  (popkin.parallel.map, like the builtin but on a cluster)
    fn: Callable,
    items: Iterable,
    *,
    scheduler: str | None = None,
    client=None,
    shared: Any = _NOTHING,
    progress: bool = True,
    description: str = "working",
) -> list:
    """`[fn(x) for x in items]` (or `fn(shared, x)`), in input order.

    - `scheduler`: "serial" (this process), None (the `client` given, else the active Dask
      client, else a temporary 2-worker `LocalCluster`), "local", or a scheduler address.
    - `shared`: an object every task needs (sent to each worker once, not once per task).
    - `progress`: a rich progress bar (tasks done / total).

    `fn` must be importable or picklable (cloudpickle) on the workers. The first task that
    raises makes `map` raise that exception (the remaining tasks are cancelled).
    """
    items = list(items)
    with_shared = shared is not _NOTHING
    if scheduler == SERIAL and client is None:
        out = []
        with _progress(len(items), description, progress) as advance:
            for it in items:
                out.append(_call(fn, with_shared, shared, it))
                advance()
        return out
    if not items:
        return []
    from distributed import as_completed

    with _client_for(scheduler, client) as c:
        if with_shared:
            shared = c.scatter(shared, broadcast=True, hash=False)
        n = len(items)
        futures = c.map(_call, [fn] * n, [with_shared] * n, [shared] * n, items, pure=False)
        try:
            with _progress(n, description, progress) as advance:
                for f in as_completed(futures):
                    if f.status == "error":
                        f.result()  # raises the task's exception
                    advance()
            return c.gather(futures)
        finally:
            c.cancel([f for f in futures if not f.done()])


# -- helpers on top of map -------------------------------------------------------------------------
def _fit_job(job):
    import popkin

    model, data, *rest = job
    kwargs = rest[0] if rest else {}
    return popkin.fit(model, data, **kwargs)


def fit_many(
    jobs: Sequence[tuple],
    *,
    scheduler: str | None = None,
    client=None,
    progress: bool = True,
) -> list:
    """Independent `popkin.fit` calls, e.g. the endpoint fits before `popkin.join`.

    `jobs`: `(model, data)` or `(model, data, fit_kwargs)` tuples. Returns the `Fit`s in order;
    each equals `popkin.fit(model, data, **fit_kwargs)` run in this process.
    """
    jobs = [tuple(j) for j in jobs]
    for j in jobs:
        if len(j) not in (2, 3):
            raise ValueError("each job is (model, data) or (model, data, fit_kwargs)")
    return map(
        _fit_job, jobs, scheduler=scheduler, client=client, progress=progress, description="fits"
    )


def _sim_chunk(spec, chunk):
    from .simulate import simulate

    model, population, params, prior = spec
    key, size = chunk
    return simulate(model, population, params, key=key, n_replicates=size, prior=prior)


def simulate_chunks(
    model,
    population,
    params=None,
    *,
    key,
    n_replicates: int,
    chunk_size: int = 100,
    prior=None,
    scheduler: str | None = None,
    client=None,
    progress: bool = True,
):
    """`n_replicates` replicates of `popkin.simulate` in chunks of `chunk_size`, fanned out.

    Chunk `c` (replicates `c*chunk_size + 1 ...`) is `popkin.simulate(..., key=k_c,
    n_replicates=size_c)` with `k_c = jax.random.split(key, n_chunks)[c]`, so the sample is a
    function of `(key, n_replicates, chunk_size)` only, wherever the chunks run. The chunks are
    concatenated in order with `REP` = 1..n_replicates and
    `ID = (position of the subject) + 1 + (REP - 1) * n_subjects`, as `popkin.simulate` numbers
    replicates; the ETA, PRED, IPRED columns are kept.
    """
    import jax
    import pandas as pd

    from .data._population import Population

    if not isinstance(population, Population):
        from .data._reader import read_nonmem

        population = read_nonmem(population)
    if n_replicates < 1 or chunk_size < 1:
        raise ValueError("n_replicates and chunk_size must be >= 1")
    sizes = [min(chunk_size, n_replicates - a) for a in range(0, n_replicates, chunk_size)]
    keys = list(jax.random.split(key, len(sizes)))
    parts = map(
        _sim_chunk,
        list(zip(keys, sizes, strict=True)),
        scheduler=scheduler,
        client=client,
        shared=(model, population, params, prior),
        progress=progress,
        description="simulation chunks",
    )
    out = pd.concat(parts, ignore_index=True)
    base = population.table
    T, n = len(base), population.n_subjects
    rep = np.repeat(np.arange(n_replicates), T)
    if n_replicates > 1:
        pos = base["ID"].map({v: i for i, v in enumerate(population.ids)}).to_numpy()
        out["REP"] = rep + 1
        out["ID"] = np.tile(pos, n_replicates) + 1 + rep * n
    return out
