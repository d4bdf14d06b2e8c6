r"""`popkin.join`: a joint prior over the random effects of independently fitted models.

Supervision is the per-subject Laplace posteriors the fits already hold,
$p(\eta_{k,i} \mid y_{k,i}) \approx N(\hat\eta_{k,i}, \Sigma_{k,i})$. The target is the
expected posterior (seed 000), $\bar p(\eta) = \frac1N \sum_i \prod_k p(\eta_{k,i}\mid y_{k,i})$,
approximated by pooling `n_samples` draws from each subject's product of posteriors; the joint
prior (Gaussian moments or a flow) is fitted to that pool. `target="modes"` fits the EBEs alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..data._population import Population
from ..nlme._inner import find_mode
from ..nlme._objective import LOG_2PI, SubjectProblem
from ..nlme._result import Fit
from ..priors import Gaussian, Independent
from ..simulate import predictor_for
from ._priors import fit_flow, fit_gaussian
from ._problem import JointProblem


def _align(fits: list[Fit]):
    """Subject IDs present in every fit, and each fit's row index for them."""
    common = [i for i in fits[0].population.ids if all(i in f.population.ids for f in fits[1:])]
    if not common:
        raise ValueError("the fits share no subject IDs; joining needs the same subjects")
    idx = [np.array([f.population.ids.index(i) for i in common]) for f in fits]
    return common, idx


def posterior_samples(fits: list[Fit], n_samples: int, *, key, target: str = "posterior"):
    """Pooled draws from each common subject's product of per-fit Laplace posteriors.

    Returns `(samples (N * n_samples, d), modes (N, d), covs (N, d, d))`; with
    `target="modes"` the samples are the modes themselves.
    """
    _, idx = _align(fits)
    modes = np.concatenate([f.eta[i] for f, i in zip(fits, idx, strict=True)], axis=1)
    covs = [f.eta_cov[i] for f, i in zip(fits, idx, strict=True)]
    cov = np.stack([jax.scipy.linalg.block_diag(*c) for c in zip(*covs, strict=True)])
    if target == "modes":
        return jnp.asarray(modes), modes, cov
    if target != "posterior":
        raise ValueError(f"target must be 'posterior' or 'modes', got {target!r}")
    L = np.linalg.cholesky(cov)
    z = jax.random.normal(key, (modes.shape[0], n_samples, modes.shape[1]))
    draws = modes[:, None, :] + jnp.einsum("nij,nsj->nsi", L, z)
    return draws.reshape(-1, modes.shape[1]), modes, cov


def independent_prior(fits: list[Fit]) -> Independent:
    """The product of each fit's own prior (assumption A4: no cross-endpoint coupling)."""
    parts = [f.prior if f.prior is not None else Gaussian(f.params.omega) for f in fits]
    return Independent(parts, [len(f.model.eta_names) for f in fits])


