"""popkin: population PK/PD in JAX.

NLME estimation (FO, FOCE, FOCE-I, Laplace), post-hoc joining of endpoint models, and
amortized in-context PK models. Float64 is switched on at import (NLME objectives need it).
"""

from . import _config  # noqa: F401  (enables float64 before any array is made)
from . import amortized as amortized
from . import parallel as parallel
from ._config import enable_compilation_cache as enable_compilation_cache
from ._io import FileFormatError as FileFormatError
from .amortized import forecast as forecast
from .amortized import generate as generate
from .data import DataError as DataError
from .data import Population as Population
from .data import datasets as datasets
from .data import read_nonmem as read_nonmem
from .join import JointModel as JointModel
from .join import join as join
from .join import load_joint as load_joint
from .models import ODE as ODE
from .models import Bounded as Bounded
from .models import Fixed as Fixed
from .models import LinearPK as LinearPK
from .models import LogNormal as LogNormal
from .models import Model as Model
from .models import Normal as Normal
from .models import Omega as Omega
from .models import OneCmtIV as OneCmtIV
from .models import OneCmtOral as OneCmtOral
from .models import Params as Params
from .models import Positive as Positive
from .models import ThreeCmtIV as ThreeCmtIV
from .models import ThreeCmtOral as ThreeCmtOral
from .models import TwoCmtIV as TwoCmtIV
from .models import TwoCmtOral as TwoCmtOral
from .models import additive as additive
from .models import combined as combined
from .models import exponential as exponential
from .models import proportional as proportional
from .nca import nca as nca
from .nca import pk_reference as pk_reference
from .nca import realism_check as realism_check
from .nlme import BootstrapResult as BootstrapResult
from .nlme import Fit as Fit
from .nlme import FitStatus as FitStatus
from .nlme import bootstrap as bootstrap
from .nlme import fit as fit
from .nlme import load_bootstrap as load_bootstrap
from .nlme import load_fit as load_fit
from .params import ModelParams as ModelParams
from .params import default_params as default_params
from .priors import Gaussian as Gaussian
from .report import report as report
from .simulate import simulate as simulate

__version__ = "0.1.0"
