"""Post-hoc joining of independently fitted endpoint models (seed 000)."""

from ._joint import JointModel as JointModel
from ._joint import independent_prior as independent_prior
from ._joint import join as join
from ._joint import load_joint as load_joint
from ._joint import posterior_samples as posterior_samples
from ._joint import save_joint as save_joint
from ._priors import fit_flow as fit_flow
from ._priors import fit_gaussian as fit_gaussian
