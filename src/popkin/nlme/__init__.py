"""NLME estimation: per-subject modes and Laplace posteriors, FO/FOCE/FOCE-I/Laplace, Fit."""

from ._fit import fit as fit
from ._result import Fit as Fit
from ._result import FitStatus as FitStatus
from ._result import load_fit as load_fit
