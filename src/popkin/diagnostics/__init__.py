"""Diagnostic figures (matplotlib): goodness of fit, individual fits, simulated bands."""

from ._plots import gof as gof
from ._plots import individual_fits as individual_fits
from ._plots import joint_pairs as joint_pairs
from ._plots import profiles_band as profiles_band
