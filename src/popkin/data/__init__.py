"""Data: NONMEM-style tables -> validated `Population` arrays, plus bundled public data sets."""

from __future__ import annotations

from . import datasets as datasets
from ._errors import DataError as DataError
from ._errors import Problem as Problem
from ._population import Doses as Doses
from ._population import Population as Population
from ._population import PopulationInfo as PopulationInfo
from ._population import Records as Records
from ._population import Subjects as Subjects
from ._reader import read_nonmem as read_nonmem
