"""Structural, error and parameter building blocks of popkin models."""

from ._dynamics import AbstractDynamics as AbstractDynamics
from ._dynamics import RecordTimes as RecordTimes
from ._dynamics import Solution as Solution
from ._error import LogNormal as LogNormal
from ._error import Normal as Normal
from ._error import additive as additive
from ._error import combined as combined
from ._error import exponential as exponential
from ._error import proportional as proportional
from ._linear import LinearPK as LinearPK
from ._linear import OneCmtIV as OneCmtIV
from ._linear import OneCmtOral as OneCmtOral
from ._linear import ThreeCmtIV as ThreeCmtIV
from ._linear import ThreeCmtOral as ThreeCmtOral
from ._linear import TwoCmtIV as TwoCmtIV
from ._linear import TwoCmtOral as TwoCmtOral
from ._model import Model as Model
from ._model import Namespace as Namespace
from ._params import Bounded as Bounded
from ._params import Fixed as Fixed
from ._params import Omega as Omega
from ._params import Params as Params
from ._params import Positive as Positive
from ._params import Real as Real