@dataclass
class JointModel:
    """Independently fitted endpoint models coupled through a joint prior over their random
    effects. `prior` has `log_prob` / `sample` over the concatenated etas (`eta_names`)."""

    fits: list[Fit]
    prior: object
    kind: str
    losses: dict = field(default_factory=dict)

    @property
    def eta_names(self) -> tuple[str, ...]:
        return tuple(f"{k}:{n}" for k, f in enumerate(self.fits) for n in f.model.eta_names)

    @property
    def independent(self) -> Independent:
        return independent_prior(self.fits)

    def _problem(self, populations):
        pops = _as_populations(self.fits, populations)
        problems = tuple(
            SubjectProblem(predictor_for(f.model, p), "laplace")
            for f, p in zip(self.fits, pops, strict=True)
        )
        return JointProblem(problems), pops

    def log_likelihood(self, populations, prior=None, *, n_is: int = 1000, key=None,
                       df: float = 5.0) -> pd.DataFrame:  # fmt: skip
        """Per subject, the marginal log-likelihood of all its endpoints' data under `prior`
        (default: this joint prior), by Laplace and by importance sampling (`n_is` draws from a
        Student-t with `df` degrees of freedom around the mode with the Laplace covariance).

        `populations`: one per fit (same subject IDs, same order), e.g. held-out test data.
        Returns columns ID, ll_laplace, ll_is, ess, converged, laplace_defined. Where the
        Hessian at the mode is not positive definite (a saddle of a learned prior) the mode
        search is restarted down the negative-curvature direction; if no PD mode is found,
        ll_laplace is NaN, `laplace_defined` False (with a warning) and the proposal uses the
        Gauss-Newton curvature. Log-likelihoods are full (including the N log 2 pi constant).
        """
        prior = self.prior if prior is None else prior
        key = jax.random.key(0) if key is None else key
        problem, pops = self._problem(populations)
        params = tuple(f.params for f in self.fits)
        subj = tuple(p.subjects for p in pops)
        out = _evaluate(problem, params, prior, subj, key, n_is, df)
        ll_lap, ll_is, ess, conv, pd_ok = (np.asarray(a) for a in out)
        ids = list(pops[0].ids)
        if not pd_ok.all():
            bad = [ids[i] for i in np.flatnonzero(~pd_ok)]
            warnings.warn(
                f"Laplace approximation undefined (Hessian of the negative log joint not positive "
                f"definite at the best mode found) for {len(bad)} subject(s), ID(s) {bad[:20]}: "
                "ll_laplace is NaN there (column laplace_defined); ll_is uses a Gauss-Newton "
                "proposal.",
                RuntimeWarning,
                stacklevel=2,
            )
        return pd.DataFrame(
            {
                "ID": ids,
                "ll_laplace": ll_lap,
                "ll_is": ll_is,
                "ess": ess,
                "converged": conv,
                "laplace_defined": pd_ok,
            }  # fmt: skip
        )

    def posterior(self, populations, prior=None):
        """Per subject, the mode and Laplace covariance of the joint posterior under `prior`
        (where the exact Hessian is not PD: the inverse of the floored Gauss-Newton curvature,
        see `log_likelihood`)."""
        prior = self.prior if prior is None else prior
        problem, pops = self._problem(populations)
        params = tuple(f.params for f in self.fits)
        subj = tuple(p.subjects for p in pops)
        eta, cov, _ = _posterior(problem, params, prior, subj)
        return np.asarray(eta), np.asarray(cov), pops

    def predict(self, populations, prior=None, *, n_samples: int = 500, key=None,
                level: float = 0.9) -> list[pd.DataFrame]:  # fmt: skip
        """Conditional predictions of every endpoint at every record (observed or not).

        The posterior under `prior` given the observed records (MDV=0) is approximated by
        Laplace; `n_samples` draws of eta give each record's prediction median and central
        `level` interval, and the prediction at the mode (`PRED_MODE`). Add EVID 2 / MDV 1 rows
        to predict at new times. Returns one table per fit.
        """
        key = jax.random.key(0) if key is None else key
        modes, covs, pops = self.posterior(populations, prior)
        covs = 0.5 * (covs + np.swapaxes(covs, 1, 2))
        w, V = np.linalg.eigh(covs)
        L = V * np.sqrt(np.clip(w, 0, None))[:, None, :]
        z = jax.random.normal(key, (modes.shape[0], n_samples, modes.shape[1]))
        draws = modes[:, None, :] + jnp.einsum("nij,nsj->nsi", L, z)
        a = (1 - level) / 2
        tables = []
        i0 = 0
        for f, pop in zip(self.fits, pops, strict=True):
            n = len(f.model.eta_names)
            pred = predictor_for(f.model, pop)

            def one(e, s, pred=pred, f=f):
                return pred.distributions(f.params.theta, f.params.sigma, e, s)[3]

            sims = jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None))))(
                draws[:, :, i0 : i0 + n], pop.subjects
            )
            at_mode = jax.jit(jax.vmap(one))(jnp.asarray(modes[:, i0 : i0 + n]), pop.subjects)
            sims = np.asarray(sims)
            rec = pop.subjects.records
            mask = np.asarray(rec.rec)
            rows = np.asarray(rec.row)[mask]
            tab = pop.table.iloc[rows].reset_index(drop=True)
            tables.append(
                pd.DataFrame(
                    {
                        "ID": tab["ID"].to_numpy(),
                        "TIME": tab["TIME"].to_numpy(),
                        "DV": tab["DV"].to_numpy(),
                        "MDV": tab["MDV"].to_numpy(),
                        "PRED_MODE": np.asarray(at_mode)[mask],
                        "MEDIAN": np.median(sims, axis=1)[mask],
                        "LOWER": np.quantile(sims, a, axis=1)[mask],
                        "UPPER": np.quantile(sims, 1 - a, axis=1)[mask],
                    }
                )
            )
            i0 += n
        return tables


