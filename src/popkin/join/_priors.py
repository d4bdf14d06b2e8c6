"""Fitting a joint prior over random effects to samples: Gaussian moments or a flowjax flow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..priors import Gaussian


def fit_gaussian(samples) -> Gaussian:
    """`N(mean, cov)` with the sample moments (the seed's post-hoc Gaussian)."""
    x = jnp.asarray(samples)
    return Gaussian(jnp.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), x.mean(0))


def fit_flow(
    samples,
    *,
    key: jax.Array,
    flow_layers: int = 2,
    nn_width: int = 32,
    nn_depth: int = 1,
    transformer: str = "affine",
    learning_rate: float = 1e-3,
    max_epochs: int = 400,
    max_patience: int = 20,
    batch_size: int = 256,
    val_prop: float = 0.1,
    whiten: str = "full",
    identity_init: bool = True,
    show_progress: bool = False,
):
    """A coupling normalizing flow fitted by maximum likelihood (flowjax `fit_to_data`), with a
    validation split and early stopping. `transformer`: "affine" or "spline" (rational
    quadratic). Returns `(flow, losses)`.

    The samples are whitened first and the affine map is folded back in (so `log_prob` is on
    the original scale): `whiten="full"`, `z = L^-1 (x - m)` with `L L^T` the sample
    covariance, so the flow's standard-normal base is the moment-matched Gaussian and the
    coupling layers only model departures from it; `"diag"`, per-coordinate standardisation
    (the correlations are then left to the coupling layers). `identity_init`: the last layer
    of every coupling conditioner starts at zero, so each coupling starts as the identity and
    training starts from that Gaussian (flowjax's transformers are the identity at zero
    parameters); early stopping on held-out subjects then keeps only the departures that
    generalise.

    `samples`: `(n, d)`, or `(n_subjects, n_draws, d)` posterior draws grouped by subject; then
    the validation split is by subject (a subject's draws are all on one side, so early
    stopping sees overfitting to the training subjects) and `batch_size` counts draws
    (batches hold `batch_size // n_draws` subjects, at least one)."""
    from flowjax.bijections import Affine, RationalQuadraticSpline, TriangularAffine
    from flowjax.distributions import Normal, Transformed
    from flowjax.flows import coupling_flow
    from flowjax.train import fit_to_data

    x = jnp.asarray(samples, float)
    if x.ndim not in (2, 3):
        raise ValueError(f"samples must be (n, d) or (n_subjects, n_draws, d), got {x.shape}")
    if whiten not in ("full", "diag"):
        raise ValueError(f"whiten must be 'full' or 'diag', got {whiten!r}")
    dim = x.shape[-1]
    if dim == 1:
        raise ValueError("a coupling flow needs at least 2 random effects; use prior='gaussian'")
    flat = x.reshape(-1, dim)
    m = flat.mean(0)
    if whiten == "full":
        cov = jnp.cov(flat, rowvar=False) + 1e-12 * jnp.eye(dim)
        chol = jnp.linalg.cholesky(cov)
        z = jax.scipy.linalg.solve_triangular(chol, (x - m)[..., None], lower=True)[..., 0]
        outer = TriangularAffine(m, chol)
    else:
        s = flat.std(0) + 1e-12
        z = (x - m) / s
        outer = Affine(m, s)
    n_val = max(1, int(round(val_prop * z.shape[0])))
    if x.ndim == 3:
        # Batches of whole subjects; never larger than the validation set (flowjax drops
        # truncated batches, an empty validation pass would divide by zero).
        batch_size = max(1, min(batch_size // x.shape[1], n_val, z.shape[0] - n_val))
    else:
        batch_size = max(1, min(batch_size, n_val, z.shape[0] - n_val))
    k_init, k_fit = jax.random.split(key)
    tr = Affine() if transformer == "affine" else RationalQuadraticSpline(knots=8, interval=5.0)
    flow = coupling_flow(
        k_init,
        base_dist=Normal(jnp.zeros(dim)),
        transformer=tr,
        flow_layers=flow_layers,
        nn_width=nn_width,
        nn_depth=nn_depth,
        nn_activation=jax.nn.tanh,
    )
    if identity_init:
        flow = identity_couplings(flow)
    flow, losses = fit_to_data(
        k_fit,
        flow,
        z,
        learning_rate=learning_rate,
        max_epochs=max_epochs,
        max_patience=max_patience,
        batch_size=batch_size,
        val_prop=val_prop,
        show_progress=show_progress,
    )
    dist = Transformed(flow, outer)
    return dist, {k: np.asarray(v) for k, v in losses.items()}


def identity_couplings(flow):
    """`flow` with the last linear layer of every MLP (the coupling conditioners) set to zero:
    the conditioners output zero, which flowjax maps to each transformer's initial (identity)
    parameters, so the flow is its base distribution."""
    import equinox as eqx

    is_mlp = lambda x: isinstance(x, eqx.nn.MLP)

    def last_layers(tree):
        mlps = [x for x in jax.tree.leaves(tree, is_leaf=is_mlp) if is_mlp(x)]
        return [a for m in mlps for a in (m.layers[-1].weight, m.layers[-1].bias)]

    return eqx.tree_at(last_layers, flow, replace_fn=jnp.zeros_like)
