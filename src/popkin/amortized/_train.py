"""Objective and training loop of the in-context model (pre-training on the synthetic prior).

Objective per study (a neural-process / hierarchical ELBO, summed over the two decoders):
one individual t is the *target*; the others are the context, from which q(z_s | context).
Every context individual j contributes

    E_q(z_j | y_j, z_s)[log p(y_j | z_j, z_s)] - KL(q(z_j | y_j, z_s) || p(z_j | z_s)),

p(z_j | z_s) being the same head applied to j's dose tokens only, and the target contributes

    E_q(z_t | y_t, z_s)[log p(y_t | z_t, z_s)] - KL(q(z_t | y_t, z_s) || q(z_t | y_t,early, z_s)),

with y_t,early its first k in {0..5} samples; the study code adds -KL(q(z_s) || N(0, I)).
Concentrations are Gaussian on the log scale (normalised units) and BLQ samples contribute
log Phi((log LLOQ - mu) / sigma). The loss is the negative sum divided by the number of
samples in the study, averaged over the batch.

Training: AdamW (optax) with warm-up + cosine decay, global-norm clipping; every batch is drawn
fresh from the prior with key fold_in(data_key, step), so a run resumed from a checkpoint (model,
optimiser state, step) continues bit for bit. Validation on a fixed held-out synthetic set.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import log_ndtr

from popkin.amortized._model import InContextPK, ModelConfig
from popkin.amortized._prior import PriorConfig, Studies, sample_studies
from popkin.amortized._tokens import normalise, study_scales

F32 = jnp.float32
N_EARLY_EVAL = 4


@dataclass(frozen=True)
class TrainConfig:
    """A pre-training run: prior, model sizes, optimiser and schedule."""

    name: str = "small"
    seed: int = 0
    steps: int = 2000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    clip: float = 1.0
    val_studies: int = 256
    val_every: int = 200
    checkpoint_every: int = 200
    model: ModelConfig = field(default_factory=ModelConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> TrainConfig:
        d = dict(d)
        model = ModelConfig(**d.pop("model", {}))
        prior_d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("prior", {}).items()}
        prior = PriorConfig(**prior_d)
        known = {f.name for f in fields(TrainConfig)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training config keys: {sorted(unknown)}")
        return TrainConfig(model=model, prior=prior, **d)

    @staticmethod
    def load(path: str | Path) -> TrainConfig:
        """Read a JSON (or TOML) config file."""
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            return TrainConfig.from_dict(tomllib.loads(text))
        return TrainConfig.from_dict(json.loads(text))


# -- objective ----------------------------------------------------------------------------


def _ind(studies_one: Studies, j) -> dict:
    """Individual j of one (unbatched) study as the dict the model takes."""
    s = studies_one
    return dict(
        obs_t=s.obs_t[j], obs_y=s.obs_y[j], obs_cens=s.obs_cens[j], obs_mask=s.obs_mask[j],
        dose_t=s.dose_t[j], dose_amt=s.dose_amt[j], dose_route=s.dose_route[j],
        dose_dur=s.dose_dur[j], dose_mask=s.dose_mask[j], ss=s.ss[j], ii=s.ii[j],
    )  # fmt: skip


def early_mask(obs_t, obs_mask, k):
    """The first k samples at t > 0 (rank by order, records are time-sorted)."""
    pos = obs_mask & (obs_t > 0)
    rank = jnp.cumsum(pos, axis=-1) - 1
    return pos & (rank < k)


def gaussian_loglik(y, cens, mask, mean, logvar):
    """Sum of log N(log y; mean, e^logvar) (log Phi at the LLOQ for censored samples)."""
    ly = jnp.log(jnp.maximum(y, 1e-6))
    sd = jnp.exp(0.5 * logvar)
    z = (ly - mean) / sd
    ll = jnp.where(cens, log_ndtr(z), -0.5 * z * z - 0.5 * logvar - 0.5 * math.log(2 * math.pi))
    return jnp.sum(jnp.where(mask, ll, 0.0))


def _kl(mu_q, ls_q, mu_p, ls_p):
    return jnp.sum(
        ls_p - ls_q + 0.5 * (jnp.exp(2 * ls_q) + (mu_q - mu_p) ** 2) * jnp.exp(-2 * ls_p) - 0.5
    )


def study_loss(model: InContextPK, study: Studies, target, n_early, key):
    """Negative ELBO per sample of one normalised study (see module docstring)."""
    n = study.ind_mask.shape[0]
    idx = jnp.arange(n)
    context = study.ind_mask & (idx != target)
    inds = jax.vmap(lambda j: _ind(study, j))(idx)
    h = jax.vmap(model.encode_individual)(inds)
    empty = dict(inds, obs_mask=jnp.zeros_like(inds["obs_mask"]))
    h_prior = jax.vmap(model.encode_individual)(empty)
    tgt = _ind(study, target)
    h_early = model.encode_individual(
        dict(tgt, obs_mask=early_mask(tgt["obs_t"], tgt["obs_mask"], n_early))
    )
    mu_s, ls_s = model.study_posterior(h, context)
    k1, k2 = jax.random.split(key)
    z_s = mu_s + jnp.exp(ls_s) * jax.random.normal(k1, mu_s.shape, F32)
    post = jax.vmap(model.individual_posterior, in_axes=(0, None))(h, z_s)
    prior = jax.vmap(model.individual_posterior, in_axes=(0, None))(h_prior, z_s)
    mu_e, ls_e = model.individual_posterior(h_early, z_s)
    is_t = idx == target
    mu_p = jnp.where(is_t[:, None], mu_e[None], prior[0])
    ls_p = jnp.where(is_t[:, None], ls_e[None], prior[1])
    z_i = post[0] + jnp.exp(post[1]) * jax.random.normal(k2, post[0].shape, F32)
    z = jnp.concatenate([z_i, jnp.broadcast_to(z_s, (n, z_s.shape[0]))], axis=1)

    def one(zj, ind):
        ma, va = model.decode_attention(zj, ind, ind["obs_t"])
        mp, vp = model.decode_physics(zj, z_s, ind, ind["obs_t"])
        lla = gaussian_loglik(ind["obs_y"], ind["obs_cens"], ind["obs_mask"], ma, va)
        llp = gaussian_loglik(ind["obs_y"], ind["obs_cens"], ind["obs_mask"], mp, vp)
        return lla, llp

    lla, llp = jax.vmap(one)(z, inds)
    kl_i = jax.vmap(_kl)(post[0], post[1], mu_p, ls_p)
    live = study.ind_mask
    kl_s = _kl(mu_s, ls_s, jnp.zeros_like(mu_s), jnp.zeros_like(ls_s))
    kl_s = kl_s if model.config.use_study else 0.0  # ablation: z_s is fixed at 0, not inferred
    elbo_a = jnp.sum(jnp.where(live, lla - kl_i, 0.0)) - kl_s
    elbo_p = jnp.sum(jnp.where(live, llp - kl_i, 0.0)) - kl_s
    n_obs = jnp.maximum(jnp.sum(study.obs_mask & live[:, None]), 1)
    return -(elbo_a + elbo_p) / n_obs, (-elbo_a / n_obs, -elbo_p / n_obs)


def prepare_with_scales(studies: Studies, key):
    """`prepare`, also returning the context scales (normalised studies, target, k, scales)."""
    k1, k2 = jax.random.split(key)
    s_count, n = studies.ind_mask.shape
    logits = jnp.where(studies.ind_mask, 0.0, -jnp.inf)
    target = jax.random.categorical(k1, logits, axis=-1)
    n_early = jax.random.randint(k2, (s_count,), 0, 6)
    context = studies.ind_mask & (jnp.arange(n)[None, :] != target[:, None])
    scales = study_scales(studies, context)
    return normalise(studies, scales), target, n_early, scales


def prepare(studies: Studies, key) -> tuple[Studies, jax.Array, jax.Array]:
    """Pick a target per study and k early samples; normalise by the context's scales."""
    return prepare_with_scales(studies, key)[:3]