def _as_populations(fits, populations) -> list[Population]:
    from ..data._reader import read_nonmem

    if populations is None:
        populations = [f.population for f in fits]
    pops = [p if isinstance(p, Population) else read_nonmem(p) for p in populations]
    if len(pops) != len(fits):
        raise ValueError(f"need one population per fit ({len(fits)}), got {len(pops)}")
    ids = pops[0].ids
    for k, p in enumerate(pops[1:], start=1):
        if p.ids != ids:
            raise ValueError(
                f"population {k} has different subject IDs (or order) than population 0; "
                "give the endpoints' data for the same subjects in the same order"
            )
    return pops


#: Relative eigenvalue floor of the proposal / posterior curvature (see `_curvature`).
EIG_FLOOR = 1e-3


@eqx.filter_jit
def _modes_static(problem, params, prior, subj, eta0):
    return jax.vmap(lambda e, s: find_mode(problem, params, prior, e, s), in_axes=(0, 0))(
        eta0, subj
    )


def _is_pd(H) -> np.ndarray:
    H = np.asarray(H)
    return np.all(np.linalg.eigvalsh(0.5 * (H + np.swapaxes(H, -1, -2))) > 0, axis=-1)


def _modes(problem, params, prior, subj):
    r"""Per subject the mode from zero and whether its exact Hessian is PD. Where it is not
    (a saddle or crease of a learned prior), the mode search restarts from one step
    $1/\sqrt{|\lambda_{min}|}$ down each side of the most negative eigendirection and keeps
    the lowest $f$ among the results with a PD Hessian (the first result if none has). The
    restarts reuse the same compiled search (only the start values change) and run only when
    a subject needs them. Returns `(ModeResult as numpy, pd)`."""
    n = sum(problem.sizes)
    S = subj[0].records.time.shape[0]
    r0 = jax.tree.map(np.asarray, _modes_static(problem, params, prior, subj, jnp.zeros((S, n))))
    pd_ok = _is_pd(r0.hessian)
    if pd_ok.all():
        return r0, pd_ok
    w, V = np.linalg.eigh(0.5 * (r0.hessian + np.swapaxes(r0.hessian, -1, -2)))
    step = np.where(pd_ok, 0.0, 1.0 / np.sqrt(np.maximum(np.abs(w[:, 0]), 1e-8)))
    cands, scores = [r0], [np.where(pd_ok & np.isfinite(r0.f), r0.f, np.inf)]
    for sign in (1.0, -1.0):
        start = r0.eta + sign * step[:, None] * V[:, :, 0]
        r = jax.tree.map(np.asarray, _modes_static(problem, params, prior, subj, start))
        cands.append(r)
        scores.append(np.where(_is_pd(r.hessian) & np.isfinite(r.f), r.f, np.inf))
    scores = np.stack(scores)
    best = np.where(np.isfinite(scores).any(0), np.argmin(scores, axis=0), 0)
    best = np.where(pd_ok, 0, best)
    res = jax.tree.map(lambda *xs: np.stack(xs)[best, np.arange(S)], *cands)
    return res, _is_pd(res.hessian)


