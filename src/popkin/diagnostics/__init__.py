"""Diagnostic figures (matplotlib): goodness of fit, individual fits, pcVPC, NPDE, eta pairs,
joined priors, simulated and forecast bands. Each returns a matplotlib Figure."""

from ._etas import eta_pairs as eta_pairs
from ._fidelity import classifier_auc as classifier_auc
from ._fidelity import mmd as mmd
from ._forecast import forecast_band as forecast_band
from ._npde import npde as npde
from ._npde import npde_plot as npde_plot
from ._npde import npde_table as npde_table
from ._plots import gof as gof
from ._plots import individual_fits as individual_fits
from ._plots import joint_pairs as joint_pairs
from ._plots import profiles_band as profiles_band
from ._vpc import pcvpc as pcvpc
from ._vpc import pcvpc_table as pcvpc_table
