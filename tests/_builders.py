"""Small `Fit` objects at known parameters, built without estimation (fast test inputs).

The diagnostics, report and CLI plumbing need a `Fit`; estimation itself is tested in
test_nlme.py. Here data are simulated from `Biomarker` at its initial parameters and the Fit
holds those true parameters and the true etas (EBE covariances set to 0.01 I).
"""

from __future__ import annotations

import jax
import numpy as np
import pandas as pd

from popkin.data._reader import read_nonmem
from popkin.models.library import Biomarker
from popkin.nlme._result import Fit, FitStatus
from popkin.params import default_params, pack
from popkin.simulate import simulate

WEEKS = np.arange(0.0, 13.0, 2.0)


def biomarker_data(n: int = 40, *, seed: int = 1, sigma_scale: float = 1.0,
                   omega_scale: float = 1.0) -> pd.DataFrame:  # fmt: skip
    """`n` subjects observed every 2 weeks for 12 weeks, simulated from `Biomarker` (with the
    residual SD times `sigma_scale`, Omega times `omega_scale`). Columns ID, TIME, DV, ETA_*."""
    model = Biomarker()
    rows = [(i + 1, t, 0.0) for i in range(n) for t in WEEKS]
    design = read_nonmem(pd.DataFrame(rows, columns=["ID", "TIME", "DV"]))
    p = default_params(model)
    if sigma_scale != 1.0 or omega_scale != 1.0:
        p = type(p)(theta=p.theta, omega=p.omega * omega_scale,
                    sigma={k: v * sigma_scale for k, v in p.sigma.items()})  # fmt: skip
    sim = simulate(model, design, p, key=jax.random.key(seed))
    return sim[["ID", "TIME", "DV", "ETA_eta_base", "ETA_eta_slope"]]


def synthetic_fit(data: pd.DataFrame) -> Fit:
    """A `Fit` of `Biomarker` on `data` at the true (initial) parameters and true etas."""
    model = Biomarker()
    pop = read_nonmem(data[["ID", "TIME", "DV"]])
    p = default_params(model)
    eta = data.groupby("ID", sort=False)[["ETA_eta_base", "ETA_eta_slope"]].first().to_numpy()
    n = pop.n_subjects
    return Fit(
        model=model, population=pop, method="focei", params=p,
        u_hat=np.asarray(pack(model, p)), ofv=0.0, ofv_subjects=np.zeros(n), eta=eta,
        eta_cov=np.tile(0.01 * np.eye(2), (n, 1, 1)), eta_converged=np.ones(n, bool),
        status=FitStatus.EVALUATION_ONLY, messages=[], cov_u=None, covariance=None,
        estimate_omega=True,
    )  # fmt: skip
