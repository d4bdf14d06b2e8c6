"""Published reference problems used to validate popkin (tests and benchmarks read these).

The numbers here are external: nobody at popkin computed them.
- Wang (2007), J Pharmacokinet Pharmacodyn 34:575, objective values at fixed parameters,
  reproduced by NONMEM 7.5, nlmixr2 and Pumas.
- nlmixr2's FOCE-I fit of `theo_sd` (1-compartment oral, additive error).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .models._dynamics import RecordTimes
from .models._error import additive, proportional
from .models._model import Model
from .models._params import Omega, Params, Positive
from .models.library import TwoCmtOralComb
from .params import ModelParams

_WANG = (
    "1,0,10.68/1,1,3.6837/2,0,10.402/2,1,6.454/3,0,9.8814/3,1,5.8565/4,0,9.3408/4,1,5.6209/"
    "5,0,10.082/5,1,6.7583/6,0,9.8938/6,1,6.5049/7,0,9.8908/7,1,6.9557/8,0,10.234/8,1,6.4488/"
    "9,0,9.9882/9,1,6.7112/10,0,9.6736/10,1,6.6402"
)


def wang_data() -> pd.DataFrame:
    """Wang (2007) data: 10 subjects, observations at t = 0 and 1."""
    rows = [list(map(float, r.split(","))) for r in _WANG.split("/")]
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV"])


class WangAdditive(Model):
    """f = 10 exp(-ke t), ke = theta exp(eta); theta = 0.5, omega^2 = 0.04, sigma^2 = 0.1."""

    theta = Params(th=Positive(0.5))
    omega = Omega(eta=0.04)
    sigma = Params(var=Positive(0.1))
    dynamics = RecordTimes()

    def individual(self, th, eta, cov):
        return dict(ke=th.th * jnp.exp(eta.eta))

    def observe(self, p, sol, sg):
        return {"y": additive(10 * jnp.exp(-p["ke"] * sol.t), jnp.sqrt(sg.var))}


class WangProportional(WangAdditive):
    """As `WangAdditive` with proportional error y = f + f eps."""

    def observe(self, p, sol, sg):
        return {"y": proportional(10 * jnp.exp(-p["ke"] * sol.t), jnp.sqrt(sg.var))}


class LinearEndpoint(Model):
    """`y = mu + eta + eps`: one endpoint, one random effect, linear and Gaussian, so every
    marginal likelihood is known in closed form (evaluator tests, the joining toy problem).
    Subclass to change the initial values."""

    theta = Params(mu=0.0)
    omega = Omega(eta=0.5)
    sigma = Params(sd=Positive(0.5))
    dynamics = RecordTimes()

    def individual(self, th, eta, cov):
        return dict(m=th.mu + eta.eta)

    def observe(self, p, sol, sg):
        return {"y": additive(p["m"] + 0.0 * sol.t, sg.sd)}


#: (model class, method, published OFV at the initial values).
WANG_OFV = [
    (WangAdditive, "fo", 0.026),
    (WangAdditive, "foce", -2.059),
    (WangAdditive, "focei", -2.059),
    (WangProportional, "fo", 39.213),
    (WangProportional, "foce", 39.207),
    (WangProportional, "focei", 39.458),
]

#: nlmixr2 FOCE-I on theo_sd: (quantity, reference, tolerance, kind) with kind abs or rel.
THEOPHYLLINE_FOCEI = [
    ("ofv", 116.80, 0.05, "abs"),
    ("tka", 0.4663, 0.01, "rel"),
    ("tcl", 1.012, 0.01, "rel"),
    ("tv", 3.460, 0.01, "rel"),
    ("add_sd", 0.6947, 0.01, "rel"),
    ("se_tka", 0.191, 0.10, "rel"),
    ("se_tcl", 0.0837, 0.10, "rel"),
    ("se_tv", 0.0465, 0.10, "rel"),
]


#: The recovery study's model: 2-compartment oral, full 3x3 Omega, combined error.
RecoveryTwoCmt = TwoCmtOralComb


RECOVERY_TRUTH = ModelParams(
    theta=dict(tka=0.0, tcl=1.0, tv=3.0, tq=0.5, tvp=3.5),
    omega=jnp.asarray([[0.2, 0.05, 0.03], [0.05, 0.1, 0.02], [0.03, 0.02, 0.1]]),
    sigma=dict(add_sd=0.05, prop_sd=0.1),
)


def recovery_design(n_subjects: int = 200, dose: float = 100.0) -> pd.DataFrame:
    """Single oral dose (mg) into the depot; 9 samples from 0.25 to 24 h per subject."""
    times = [0.25, 0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 24.0]
    rows = []
    for i in range(n_subjects):
        rows.append((i + 1, 0.0, np.nan, dose, 1, 1, 1))
        rows += [(i + 1, t, 0.0, 0.0, 0, 2, 0) for t in times]
    return pd.DataFrame(rows, columns=["ID", "TIME", "DV", "AMT", "EVID", "CMT", "MDV"])


def theophylline_values(fit) -> dict:
    """The quantities of `THEOPHYLLINE_FOCEI` from a fit: OFV, estimates and SEs."""
    est = fit.estimates.set_index("parameter")
    out = {"ofv": fit.ofv}
    for name in ["tka", "tcl", "tv", "add_sd"]:
        out[name] = float(est.loc[name, "estimate"])
        out[f"se_{name}"] = float(est.loc[name, "se"])
    return out


def recovery_run(seed: int, n_subjects: int = 200, method: str = "focei") -> dict:
    """Simulate `RecoveryTwoCmt` at `RECOVERY_TRUTH` with `seed`, fit it from the model's
    initial values, and compare: per parameter the estimate, SE, truth and whether
    |estimate - truth| <= 2 SE; and the correlation of EBEs with the true etas."""
    import jax

    from .data._reader import read_nonmem
    from .nlme import fit as run_fit
    from .simulate import simulate

    model = RecoveryTwoCmt()
    pop = read_nonmem(recovery_design(n_subjects))
    sim = simulate(model, pop, RECOVERY_TRUTH, key=jax.random.key(seed))
    true_eta = sim.groupby("ID")[[f"ETA_{n}" for n in model.eta_names]].first().to_numpy()
    data = sim.drop(columns=["PRED", "IPRED", *[f"ETA_{n}" for n in model.eta_names]])
    f = run_fit(model, data, method)
    om = np.asarray(RECOVERY_TRUTH.omega)
    truth = dict(RECOVERY_TRUTH.theta)
    names = model.eta_names
    for a in range(3):
        for b in range(a + 1):
            key = f"omega({names[a]})" if a == b else f"omega({names[a]},{names[b]})"
            truth[key] = om[a, b]
    truth.update(RECOVERY_TRUTH.sigma)
    rows = []
    for _, r in f.estimates.iterrows():
        t = float(truth[r.parameter])
        rows.append(
            dict(
                parameter=r.parameter,
                estimate=float(r.estimate),
                se=float(r.se),
                truth=t,
                within_2se=bool(abs(r.estimate - t) <= 2 * r.se),
            )
        )
    corr = [float(np.corrcoef(f.eta[:, j], true_eta[:, j])[0, 1]) for j in range(len(names))]
    return dict(
        seed=seed, status=f.status.name, ofv=f.ofv, seconds=f.seconds, rows=rows,
        ebe_corr=dict(zip(names, corr, strict=True)),
    )  # fmt: skip
