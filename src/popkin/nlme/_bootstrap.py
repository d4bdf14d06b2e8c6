"""Nonparametric case bootstrap of a `Fit`, fanned out with `popkin.parallel.map`.

Replicate b draws N subjects with replacement from the N of the fit (indices from
`numpy.random.default_rng(seed)`, drawn up front so the sample does not depend on where the
replicates run), renumbers them 1..N (a subject drawn twice is two subjects), and refits the
model from the original estimates with the same method and prior (no covariance step). A
replicate fails when the refit raises or its status is not `FitStatus.SUCCESS`; failed
replicates are reported (`failed_share`) and left out of the intervals. Intervals are
percentile intervals: the (1-level)/2 and (1+level)/2 quantiles of the successful replicates'
estimates, on the natural scale of each parameter.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._io import FileFormatError, atomic_write
from ..data._population import ROW_AFTER, Population, PopulationInfo
from ._result import Fit, FitStatus

FORMAT = "popkin-bootstrap"
FORMAT_VERSION = 1


def resample_subjects(population: Population, index) -> Population:
    """The population of subjects at positions `index` (repeats allowed), renumbered ID 1..n.

    Array shapes (padding) are those of `population`, so compiled fits are reused.
    """
    idx = np.asarray(index, dtype=np.int64)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError("index must be a non-empty vector of subject positions")
    if idx.min() < 0 or idx.max() >= population.n_subjects:
        raise ValueError(f"subject positions must be in 0..{population.n_subjects - 1}")
    table = population.table
    id_col = table["ID"].to_numpy()
    # Table rows of each subject (contiguous, validated by read_nonmem), by position.
    first = {v: i for i, v in reversed(list(enumerate(id_col)))}
    counts = pd.Series(id_col).value_counts(sort=False).to_dict()
    starts = np.array([first[v] for v in population.ids])
    sizes = np.array([counts[v] for v in population.ids])

    sub = jax.tree.map(lambda x: np.asarray(x)[idx], population.subjects)
    new_starts = np.concatenate([[0], np.cumsum(sizes[idx])[:-1]])
    shift = (new_starts - starts[idx])[:, None]
    rec_row = np.asarray(sub.records.row)
    rec_row = np.where(rec_row >= 0, rec_row + shift, -1).astype(rec_row.dtype)
    dose_row = np.asarray(sub.doses.row)
    moved = (dose_row >= 0) & (dose_row < ROW_AFTER)
    dose_row = np.where(moved, dose_row + shift, dose_row).astype(dose_row.dtype)
    sub = eqx.tree_at(lambda s: (s.records.row, s.doses.row), sub, (rec_row, dose_row))
    sub = jax.tree.map(jnp.asarray, sub)

    rows = np.concatenate([np.arange(starts[i], starts[i] + sizes[i]) for i in idx])
    new_table = table.iloc[rows].reset_index(drop=True)
    new_table["ID"] = np.repeat(np.arange(1, idx.size + 1), sizes[idx])
    info = PopulationInfo(
        ids=tuple(range(1, idx.size + 1)),
        covariates=population.covariates,
        endpoints=population.endpoints,
        table=new_table,
        source=None,
    )
    return Population(subjects=sub, info=info)


@dataclass
class BootstrapResult:
    """Bootstrap replicates of a fit.

    - `parameters`: names as in `Fit.estimates`; `original`: the fit's estimates.
    - `estimates` (n, p): each replicate's estimates (NaN where the refit raised; failed
      replicates are kept here but left out of `ci`).
    - `ofv` (n,), `status` (n,): `FitStatus` names, or "ERROR" when the refit raised;
      `messages`: the refit's warnings or the exception, per replicate.
    - `samples` (n, N): the resampled subject positions of each replicate.
    """

    parameters: list[str]
    original: np.ndarray
    estimates: np.ndarray
    ofv: np.ndarray
    status: list[str]
    messages: list[str]
    samples: np.ndarray
    seed: int
    method: str
    model: str
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return len(self.status)

    @property
    def ok(self) -> np.ndarray:
        """True for replicates whose refit converged (status SUCCESS)."""
        return np.array([s == FitStatus.SUCCESS.name for s in self.status], dtype=bool)

    @property
    def failed_share(self) -> float:
        """Share of replicates that raised or did not converge."""
        return float(1 - self.ok.mean()) if self.n else float("nan")

    def ci(self, level: float = 0.95) -> pd.DataFrame:
        """Per parameter: estimate, bootstrap median and SD, percentile CI at `level`."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        good = self.estimates[self.ok]
        a = (1 - level) / 2
        if len(good):
            lo, med, hi = np.quantile(good, [a, 0.5, 1 - a], axis=0)
            sd = np.std(good, axis=0, ddof=1) if len(good) > 1 else np.full(good.shape[1], np.nan)
        else:
            lo = med = hi = sd = np.full(len(self.parameters), np.nan)
        return pd.DataFrame(
            {
                "parameter": self.parameters,
                "estimate": self.original,
                "boot_median": med,
                "boot_se": sd,
                "ci_low": lo,
                "ci_high": hi,
                "n_ok": int(self.ok.sum()),
                "n": self.n,
            }
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per replicate: replicate (1-based), status, ok, OFV and the estimates."""
        df = pd.DataFrame(self.estimates, columns=self.parameters)
        df.insert(0, "ofv", self.ofv)
        df.insert(0, "ok", self.ok)
        df.insert(0, "status", self.status)
        df.insert(0, "replicate", np.arange(1, self.n + 1))
        return df

    def summary(self, level: float = 0.95) -> str:
        ci = self.ci(level)
        lines = [
            f"bootstrap of {self.model} ({self.method.upper()}): {self.n} replicates, seed "
            f"{self.seed}, failed {100 * self.failed_share:.1f}% ({self.n - int(self.ok.sum())})"
            f", {self.seconds:.1f}s",
            f"{'parameter':<24}{'estimate':>12}{'boot SE':>11}{f'{100 * level:g}% CI':>26}",
        ]
        for _, r in ci.iterrows():
            lines.append(
                f"{r.parameter:<24}{r.estimate:>12.5g}{r.boot_se:>11.4g}"
                f"{f'[{r.ci_low:.4g}, {r.ci_high:.4g}]':>26}"
            )
        return "\n".join(lines)

    def save(self, path) -> Path:
        """Write JSON (floats exact, NaN as null), atomically; reload with `load_bootstrap`."""
        path = Path(path)

        def vec(x):
            return [None if not np.isfinite(v) else float(v) for v in np.ravel(x)]

        doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "parameters": list(self.parameters),
            "original": vec(self.original),
            "estimates": [vec(r) for r in self.estimates],
            "ofv": vec(self.ofv),
            "status": list(self.status),
            "messages": list(self.messages),
            "samples": np.asarray(self.samples).tolist(),
            "seed": self.seed,
            "method": self.method,
            "model": self.model,
            "seconds": self.seconds,
        }
        text = json.dumps(doc)
        with atomic_write(path) as fh:
            fh.write(text)
        return path


def load_bootstrap(path) -> BootstrapResult:
    """Read a file written by `BootstrapResult.save` (`FileFormatError` if it is not one)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(path, f"not a readable popkin bootstrap file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FileFormatError(path, f"not a popkin bootstrap file (missing 'format': '{FORMAT}')")

    def arr(x):
        return np.array([np.nan if v is None else v for v in x], dtype=float)

    try:
        p = len(doc["parameters"])
        est = np.array([arr(r) for r in doc["estimates"]], dtype=float).reshape(-1, p)
        res = BootstrapResult(
            parameters=[str(s) for s in doc["parameters"]],
            original=arr(doc["original"]),
            estimates=est,
            ofv=arr(doc["ofv"]),
            status=[str(s) for s in doc["status"]],
            messages=[str(s) for s in doc["messages"]],
            samples=np.asarray(doc["samples"], dtype=np.int64),
            seed=int(doc["seed"]),
            method=str(doc["method"]),
            model=str(doc["model"]),
            seconds=float(doc.get("seconds", 0.0)),
        )
        if not (len(res.original) == p and len(res.ofv) == len(res.status) == len(est)):
            raise ValueError("array lengths disagree")
    except Exception as e:
        raise FileFormatError(
            path, f"bootstrap file is corrupted ({type(e).__name__}: {e})"
        ) from None
    return res


@dataclass(frozen=True)
class _Spec:
    """What every replicate needs (sent to each worker once)."""

    model: object
    population: Population
    method: str
    params: object
    prior: object
    maxeval: int
    names: tuple


def _replicate(spec: _Spec, index: np.ndarray):
    """One replicate: resample, refit from the original estimates. Never raises."""
    from ._fit import fit

    try:
        pop = resample_subjects(spec.population, index)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            f = fit(
                spec.model,
                pop,
                spec.method,
                params=spec.params,
                prior=spec.prior,
                maxeval=spec.maxeval,
                covariance=None,
            )
        est = f.estimates
        if tuple(est["parameter"]) != spec.names:
            raise RuntimeError(f"replicate parameters {list(est['parameter'])} differ")
        vals = est["estimate"].to_numpy(float)
        status = f.status.name
        if status == FitStatus.SUCCESS.name and not np.all(np.isfinite(vals)):
            status = FitStatus.NONFINITE_OBJECTIVE.name
        msg = "; ".join(dict.fromkeys([*f.messages, *(str(w.message) for w in caught)]))
        return vals, float(f.ofv), status, msg
    except Exception as e:  # noqa: BLE001 - a failed replicate is data, not a crash
        return np.full(len(spec.names), np.nan), float("nan"), "ERROR", f"{type(e).__name__}: {e}"


def bootstrap(
    fit: Fit,
    n: int = 200,
    *,
    seed: int,
    scheduler: str | None = None,
    client=None,
    maxeval: int = 500,
    progress: bool = True,
) -> BootstrapResult:
    """Nonparametric case bootstrap of `fit` with `n` replicates (see the module docstring).

    `seed` fixes the resampled subjects; `scheduler` / `client` as in `popkin.parallel.map`
    ("serial" runs in this process; the result is the same either way).
    """
    from .. import parallel

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    t0 = time.perf_counter()
    N = fit.population.n_subjects
    samples = np.random.default_rng(seed).integers(0, N, size=(n, N))
    names = tuple(fit.estimates["parameter"])
    spec = _Spec(fit.model, fit.population, fit.method, fit.params, fit.prior, maxeval, names)
    out = parallel.map(
        _replicate,
        list(samples),
        scheduler=scheduler,
        client=client,
        shared=spec,
        progress=progress,
        description="bootstrap",
    )
    return BootstrapResult(
        parameters=list(names),
        original=fit.estimates["estimate"].to_numpy(float),
        estimates=np.array([o[0] for o in out], dtype=float).reshape(n, len(names)),
        ofv=np.array([o[1] for o in out], dtype=float),
        status=[o[2] for o in out],
        messages=[o[3] for o in out],
        samples=samples,
        seed=int(seed),
        method=fit.method,
        model=f"{type(fit.model).__module__}:{type(fit.model).__qualname__}",
        seconds=time.perf_counter() - t0,
    )
