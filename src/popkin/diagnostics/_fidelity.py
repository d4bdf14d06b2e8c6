"""Sample-fidelity metrics: are generated trajectories distributed like real ones?

- `classifier_auc(real, fake, key)`: classifier two-sample test (Lopez-Paz & Oquab 2017). A
  one-hidden-layer MLP (logistic regression with `hidden=0`) is trained with optax (AdamW,
  full batch, class-balanced logistic loss) to tell real from fake rows; the score is the
  k-fold cross-validated ROC AUC, AUC = (R_real - n_r (n_r + 1) / 2) / (n_r n_f) with R_real
  the rank sum of the real rows' held-out scores (Mann-Whitney; ties get average ranks),
  averaged over folds. 0.5: indistinguishable; 1: perfectly separable.
- `mmd(x, y, key)`: squared maximum mean discrepancy with an RBF kernel
  k(a, b) = exp(-|a - b|^2 / (2 h^2)), h the median pairwise distance of the pooled sample
  (median heuristic), unbiased U-statistic
  MMD^2 = mean_{i!=j} k(x_i,x_j) + mean_{i!=j} k(y_i,y_j) - 2 mean_{i,j} k(x_i,y_j),
  and a permutation p-value (1 + #{perm >= observed}) / (1 + n_perm).

Features are arrays (n, d); padded trajectories come with boolean masks (n, d): masked
entries are set to 0 and the mask itself is appended as features, so padding carries no
information beyond where samples exist.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array

__all__ = ["classifier_auc", "mmd", "rank_auc"]


def _features(x, mask) -> np.ndarray:
    x = np.asarray(x, float)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (n, d), got shape {x.shape}")
    if mask is None:
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain NaN/inf: pass a mask for padded entries")
        return x
    m = np.asarray(mask, bool)
    if m.shape != x.shape:
        raise ValueError(f"mask shape {m.shape} differs from the features' {x.shape}")
    if not np.all(np.isfinite(x[m])):
        raise ValueError("unmasked features contain NaN/inf")
    return np.concatenate([np.where(m, x, 0.0), m.astype(float)], axis=1)


def rank_auc(scores_pos, scores_neg) -> float:
    """ROC AUC of scores (positives should score higher) via average ranks (Mann-Whitney)."""
    from scipy.stats import rankdata

    sp, sn = np.asarray(scores_pos, float), np.asarray(scores_neg, float)
    r = rankdata(np.concatenate([sp, sn]))
    n_p, n_n = len(sp), len(sn)
    return float((r[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def _init(key, d: int, hidden: int):
    if hidden == 0:
        return {"w": jnp.zeros((d, 1)), "b": jnp.zeros(1)}
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (d, hidden)) * jnp.sqrt(2.0 / d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 1)) * jnp.sqrt(1.0 / hidden),
        "b2": jnp.zeros(1),
    }


def _logit(p, x):
    if "w" in p:
        return (x @ p["w"] + p["b"])[:, 0]
    return (jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"])[:, 0]


def _train_fold(key, x, y, train, hidden, steps, lr, weight_decay):
    """Scores (logits) of every row after training on rows where `train` is True."""
    w_pos = jnp.sum(train & (y == 1))
    w_neg = jnp.sum(train & (y == 0))
    wt = train * jnp.where(y == 1, 0.5 / jnp.maximum(w_pos, 1), 0.5 / jnp.maximum(w_neg, 1))
    mu = jnp.sum(x * train[:, None], 0) / jnp.sum(train)
    sd = jnp.sqrt(jnp.sum(((x - mu) ** 2) * train[:, None], 0) / jnp.sum(train)) + 1e-6
    xs = (x - mu) / sd
    opt = optax.adamw(lr, weight_decay=weight_decay)
    p0 = _init(key, x.shape[1], hidden)

    def loss(p):
        z = _logit(p, xs)
        return jnp.sum(wt * optax.sigmoid_binary_cross_entropy(z, y))

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(step, (p0, opt.init(p0)), None, length=steps)
    return _logit(p, xs)


_train_folds = jax.jit(
    jax.vmap(_train_fold, in_axes=(0, None, None, 0, None, None, None, None)),
    static_argnums=(4, 5),
)


def classifier_auc(real, fake, key: Array, *, real_mask=None, fake_mask=None, real_groups=None,
                   fake_groups=None, folds: int = 5, hidden: int = 32, steps: int = 300,
                   lr: float = 1e-2, weight_decay: float = 1e-3) -> float:  # fmt: skip
    """Cross-validated ROC AUC of a classifier telling `real` rows from `fake` rows.

    `real` (n_r, d), `fake` (n_f, d), optional boolean masks of the same shapes (False =
    padding). Stratified `folds`-fold split drawn with `key`; the AUC is the mean over folds
    of the held-out rank AUC. `real_groups` / `fake_groups` (one label per row) keep rows of a
    group in the same fold: pass them when real and fake rows come in pairs (a generated row
    made for an observed one's design), otherwise a held-out row's partner sits in the
    training set with the other label and the held-out AUC drops below 0.5. Under identical distributions its expectation is 0.5 (a
    classifier cannot beat chance on held-out rows), its Monte-Carlo SD about
    sqrt((n_r + n_f + 1) / (12 n_r n_f)) per pooled fold set.
    """
    xr, xf = _features(real, real_mask), _features(fake, fake_mask)
    if xr.shape[1] != xf.shape[1]:
        raise ValueError(f"real has {xr.shape[1]} features, fake {xf.shape[1]}")
    n_r, n_f = len(xr), len(xf)
    if min(n_r, n_f) < folds:
        raise ValueError(f"need at least {folds} rows per class, got {n_r} real, {n_f} fake")
    x = jnp.asarray(np.concatenate([xr, xf]))
    y = jnp.asarray(np.r_[np.ones(n_r), np.zeros(n_f)])
    kf, kt = jax.random.split(key)
    kr, kk = jax.random.split(kf)
    fold = np.empty(n_r + n_f, int)
    if (real_groups is None) != (fake_groups is None):
        raise ValueError("give both real_groups and fake_groups, or neither")
    if real_groups is None:  # stratified: each class spread evenly over folds
        fold[:n_r] = np.asarray(jax.random.permutation(kr, n_r)) % folds
        fold[n_r:] = np.asarray(jax.random.permutation(kk, n_f)) % folds
    else:
        g = np.r_[np.asarray(real_groups), np.asarray(fake_groups)]
        if len(g) != n_r + n_f:
            raise ValueError("one group label per row of real and of fake is needed")
        uniq, inv = np.unique(g, return_inverse=True)
        if len(uniq) < folds:
            raise ValueError(f"need at least {folds} groups, got {len(uniq)}")
        fold = (np.asarray(jax.random.permutation(kr, len(uniq))) % folds)[inv]
        for k in range(folds):
            if not ((fold == k)[:n_r].any() and (fold == k)[n_r:].any()):
                raise ValueError(f"fold {k} lacks a class: groups must hold real and fake rows")
    train = jnp.asarray(fold[None, :] != np.arange(folds)[:, None])
    logits = np.asarray(
        _train_folds(jax.random.split(kt, folds), x, y, train, hidden, steps, lr, weight_decay)
    )
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("classifier produced non-finite scores")
    yy = np.asarray(y)
    aucs = [
        rank_auc(logits[k][(fold == k) & (yy == 1)], logits[k][(fold == k) & (yy == 0)])
        for k in range(folds)
    ]
    return float(np.mean(aucs))


@jax.jit
def _sqdist(a, b):
    return jnp.maximum(jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2.0 * a @ b.T, 0.0)


def _mmd2_from_kernel(k, is_x):
    """Unbiased MMD^2 from the pooled kernel matrix and a boolean 'belongs to x' vector."""
    fx, fy = is_x.astype(k.dtype), (~is_x).astype(k.dtype)
    n, m = jnp.sum(fx), jnp.sum(fy)
    kd = jnp.diag(k)
    kxx = (fx @ k @ fx - jnp.sum(kd * fx)) / (n * (n - 1))
    kyy = (fy @ k @ fy - jnp.sum(kd * fy)) / (m * (m - 1))
    kxy = (fx @ k @ fy) / (n * m)
    return kxx + kyy - 2.0 * kxy


@jax.jit
def _mmd_perm(k, is_x, groups, keys):
    """Observed MMD^2 and MMD^2 under label permutations within groups (one group: all)."""
    obs = _mmd2_from_kernel(k, is_x)
    base = jnp.argsort(groups, stable=True)  # rows by group, labels in that order
    labels = is_x[base]

    def perm(kk):
        u = jax.random.uniform(kk, is_x.shape)
        order = jnp.lexsort((u, groups))  # rows by group, random order inside each group
        return _mmd2_from_kernel(k, jnp.zeros_like(is_x).at[order].set(labels))

    return obs, jax.vmap(perm)(keys)


def mmd(x, y, key: Array | None = None, *, x_mask=None, y_mask=None, x_groups=None,
        y_groups=None, n_perm: int = 500, bandwidth: float | None = None) -> tuple[float, float]:  # fmt: skip
    """(unbiased squared MMD, permutation p-value) between samples x (n, d) and y (m, d).

    RBF kernel with bandwidth h = the median pairwise Euclidean distance of the pooled
    sample unless given. Features are standardised by the pooled mean and SD first (so no
    unit dominates). `key` None gives p = NaN (no permutations). With `x_groups` / `y_groups`
    (paired designs, as in `classifier_auc`) labels are permuted only within groups, the
    null of exchangeability inside each pair; plain permutations would break the pairing
    and make the test conservative.
    """
    a, b = _features(x, x_mask), _features(y, y_mask)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x has {a.shape[1]} features, y {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError("mmd needs at least 2 rows in each sample")
    z = np.concatenate([a, b])
    z = (z - z.mean(0)) / (z.std(0) + 1e-12)
    z = jnp.asarray(z)
    d2 = _sqdist(z, z)
    if bandwidth is None:
        iu = np.triu_indices(len(z), 1)
        h = float(np.sqrt(np.median(np.asarray(d2)[iu])))
        h = h if h > 0 else 1.0
    else:
        h = float(bandwidth)
    k = jnp.exp(-d2 / (2.0 * h * h))
    is_x = jnp.asarray(np.r_[np.ones(len(a), bool), np.zeros(len(b), bool)])
    if key is None:
        return float(_mmd2_from_kernel(k, is_x)), float("nan")
    if (x_groups is None) != (y_groups is None):
        raise ValueError("give both x_groups and y_groups, or neither")
    if x_groups is None:
        g = np.zeros(len(z), np.int64)
    else:
        g = np.r_[np.asarray(x_groups), np.asarray(y_groups)]
        if len(g) != len(z):
            raise ValueError("one group label per row of x and of y is needed")
        g = np.unique(g, return_inverse=True)[1]
    obs, perms = _mmd_perm(k, is_x, jnp.asarray(g), jax.random.split(key, n_perm))
    obs, perms = float(obs), np.asarray(perms)
    return obs, float((1 + np.sum(perms >= obs)) / (1 + n_perm))
