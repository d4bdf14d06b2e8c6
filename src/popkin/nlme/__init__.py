"""NLME estimation: per-subject modes and Laplace posteriors, FO/FOCE/FOCE-I/Laplace, Fit."""

from ._bootstrap import BootstrapResult as BootstrapResult
from ._bootstrap import bootstrap as bootstrap
from ._bootstrap import load_bootstrap as load_bootstrap
from ._bootstrap import resample_subjects as resample_subjects
from ._fit import fit as fit
from ._result import Fit as Fit
from ._result import FitStatus as FitStatus
from ._result import load_fit as load_fit
from ._sequential import fix_from as fix_from
from ._sequential import with_individual_parameters as with_individual_parameters
