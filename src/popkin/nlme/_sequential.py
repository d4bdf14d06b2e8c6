"""Sequential PK -> PD modelling: carry a PK fit into a downstream model.

Two standard routes (Zhang et al. 2003 call them PPP and IPP):
- `fix_from(model, fit)`: fix the downstream model's fixed effects that share a name with the
  upstream fit's at their estimates (typical values carried, PK variability re-estimated or
  ignored as the downstream model says).
- `with_individual_parameters(data, fit)`: add each subject's individual parameters at its EBE
  to the downstream data table as covariate columns (`PK_<name>`), so the PD model reads them
  from `cov` (individual PK carried, no PK random effects downstream).
"""

from __future__ import annotations

import pandas as pd

from ..models._model import Model
from ._result import Fit


def fix_from(model: Model, fit: Fit, names=None) -> Model:
    """`model` with the fixed effects named in `names` (default: all shared with `fit`) fixed
    at `fit`'s estimates."""
    shared = [k for k in model.theta.names if k in fit.params.theta]
    names = shared if names is None else list(names)
    missing = [k for k in names if k not in fit.params.theta or k not in model.theta.names]
    if missing:
        raise KeyError(f"cannot carry {missing}: not fixed effects of both models")
    values = {k: float(fit.params.theta[k]) for k in names}
    return model.replace(theta=model.theta.fix(**values))


def with_individual_parameters(data, fit: Fit, prefix: str = "PK_") -> pd.DataFrame:
    """`data` (a NONMEM table or Population) with `fit`'s individual parameters per subject
    as constant covariate columns `PREFIX<NAME>` (upper case)."""
    from ..data._population import Population

    table = data.to_dataframe() if isinstance(data, Population) else pd.DataFrame(data).copy()
    table.columns = [str(c).strip().upper() for c in table.columns]
    ind = fit.individual_parameters().set_index("ID")
    missing = sorted(set(table["ID"]) - set(ind.index), key=str)
    if missing:
        raise ValueError(f"subjects {missing[:10]} of the data are not in the upstream fit")
    for col in ind.columns:
        table[f"{prefix}{col}".upper()] = table["ID"].map(ind[col]).to_numpy()
    return table
