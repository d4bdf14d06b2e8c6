"""`Fit`: estimates, uncertainty, per-subject posteriors, residuals, and exact save/load."""

from __future__ import annotations

import enum
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._io import FileFormatError, atomic_write
from ..data._population import Population
from ..models._model import Model
from ..params import ModelParams

FORMAT_VERSION = 1


class FitStatus(enum.Enum):
    """Outcome of an estimation (the first problem met, in order of severity)."""

    SUCCESS = "success"
    EVALUATION_ONLY = "evaluation only (maxeval=0)"
    MAX_EVALUATIONS = "maximum evaluations reached"
    OUTER_NOT_CONVERGED = "outer optimisation did not converge"
    INNER_NOT_CONVERGED = "inner mode search did not converge for some subjects"
    NONFINITE_OBJECTIVE = "objective not finite"
    COVARIANCE_FAILED = "covariance step failed"


@dataclass
class Fit:
    """Result of `popkin.fit`.

    - `ofv`: -2 log-likelihood without the N log(2 pi) constant (NONMEM's convention);
      `loglik` is the full log-likelihood.
    - `params`: estimates on the natural scale; `estimates`: one row per parameter with SE,
      RSE% and 95% CI (Omega/sigma rows included); `correlation`: of the estimates.
    - `eta` (n_subjects, n_eta): modes (EBEs); `eta_cov` (n_subjects, n_eta, n_eta): Laplace
      posterior covariances (inverse exact Hessian of the negative log joint at the mode).
    - `predictions`: a table with PRED, IPRED, RES, WRES, CWRES, IWRES per record.
    """

    model: Model
    population: Population
    method: str
    params: ModelParams
    u_hat: np.ndarray
    ofv: float
    ofv_subjects: np.ndarray
    eta: np.ndarray
    eta_cov: np.ndarray
    eta_converged: np.ndarray
    status: FitStatus
    messages: list[str]
    cov_u: np.ndarray | None
    covariance: str | None
    estimate_omega: bool
    n_evaluations: int = 0
    history: list[float] = field(default_factory=list)
    seconds: float = 0.0
    prior: object | None = None
    _estimates: pd.DataFrame | None = field(default=None, repr=False)
    _predictions: pd.DataFrame | None = field(default=None, repr=False)

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        *,
        engine,
        u_hat,
        ofv,
        ofv_subjects,
        modes,
        cov_u,
        covariance,
        status,
        messages,
        n_evaluations,
        history,
        seconds,
    ) -> Fit:
        return cls(
            model=engine.model,
            population=engine.population,
            method=engine.method,
            params=engine.unpack(u_hat),
            u_hat=np.asarray(u_hat, float),
            ofv=float(ofv),
            ofv_subjects=np.asarray(ofv_subjects, float),
            eta=np.asarray(modes.eta, float),
            eta_cov=np.asarray(modes.hess_inv, float),
            eta_converged=np.asarray(modes.converged, bool),
            status=status,
            messages=list(messages),
            cov_u=None if cov_u is None else np.asarray(cov_u, float),
            covariance=covariance,
            estimate_omega=engine.estimate_omega,
            n_evaluations=n_evaluations,
            history=list(history),
            seconds=seconds,
            prior=engine.fixed_prior,
        )

    # -- basic quantities ------------------------------------------------------------------------
    @property
    def n_observations(self) -> int:
        return self.population.n_observations

    @property
    def loglik(self) -> float:
        """Full log-likelihood, `-(OFV + N log 2 pi) / 2`."""
        return -0.5 * (self.ofv + self.n_observations * np.log(2 * np.pi))

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.u_hat.size

    @property
    def bic(self) -> float:
        return -2 * self.loglik + np.log(self.n_observations) * self.u_hat.size

    @property
    def omega(self) -> np.ndarray:
        return np.asarray(self.params.omega)

    def _natural_vector(self, u):
        """Natural-scale estimates (names, values) as a function of the unconstrained vector."""
        from ..params import unpack

        omega_fixed = None if self.estimate_omega else jnp.asarray(self.model.omega.matrix_init())
        p = unpack(self.model, u, omega_fixed)
        vals = [p.theta[k] for k in self.model.theta.free_names]
        if self.estimate_omega:
            om = self.model.omega
            i = 0
            for names, _, fixed in om.blocks:
                k = len(names)
                if not fixed:
                    r, c = np.tril_indices(k)
                    vals.extend(p.omega[i + r, i + c])
                i += k
        vals.extend(p.sigma[k] for k in self.model.sigma.free_names)
        return jnp.stack(vals) if vals else jnp.zeros(0)

    def _natural_names(self):
        names = [(k, "theta") for k in self.model.theta.free_names]
        if self.estimate_omega:
            for blk, _, fixed in self.model.omega.blocks:
                if fixed:
                    continue
                r, c = np.tril_indices(len(blk))
                for a, b in zip(r, c, strict=True):
                    nm = f"omega({blk[a]})" if a == b else f"omega({blk[a]},{blk[b]})"
                    names.append((nm, "omega"))
        names += [(k, "sigma") for k in self.model.sigma.free_names]
        return names

    @property
    def estimates(self) -> pd.DataFrame:
        """One row per estimated parameter: estimate, SE, RSE%, 95% CI (natural scale)."""
        if self._estimates is None:
            u = jnp.asarray(self.u_hat)
            est = np.asarray(self._natural_vector(u))
            names = self._natural_names()
            se = np.full(est.shape, np.nan)
            if self.cov_u is not None:
                J = np.asarray(jax.jacfwd(self._natural_vector)(u))
                cov = J @ self.cov_u @ J.T
                se = np.sqrt(np.clip(np.diag(cov), 0, None))
            df = pd.DataFrame(
                {
                    "parameter": [n for n, _ in names],
                    "block": [b for _, b in names],
                    "estimate": est,
                    "se": se,
                }
            )
            df["rse_pct"] = 100 * df["se"] / df["estimate"].abs()
            df["ci_low"] = df["estimate"] - 1.959964 * df["se"]
            df["ci_high"] = df["estimate"] + 1.959964 * df["se"]
            self._estimates = df
        return self._estimates

    @property
    def correlation(self) -> pd.DataFrame | None:
        if self.cov_u is None:
            return None
        u = jnp.asarray(self.u_hat)
        J = np.asarray(jax.jacfwd(self._natural_vector)(u))
        cov = J @ self.cov_u @ J.T
        sd = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
        names = [n for n, _ in self._natural_names()]
        return pd.DataFrame(cov / np.outer(sd, sd), index=names, columns=names)

    @property
    def shrinkage(self) -> dict:
        """eta-shrinkage per random effect (1 - SD(EBE)/omega_sd) and epsilon-shrinkage."""
        sd = (
            np.sqrt(np.diag(self.omega))
            if self.prior is None
            else np.full(self.eta.shape[1], np.nan)
        )
        eta_sh = 1 - np.std(self.eta, axis=0, ddof=1) / sd
        pr = self.predictions
        iw = pr.loc[pr["MDV"] == 0, "IWRES"].to_numpy()
        return {
            "eta": dict(zip(self.model.eta_names, eta_sh.tolist(), strict=True)),
            "epsilon": float(1 - np.std(iw, ddof=1)) if iw.size > 1 else float("nan"),
        }

    # -- residuals ---------------------------------------------------------------------------
    @property
    def predictions(self) -> pd.DataFrame:
        """Per record: ID, TIME, DV, MDV, DVID, PRED, IPRED, RES, WRES, CWRES, IWRES.

        Residuals are on the error model's Gaussian scale (log scale for LogNormal endpoints).
        WRES linearises at eta = 0 (FO), CWRES at the EBE (Hooker et al. 2007).
        """
        if self._predictions is None:
            self._predictions = _residuals(self)
        return self._predictions

    def to_dataframe(self) -> pd.DataFrame:
        """Predictions and residuals joined with the EBEs per record."""
        df = self.predictions.copy()
        pos = df["ID"].map({v: i for i, v in enumerate(self.population.ids)}).to_numpy()
        for j, nm in enumerate(self.model.eta_names):
            df[f"ETA_{nm}"] = self.eta[pos, j]
        return df

    def individual_parameters(self) -> pd.DataFrame:
        """Each subject's individual parameters at its EBE."""
        from ..simulate import predictor_for

        pred = predictor_for(self.model, self.population)
        f = jax.vmap(lambda e, s: pred.individual(self.params.theta, e, s))
        p = f(jnp.asarray(self.eta), self.population.subjects)
        df = pd.DataFrame({k: np.asarray(v) for k, v in p.items() if np.ndim(v) == 1})
        df.insert(0, "ID", list(self.population.ids))
        return df

    # -- display ----------------------------------------------------------------------------
    def summary(self) -> str:
        """A NONMEM-style text summary: OFV, estimates with SE/RSE, shrinkage, status."""
        est = self.estimates
        lines = [
            f"popkin fit: {self.model.name}  method={self.method.upper()}  status={self.status.value}",
            f"subjects={self.population.n_subjects}  observations={self.n_observations}  "
            f"evaluations={self.n_evaluations}  time={self.seconds:.2f}s",
            f"OFV = {self.ofv:.4f}  (-2LL without N*log(2*pi); -2LL = {-2 * self.loglik:.4f}, "
            f"AIC = {self.aic:.3f})",
            "",
            f"{'parameter':<24}{'estimate':>12}{'SE':>11}{'RSE%':>8}{'95% CI':>24}",
        ]
        for _, r in est.iterrows():
            ci = f"[{r.ci_low:.4g}, {r.ci_high:.4g}]" if np.isfinite(r.se) else ""
            se = f"{r.se:.4g}" if np.isfinite(r.se) else "-"
            rse = f"{r.rse_pct:.1f}" if np.isfinite(r.rse_pct) else "-"
            lines.append(f"{r.parameter:<24}{r.estimate:>12.5g}{se:>11}{rse:>8}{ci:>24}")
        try:
            sh = self.shrinkage
            lines.append("")
            lines.append(
                "shrinkage: "
                + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sh["eta"].items())
                + f"; epsilon {100 * sh['epsilon']:.1f}%"
            )
        except Exception:  # pragma: no cover - shrinkage is informational
            pass
        for m in self.messages:
            lines.append(f"warning: {m}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Fit({self.model.name}, {self.method}, OFV={self.ofv:.4f}, status={self.status.name})"
        )

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write the fit to a JSON file (floats written exactly); reload with `popkin.load_fit`."""
        path = Path(path)
        table = self.population.table
        doc = {
            "format": "popkin-fit",
            "version": FORMAT_VERSION,
            "model": f"{type(self.model).__module__}:{type(self.model).__qualname__}",
            "method": self.method,
            "u_hat": self.u_hat.tolist(),
            "params": self.params.to_dict(),
            "ofv": self.ofv,
            "ofv_subjects": self.ofv_subjects.tolist(),
            "eta": self.eta.tolist(),
            "eta_cov": self.eta_cov.tolist(),
            "eta_converged": self.eta_converged.tolist(),
            "status": self.status.name,
            "messages": self.messages,
            "cov_u": None if self.cov_u is None else self.cov_u.tolist(),
            "covariance": self.covariance,
            "estimate_omega": self.estimate_omega,
            "n_evaluations": self.n_evaluations,
            "history": self.history,
            "seconds": self.seconds,
            "table": {c: table[c].tolist() for c in table.columns},
            "source": self.population.info.source,
        }
        text = json.dumps(doc)
        with atomic_write(path) as fh:  # no partial file on an error or Ctrl-C
            fh.write(text)
        return path


def load_fit(path, model: Model | None = None) -> Fit:
    """Load a fit written by `Fit.save`. Pass `model` when its class cannot be imported.

    Raises `popkin.FileFormatError` (a `ValueError` naming the file) when the file is missing,
    truncated, corrupted or not a popkin fit.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(path, f"not a readable popkin fit file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "popkin-fit":
        raise FileFormatError(path, "not a popkin fit file (missing 'format': 'popkin-fit')")
    required = ("model", "method", "u_hat", "params", "ofv", "eta", "eta_cov", "status", "table")
    missing = [k for k in required if k not in doc]
    if missing:
        raise FileFormatError(path, f"fit file is truncated or corrupted (missing {missing})")
    if model is None:
        mod, _, qual = str(doc["model"]).partition(":")
        try:
            obj = importlib.import_module(mod)
            for part in qual.split("."):
                obj = getattr(obj, part)
            model = obj()
        except Exception as e:
            raise FileFormatError(
                path, f"cannot import model {doc['model']} ({e}); pass model= to load_fit"
            ) from None
    try:
        return _fit_from_doc(doc, model)
    except Exception as e:  # any malformed field: one clear error naming the file
        raise FileFormatError(
            path, f"fit file is corrupted ({type(e).__name__}: {e})".rstrip()
        ) from None


def _fit_from_doc(doc: dict, model: Model) -> Fit:
    from ..data._reader import read_nonmem

    table = pd.DataFrame(doc["table"])
    population = read_nonmem(table)
    population = Population(
        subjects=population.subjects,
        info=type(population.info)(
            ids=population.info.ids,
            covariates=population.info.covariates,
            endpoints=population.info.endpoints,
            table=population.info.table,
            source=doc.get("source"),
        ),
    )
    n, k = population.n_subjects, len(model.eta_names)
    u_hat = np.asarray(doc["u_hat"], float)
    params = ModelParams.from_dict(doc["params"])
    names = set(model.theta.init_natural())
    if set(params.theta) != names:
        raise ValueError(f"thetas {sorted(params.theta)} do not match the model's {sorted(names)}")
    return Fit(
        model=model,
        population=population,
        method=str(doc["method"]),
        params=params,
        u_hat=u_hat,
        ofv=float(doc["ofv"]),
        ofv_subjects=np.asarray(doc.get("ofv_subjects", []), float),
        eta=np.asarray(doc["eta"], float).reshape(n, k),
        eta_cov=np.asarray(doc["eta_cov"], float).reshape(n, k, k),
        eta_converged=np.asarray(doc.get("eta_converged", []), bool),
        status=FitStatus[doc["status"]],
        messages=[str(m) for m in doc.get("messages", [])],
        cov_u=None if doc.get("cov_u") is None else np.asarray(doc["cov_u"], float),
        covariance=doc.get("covariance"),
        estimate_omega=bool(doc.get("estimate_omega", True)),
        n_evaluations=int(doc.get("n_evaluations", 0)),
        history=[float(h) for h in doc.get("history", [])],
        seconds=float(doc.get("seconds", 0.0)),
    )


def _residuals(fit: Fit) -> pd.DataFrame:
    from ..simulate import predictor_for

    pop = fit.population
    pred = predictor_for(fit.model, pop)
    params = fit.params
    omega = jnp.asarray(params.omega)
    n_eta = len(fit.model.eta_names)

    def one(eta, s):
        def locf(e):
            loc, scale, y, p = pred.distributions(params.theta, params.sigma, e, s)
            return loc, (scale, y, p)

        e0 = jnp.zeros(n_eta)
        G0, (loc0, (sc0, y, p0)) = jax.jacfwd(locf, has_aux=True)(e0), locf(e0)
        Gi, (loci, (sci, _, pi)) = jax.jacfwd(locf, has_aux=True)(eta), locf(eta)
        G0 = G0[0] if isinstance(G0, tuple) else G0
        Gi = Gi[0] if isinstance(Gi, tuple) else Gi
        obs = s.records.obs & (s.records.cens == 0)

        def wres(r, G, sc):
            r = jnp.where(obs, r, 0.0)
            G = jnp.where(obs[:, None], G, 0.0)
            V = jnp.where(obs, sc**2, 1.0)
            C = G @ omega @ G.T + jnp.diag(V)
            L = jnp.linalg.cholesky(C)
            return jax.scipy.linalg.solve_triangular(L, r, lower=True)

        wr = wres(y - loc0, G0, sc0)
        cw = wres(y - (loci - Gi @ eta), Gi, sci)
        iw = (y - loci) / sci
        return p0, pi, y - loc0, wr, cw, iw

    outs = jax.jit(jax.vmap(one))(jnp.asarray(fit.eta), pop.subjects)
    p0, pi, res, wr, cw, iw = (np.asarray(o) for o in outs)
    rec = pop.subjects.records
    mask = np.asarray(rec.rec)
    rows = np.asarray(rec.row)[mask]
    table = pop.table.iloc[rows].reset_index(drop=True)
    obs = np.asarray(rec.obs)[mask] & (np.asarray(rec.cens)[mask] == 0)
    out = pd.DataFrame(
        {
            "ID": table["ID"].to_numpy(),
            "TIME": table["TIME"].to_numpy(),
            "DV": table["DV"].to_numpy(),
            "MDV": np.where(obs, 0, 1),
            "DVID": table["DVID"].to_numpy() if "DVID" in table else 1,
            "PRED": p0[mask],
            "IPRED": pi[mask],
            "RES": np.where(obs, res[mask], np.nan),
            "WRES": np.where(obs, wr[mask], np.nan),
            "CWRES": np.where(obs, cw[mask], np.nan),
            "IWRES": np.where(obs, iw[mask], np.nan),
        }
    )
    return out