def _curvature(problem, params, prior, eta, H, pd_ok, s, all_pd=False):
    r"""The curvature used for proposals and posterior covariances: the exact Hessian where it
    is PD, else the Gauss-Newton one; eigenvalues reflected ($|\lambda|$) and floored at
    `EIG_FLOOR` x the largest. Returns `(w, V)` with the matrix $V \mathrm{diag}(w) V^T$.
    `all_pd` (static): every subject's Hessian is PD, so the Gauss-Newton pass is not traced."""
    if all_pd:
        Hc = H
    else:
        _, Hgn = problem.grad_and_gn(params, prior, eta, s)
        Hc = jnp.where(pd_ok, H, Hgn)
    w, V = jnp.linalg.eigh(0.5 * (Hc + Hc.T))
    aw = jnp.abs(w)
    return jnp.maximum(aw, EIG_FLOOR * jnp.max(aw)), V


@eqx.filter_jit
def _posterior_cov_static(problem, params, prior, subj, eta, H, pd_ok):
    def one(e, h, ok, s):
        w, V = _curvature(problem, params, prior, e, h, ok, s)
        return (V / w[None, :]) @ V.T

    return jax.vmap(one)(eta, H, pd_ok, subj)


def _posterior(problem, params, prior, subj):
    """Modes and covariances (Laplace where PD, else the floored GN curvature's inverse)."""
    res, pd_ok = _modes(problem, params, prior, subj)
    if pd_ok.all():
        return res.eta, np.asarray(res.hess_inv), pd_ok
    cov = _posterior_cov_static(problem, params, prior, subj, jnp.asarray(res.eta),
                                jnp.asarray(res.hessian), jnp.asarray(pd_ok))  # fmt: skip
    return res.eta, np.asarray(cov), pd_ok


@eqx.filter_jit
def _evaluate_static(problem, params, prior, subj, key, n_is, df, eta, H, f, pd_ok, all_pd):
    n = sum(problem.sizes)
    S = subj[0].records.time.shape[0]
    keys = jax.random.split(key, S)

    def one(s, k, mode, Hm, fm, ok):
        nobs = problem.n_obs(s)
        const = -0.5 * nobs * LOG_2PI
        fe = lambda e: problem.f(params, prior, e, s)
        w = jnp.linalg.eigvalsh(0.5 * (Hm + Hm.T))
        logdet = jnp.sum(jnp.log(jnp.where(w > 0, w, 1.0)))
        ll_lap = -fm + 0.5 * n * LOG_2PI - 0.5 * logdet + const
        ll_lap = jnp.where(ok, ll_lap, jnp.nan)
        # Proposal: multivariate t(df) around the mode with scale = inverse curvature.
        wf, V = _curvature(problem, params, prior, mode, Hm, ok, s, all_pd)
        Lc = V / jnp.sqrt(wf)[None, :]
        kz, kg = jax.random.split(k)
        z = jax.random.normal(kz, (n_is, n))
        g = jax.random.gamma(kg, df / 2, (n_is,)) / (df / 2)
        u = z / jnp.sqrt(g)[:, None]
        draws = mode + u @ Lc.T
        logdet_scale = -0.5 * jnp.sum(jnp.log(wf))
        q = (
            jax.scipy.special.gammaln((df + n) / 2)
            - jax.scipy.special.gammaln(df / 2)
            - 0.5 * n * jnp.log(df * jnp.pi)
            - logdet_scale
            - 0.5 * (df + n) * jnp.log1p(jnp.sum(u**2, axis=1) / df)
        )
        logw = -jax.vmap(fe)(draws) + const - q
        logw = jnp.where(jnp.isfinite(logw), logw, -jnp.inf)
        ll_is = jax.scipy.special.logsumexp(logw) - jnp.log(n_is)
        wn = jnp.exp(logw - jnp.max(logw))
        ess = jnp.sum(wn) ** 2 / jnp.sum(wn**2)
        return ll_lap, ll_is, ess

    return jax.vmap(one)(subj, keys, eta, H, f, pd_ok)