def mean_study_loss(per_study, model, studies: Studies, key, names: tuple[str, ...]):
    """`per_study(model, study, target, k, key) -> (loss, parts tuple)` over a raw batch
    (`prepare`d, one key per study): the mean loss and the mean parts named by `names`."""
    kp, kl = jax.random.split(key)
    norm, target, n_early = prepare(studies, kp)
    keys = jax.random.split(kl, target.shape[0])
    loss, parts = jax.vmap(per_study, in_axes=(None, 0, 0, 0, 0))(
        model, norm, target, n_early, keys
    )
    return jnp.mean(loss), {k: jnp.mean(v) for k, v in zip(names, parts, strict=True)}


def batch_loss(model, studies: Studies, key):
    return mean_study_loss(study_loss, model, studies, key, ("attention", "physics"))


def model_kinds() -> dict:
    """kind -> (build(ModelConfig, key) -> module, loss(module, studies, key) -> (loss, parts)).

    Every model pre-trained by `train` is one of these kinds (`ModelConfig.kind`); `loss`
    takes a raw batch from the prior (un-normalised `Studies`) and returns the scalar loss
    and a dict of named parts that the training log records (`loss_<name>`, `val_<name>`)."""
    from popkin.amortized import _baselines as bl
    from popkin.amortized import _generator as gen

    return {"incontext": (InContextPK, batch_loss),
            "transformer": (bl.PlainTransformer, bl.transformer_loss),
            "neural_ode": (bl.LatentNeuralODE, bl.neural_ode_loss),
            "generator": (gen.FlowGenerator, gen.flow_batch_loss)}  # fmt: skip


