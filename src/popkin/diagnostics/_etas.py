r"""Pair plots of the random effects with the fitted prior's density contours.

Contours enclose probability `levels` of the prior's 2-D marginal: for a Gaussian prior the
ellipses $\{x: (x-\mu)^T \Sigma_{jk}^{-1} (x-\mu) = \chi^2_2(p)\}$; for any other prior (flows)
the highest-density regions of a Gaussian KDE of `n_samples` prior draws. The EBEs are
shrunk towards the mean, so they look narrower than the prior when shrinkage is high.
"""

from __future__ import annotations

import numpy as np

from ._plots import _plt, _save
from ._sim import resolve_key


def _source(obj):
    """(EBEs, prior, names, independent prior or None) of a Fit or a JointModel."""
    from ..priors import Gaussian

    if hasattr(obj, "fits"):  # JointModel
        from ..join._joint import posterior_samples

        _, modes, _ = posterior_samples(obj.fits, 1, key=None, target="modes")
        return np.asarray(modes), obj.prior, list(obj.eta_names), obj.independent
    prior = obj.prior if obj.prior is not None else Gaussian(obj.params.omega)
    return np.asarray(obj.eta), prior, list(obj.model.eta_names), None


def _is_gaussian(p) -> bool:
    return hasattr(p, "cov") and hasattr(p, "mean")


def _contour(a, prior, samples, i, j, levels, color, ls):
    from scipy import stats

    if _is_gaussian(prior):
        mu = np.asarray(prior.mean)[[i, j]]
        S = np.asarray(prior.cov)[np.ix_([i, j], [i, j])]
        w, V = np.linalg.eigh(S)
        th = np.linspace(0, 2 * np.pi, 200)
        for lv in levels:
            r = np.sqrt(stats.chi2.ppf(lv, 2))
            pts = mu[:, None] + V @ (np.sqrt(np.clip(w, 0, None))[:, None] * r *
                                     np.stack([np.cos(th), np.sin(th)]))  # fmt: skip
            a.plot(pts[0], pts[1], color=color, ls=ls, lw=1.2)
        return
    xy = samples[:, [i, j]].T
    kde = stats.gaussian_kde(xy)
    dens = kde(xy)
    lo, hi = xy.min(axis=1), xy.max(axis=1)
    pad = 0.1 * (hi - lo)
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 60),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], 60))  # fmt: skip
    gz = kde(np.stack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
    thr = sorted(np.quantile(dens, 1 - np.asarray(levels)))
    a.contour(gx, gy, gz, levels=thr, colors=color, linestyles=ls, linewidths=1.2)


def eta_pairs(obj, path=None, *, levels=(0.5, 0.9), n_samples: int = 4000, key=None,
              seed: int = 0, title: str = ""):  # fmt: skip
    """Pair plot of the EBEs (points) with the prior's `levels` probability contours.

    `obj`: a `Fit` (prior: its Omega, or the fixed prior it was fitted with) or a `JointModel`
    (the joined prior, solid, and the independent product of the fits' priors, dashed grey).
    Diagonal: EBE histogram and the prior's marginal density. Random effects are on the
    model's eta scale (dimensionless for log-normal parameters). Returns the Figure.
    """
    import jax
    from scipy import stats

    plt = _plt()
    etas, prior, names, indep = _source(obj)
    k1, k2 = jax.random.split(resolve_key(key, seed))
    xs = np.asarray(prior.sample(k1, (n_samples,)))
    xi = None if indep is None else np.asarray(indep.sample(k2, (n_samples,)))
    d = len(names)
    if d == 0:
        raise ValueError("the model has no random effects to plot")
    s = 2.5 if d > 2 else 3.2
    fig, axes = plt.subplots(d, d, figsize=(s * d + 0.8, s * d + 0.6), squeeze=False)
    pname = "joined prior" if indep is not None else "prior"
    for r in range(d):
        for c in range(d):
            a = axes[r, c]
            if r < c:
                a.axis("off")
                continue
            if r == c:
                a.hist(etas[:, r], bins=min(30, max(8, len(etas) // 4)), density=True,
                       color="C0", alpha=0.45)  # fmt: skip
                grid = np.linspace(*np.quantile(np.r_[xs[:, r], etas[:, r]], [0.001, 0.999]), 200)
                if _is_gaussian(prior):
                    m, v = float(np.asarray(prior.mean)[r]), float(np.asarray(prior.cov)[r, r])
                    dens = stats.norm.pdf(grid, m, np.sqrt(v))
                else:
                    dens = stats.gaussian_kde(xs[:, r])(grid)
                a.plot(grid, dens, color="C3", lw=1.5)
                if xi is not None:
                    a.plot(grid, stats.gaussian_kde(xi[:, r])(grid), color="0.4", ls="--", lw=1)
                a.set_yticks([])
            else:
                a.scatter(etas[:, c], etas[:, r], s=8, color="C0", alpha=0.7)
                _contour(a, prior, xs, c, r, levels, "C3", "-")
                if xi is not None:
                    _contour(a, indep, xi, c, r, levels, "0.4", "--")
            if r == d - 1:
                a.set_xlabel(f"{names[c]} (-)", fontsize=9)
            else:
                a.tick_params(labelbottom=False)
            if c == 0 and r > 0:
                a.set_ylabel(f"{names[r]} (-)", fontsize=9)
            if r == 0 and c == 0:
                a.set_ylabel("density", fontsize=9)
    from matplotlib.lines import Line2D

    lv = ", ".join(f"{100 * v:.0f}%" for v in levels)
    handles = [
        Line2D([], [], marker="o", ls="", color="C0", label="EBEs (modes)"),
        Line2D([], [], color="C3", label=f"{pname}: {lv} contours / marginal density"),
    ]
    if xi is not None:
        handles.append(Line2D([], [], color="0.4", ls="--", label="independent prior"))
    fig.legend(handles=handles, loc="upper right", fontsize=9, frameon=True,
               bbox_to_anchor=(0.98, 0.97))  # fmt: skip
    default = (f"{obj.kind} joint prior over {d} random effects" if indep is not None
               else f"{obj.model.name}: EBEs and the fitted prior")  # fmt: skip
    fig.suptitle(title or default, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, path)