def _evaluate(problem, params, prior, subj, key, n_is, df):
    res, pd_ok = _modes(problem, params, prior, subj)
    ll_lap, ll_is, ess = _evaluate_static(
        problem, params, prior, subj, key, int(n_is), float(df),
        jnp.asarray(res.eta), jnp.asarray(res.hessian), jnp.asarray(res.f), jnp.asarray(pd_ok),
        bool(np.all(pd_ok)),  # static: the common all-PD case traces no Gauss-Newton pass
    )  # fmt: skip
    return ll_lap, ll_is, ess, res.converged, pd_ok


def join(
    fits: list[Fit],
    prior="gaussian",
    *,
    key=None,
    n_samples: int = 50,
    target: str = "posterior",
    **flow_options,
) -> JointModel:
    """Couple independently fitted endpoint models through a joint prior over their etas.

    **Arguments:**
    - `fits`: `Fit`s of the endpoint models on the same subjects (matched by ID).
    - `prior`: "gaussian" (moments of the pooled posterior draws), "flow" (a flowjax coupling
      flow; options such as `flow_layers`, `nn_width`, `transformer="spline"` pass through), or
      any prior object with `log_prob`/`sample` to plug in as is.
    - `n_samples`: draws per subject from its product of Laplace posteriors.
    - `target`: "posterior" (expected posterior, default) or "modes" (EBEs only).

    **Returns:** a `JointModel`; its structural models and fixed effects are the fits', untouched.
    """
    if len(fits) < 1:
        raise ValueError("join needs at least one fit")
    key = jax.random.key(0) if key is None else key
    k_s, k_f = jax.random.split(key)
    if not isinstance(prior, str):
        return JointModel(list(fits), prior, "custom")
    samples, modes, _ = posterior_samples(fits, n_samples, key=k_s, target=target)
    if prior == "gaussian":
        return JointModel(list(fits), fit_gaussian(samples), "gaussian")
    if prior == "flow":
        # Grouped by subject: the flow's validation split keeps each subject's draws together.
        grouped = jnp.reshape(samples, (modes.shape[0], -1, modes.shape[1]))
        dist, losses = fit_flow(grouped, key=k_f, **flow_options)
        return JointModel(list(fits), dist, "flow", losses)
    raise ValueError(f"prior must be 'gaussian', 'flow' or a prior object, got {prior!r}")


# -- save / load ---------------------------------------------------------------------------------
# One JSON file: the fits (as `Fit.save` writes them), the prior (Gaussian moments exactly, a
# `fit_flow` flow as its hyper-parameters plus its leaves serialised by equinox), the losses.

JOINT_FORMAT_VERSION = 1


def _prior_doc(prior) -> dict:
    import base64
    import io

    if isinstance(prior, Gaussian):
        return {"type": "gaussian", "mean": np.asarray(prior.mean).tolist(),
                "cov": np.asarray(prior.cov).tolist()}  # fmt: skip
    if isinstance(prior, Independent):
        return {"type": "independent", "sizes": list(prior.sizes),
                "parts": [_prior_doc(p) for p in prior.parts]}  # fmt: skip
    config = _flow_config(prior)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, prior)
    return {"type": "flow", "config": config, "leaves": base64.b64encode(buf.getvalue()).decode()}


def _flow_config(dist) -> dict:
    """Hyper-parameters of a `fit_flow` flow, read off its structure (to rebuild a skeleton)."""
    from flowjax.bijections import TriangularAffine

    try:
        inner = dist.base_dist
        coupling = inner.bijection.bijection.bijection.bijections[0]
        mlp = coupling.conditioner
        dim = int(coupling.dim)
        free = dim - int(coupling.untransformed_dim)
        return {
            "dim": dim,
            "whiten": "full" if isinstance(dist.bijection, TriangularAffine) else "diag",
            "flow_layers": int(mlp.layers[0].weight.shape[0]),
            "nn_width": int(mlp.width_size),
            "nn_depth": int(mlp.depth),
            "transformer": "affine" if int(mlp.out_size) == 2 * free else "spline",
        }
    except (AttributeError, IndexError, TypeError):
        raise ValueError(
            f"cannot save a prior of type {type(dist).__name__}: only Gaussian, Independent and "
            "flows made by popkin.join(..., prior='flow') can be saved"
        ) from None