def _kind(cfg: ModelConfig):
    kinds = model_kinds()
    if cfg.kind not in kinds:
        raise ValueError(f"unknown model kind {cfg.kind!r}; expected one of {sorted(kinds)}")
    return kinds[cfg.kind]


# -- training loop ------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig):
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.05
    )
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.clip), optax.adamw(sched, weight_decay=cfg.weight_decay)
    )
    # a step whose gradient is not finite is skipped (and counted in the log), not applied
    return optax.apply_if_finite(inner, max_consecutive_errors=50)


def init_model(cfg: TrainConfig):
    """A freshly initialised model of the config's kind."""
    return _kind(cfg.model)[0](cfg.model, jax.random.PRNGKey(cfg.seed))


def data_mesh(devices=None):
    """A 1-D device mesh ("data") over `devices` (default: all local devices)."""
    from jax.sharding import Mesh

    devs = np.asarray(jax.devices() if devices is None else devices)
    return Mesh(devs, ("data",))


def _make_step(cfg: TrainConfig, optim, mesh=None):
    """The jitted training step. With a `mesh`, the batch of studies is sharded along its
    first axis over the mesh's devices (data parallel; parameters replicated), and XLA reduces
    the gradient across devices: the same computation as on one device up to summation order."""
    data_key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    if mesh is not None and cfg.batch % mesh.size:
        raise ValueError(f"batch {cfg.batch} is not divisible by {mesh.size} devices")

    loss_fn = _kind(cfg.model)[1]

    @eqx.filter_jit
    def step_fn(model, opt_state, step):
        key = jax.random.fold_in(data_key, step)
        k_data, k_loss = jax.random.split(key)
        studies = sample_studies(k_data, cfg.batch, cfg.prior)
        if mesh is not None:
            from jax.sharding import NamedSharding, PartitionSpec

            studies = jax.lax.with_sharding_constraint(
                studies, NamedSharding(mesh, PartitionSpec("data"))
            )
        (loss, parts), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, studies, k_loss
        )
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss, parts

    return step_fn


def validation_set(cfg: TrainConfig) -> Studies:
    """The fixed held-out synthetic studies (key independent of the training stream)."""
    return sample_studies(jax.random.PRNGKey(10_000 + cfg.seed), cfg.val_studies, cfg.prior)


@eqx.filter_jit
def _val_loss(model, studies, key):
    return _kind(model.config)[1](model, studies, key)


def save_checkpoint(path: Path, model, opt_state, step: int, cfg: TrainConfig, log: list) -> None:
    """model + optimiser state (equinox leaves) and JSON metadata, written atomically."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.eqx.tmp"
    with open(tmp, "wb") as f:
        eqx.tree_serialise_leaves(f, (model, opt_state))
    tmp.replace(path / "state.eqx")
    meta = dict(step=step, config=cfg.to_dict(), format=1)
    (path / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
    (path / "meta.json.tmp").replace(path / "meta.json")
    (path / "log.json.tmp").write_text(json.dumps(log))
    (path / "log.json.tmp").replace(path / "log.json")


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, truncated or from another configuration."""


def load_checkpoint(path: str | Path, with_optimizer: bool = True):
    """(model, opt_state, step, config, log) from a checkpoint folder; clear error if broken."""
    path = Path(path)
    meta_file, state_file = path / "meta.json", path / "state.eqx"
    if not meta_file.exists() or not state_file.exists():
        raise CheckpointError(f"{path}: not a popkin checkpoint (needs meta.json and state.eqx)")
    try:
        meta = json.loads(meta_file.read_text())
        cfg = TrainConfig.from_dict(meta["config"])
        step = int(meta["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable checkpoint metadata ({e})") from e
    model = init_model(cfg)
    opt_state = make_optimizer(cfg).init(eqx.filter(model, eqx.is_array))
    try:
        with open(state_file, "rb") as f:
            model, opt_state = eqx.tree_deserialise_leaves(f, (model, opt_state))
            if f.read(1):
                raise ValueError("trailing bytes")
    except Exception as e:  # truncated / corrupted / other shapes
        raise CheckpointError(
            f"{state_file}: corrupted or truncated checkpoint, or written by another model "
            f"configuration ({type(e).__name__}: {e})"
        ) from e
    log_file = path / "log.json"
    log = json.loads(log_file.read_text()) if log_file.exists() else []
    return model, (opt_state if with_optimizer else None), step, cfg, log


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = True, progress: bool = True,
          max_seconds: float | None = None, data_parallel: bool = False):  # fmt: skip
    """Pre-train (or resume) into folder `out`; returns (model, log). Checkpoints every
    `checkpoint_every` steps and at the end; stops early (checkpointed) after `max_seconds`.
    `data_parallel`: shard each batch over all local devices (JAX sharding; on CPU, test with
    XLA_FLAGS=--xla_force_host_platform_device_count=2)."""
    out = Path(out)
    optim = make_optimizer(cfg)
    if resume and (out / "meta.json").exists():
        model, opt_state, start, saved_cfg, log = load_checkpoint(out)
        if saved_cfg != cfg:
            raise CheckpointError(
                f"{out}: checkpoint was written with another config; use a new folder"
            )
    else:
        model = init_model(cfg)
        opt_state = optim.init(eqx.filter(model, eqx.is_array))
        start, log = 0, []
    mesh = data_mesh() if data_parallel and len(jax.devices()) > 1 else None
    step_fn = _make_step(cfg, optim, mesh)
    val = validation_set(cfg) if cfg.val_studies else None
    val_key = jax.random.PRNGKey(20_000 + cfg.seed)
    t0 = time.perf_counter()
    bar = _progress(progress, cfg.steps, start)
    step = start
    try:
        for step in range(start, cfg.steps):
            model, opt_state, loss, parts = step_fn(model, opt_state, jnp.int32(step))
            done = step + 1
            skipped = int(opt_state.total_notfinite)
            if skipped > max(50, 0.02 * done):
                raise FloatingPointError(
                    f"{skipped} of {done} training steps had a non-finite loss or gradient"
                )
            entry = {"step": done, "loss": float(loss), "skipped": skipped,
                     **{f"loss_{k}": float(v) for k, v in parts.items()},
                     "seconds": time.perf_counter() - t0}  # fmt: skip
            if val is not None and (done % cfg.val_every == 0 or done == cfg.steps):
                vl, vparts = _val_loss(model, val, val_key)
                entry.update(
                    val_loss=float(vl), **{f"val_{k}": float(v) for k, v in vparts.items()}
                )
            log.append(entry)
            if bar is not None:
                bar.update(entry)
            stop = max_seconds is not None and time.perf_counter() - t0 > max_seconds
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
                save_checkpoint(out, model, opt_state, done, cfg, log)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    return model, log


class _Bar:
    def __init__(self, total, start):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("{task.fields[msg]}"), TimeRemainingColumn())  # fmt: skip
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, msg="")

    def update(self, e):
        msg = f"loss {e['loss']:.3f}" + (f" val {e['val_loss']:.3f}" if "val_loss" in e else "")
        self.p.update(self.task, advance=1, msg=msg)

    def close(self):
        self.p.stop()


def _progress(on: bool, total: int, start: int):
    return _Bar(total, start) if on else None