def _prior_from_doc(doc: dict):
    import base64
    import io

    t = doc.get("type")
    if t == "gaussian":
        return Gaussian(np.asarray(doc["cov"], float), np.asarray(doc["mean"], float))
    if t == "independent":
        return Independent([_prior_from_doc(p) for p in doc["parts"]], doc["sizes"])
    if t == "flow":
        from flowjax.bijections import Affine, RationalQuadraticSpline, TriangularAffine
        from flowjax.distributions import Normal, Transformed
        from flowjax.flows import coupling_flow

        c = doc["config"]
        dim = c["dim"]
        tr = (
            Affine()
            if c["transformer"] == "affine"
            else RationalQuadraticSpline(knots=8, interval=5.0)
        )
        flow = coupling_flow(jax.random.key(0), base_dist=Normal(jnp.zeros(dim)), transformer=tr,
                             flow_layers=c["flow_layers"], nn_width=c["nn_width"],
                             nn_depth=c["nn_depth"], nn_activation=jax.nn.tanh)  # fmt: skip
        # Files written before `whiten` existed hold the per-coordinate standardisation.
        if c.get("whiten", "diag") == "full":
            outer = TriangularAffine(jnp.zeros(dim), jnp.eye(dim))
        else:
            outer = Affine(jnp.zeros(dim), jnp.ones(dim))
        skeleton = Transformed(flow, outer)
        return eqx.tree_deserialise_leaves(io.BytesIO(base64.b64decode(doc["leaves"])), skeleton)
    raise ValueError(f"unknown prior type {t!r}")


def save_joint(joint: JointModel, path):
    """Write a `JointModel` to one JSON file (fits, prior, losses); reload with `load_joint`."""
    import json
    import tempfile
    from pathlib import Path

    path = Path(path)
    fits = []
    with tempfile.TemporaryDirectory() as d:
        for k, f in enumerate(joint.fits):
            fits.append(json.loads(f.save(Path(d) / f"fit{k}.json").read_text()))
    doc = {
        "format": "popkin-joint",
        "version": JOINT_FORMAT_VERSION,
        "kind": joint.kind,
        "prior": _prior_doc(joint.prior),
        "losses": {k: np.asarray(v).tolist() for k, v in (joint.losses or {}).items()},
        "fits": fits,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)  # atomic: no partial file on interruption
    return path


def load_joint(path, models=None) -> JointModel:
    """Load a `JointModel` written by `save_joint`. `models`: one model per fit (or None
    entries) for fits whose model class cannot be imported (models defined in scripts)."""
    import json
    import tempfile
    from pathlib import Path

    from ..nlme._result import load_fit

    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable popkin joint-model file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != "popkin-joint":
        raise ValueError(
            f"{path}: not a popkin joint-model file (missing 'format': 'popkin-joint')"
        )
    missing = [k for k in ("kind", "prior", "fits") if k not in doc]
    if missing:
        raise ValueError(f"{path}: joint-model file is truncated or corrupted (missing {missing})")
    models = list(models) if models is not None else [None] * len(doc["fits"])
    if len(models) != len(doc["fits"]):
        raise ValueError(f"{path}: holds {len(doc['fits'])} fits but {len(models)} models given")
    fits = []
    with tempfile.TemporaryDirectory() as d:
        for k, (fd, m) in enumerate(zip(doc["fits"], models, strict=True)):
            p = Path(d) / f"fit{k}.json"
            p.write_text(json.dumps(fd))
            try:
                fits.append(load_fit(p, model=m))
            except ValueError as e:
                raise ValueError(f"{path}: fit {k}: {str(e).split(': ', 1)[-1]}") from None
    try:
        prior = _prior_from_doc(doc["prior"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot rebuild the joint prior ({e})") from None
    losses = {k: np.asarray(v) for k, v in doc.get("losses", {}).items()}
    return JointModel(fits, prior, doc["kind"], losses)


JointModel.save = save_joint  # `joint.save(path)`, next to `Fit.save`
