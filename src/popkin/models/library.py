"""Ready-made models, usable by name from the CLI (`popkin fit theophylline data.csv`).

Each is a `popkin.Model` subclass with NONMEM-like initial values; copy one as a template.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._dynamics import RecordTimes
from ._error import Normal, combined, proportional
from ._linear import OneCmtIV, OneCmtOral, TwoCmtIV, TwoCmtOral
from ._model import Model
from ._params import Omega, Params, Positive


def _oral_ka_cl_v(th, eta) -> dict:
    """Log-normal ka (1/h), CL (L/h), V (L) from log-scale thetas tka, tcl, tv."""
    return dict(
        ka=jnp.exp(th.tka + eta.eta_ka),
        cl=jnp.exp(th.tcl + eta.eta_cl),
        v=jnp.exp(th.tv + eta.eta_v),
    )


class Theophylline(Model):
    """1-compartment, first-order absorption, log-normal ka/CL/V, additive error.

    nlmixr2's `theo_sd` FOCE-I example: ka (1/h), CL (L/h), V (L); conc in mg/L, dose in mg.
    """

    theta = Params(tka=0.45, tcl=1.0, tv=3.45)
    omega = Omega(eta_ka=0.6, eta_cl=0.3, eta_v=0.1)
    sigma = Params(add_sd=Positive(0.7))
    dynamics = OneCmtOral()

    def individual(self, th, eta, cov):
        return _oral_ka_cl_v(th, eta)

    def observe(self, p, sol, sg):
        return {"cp": Normal(sol.central / p["v"], sg.add_sd)}


class OneCmtOralProp(Model):
    """1-compartment oral, log-normal ka/CL/V, proportional error."""

    theta = Params(tka=0.0, tcl=1.0, tv=3.0)
    omega = Omega(eta_ka=0.3, eta_cl=0.1, eta_v=0.1)
    sigma = Params(prop_sd=Positive(0.2))
    dynamics = OneCmtOral()

    def individual(self, th, eta, cov):
        return _oral_ka_cl_v(th, eta)

    def observe(self, p, sol, sg):
        return {"cp": proportional(sol.central / p["v"], sg.prop_sd)}


class OneCmtIVProp(Model):
    """1-compartment IV bolus/infusion, log-normal CL/V, proportional error."""

    theta = Params(tcl=0.0, tv=2.0)
    omega = Omega(eta_cl=0.1, eta_v=0.1)
    sigma = Params(prop_sd=Positive(0.2))
    dynamics = OneCmtIV()

    def individual(self, th, eta, cov):
        return dict(cl=jnp.exp(th.tcl + eta.eta_cl), v=jnp.exp(th.tv + eta.eta_v))

    def observe(self, p, sol, sg):
        return {"cp": proportional(sol.central / p["v"], sg.prop_sd)}


class TwoCmtIVComb(Model):
    """2-compartment IV, log-normal CL/V/Q/Vp, combined error."""

    theta = Params(tcl=0.0, tv=2.0, tq=0.0, tvp=3.0)
    omega = Omega(eta_cl=0.1, eta_v=0.1)
    sigma = Params(add_sd=Positive(0.05), prop_sd=Positive(0.15))
    dynamics = TwoCmtIV()

    def individual(self, th, eta, cov):
        return dict(
            cl=jnp.exp(th.tcl + eta.eta_cl),
            v=jnp.exp(th.tv + eta.eta_v),
            q=jnp.exp(th.tq),
            vp=jnp.exp(th.tvp),
        )

    def observe(self, p, sol, sg):
        return {"cp": combined(sol.central / p["v"], sg.add_sd, sg.prop_sd)}


class TwoCmtOralComb(Model):
    """2-compartment oral, log-normal ka/CL/V with a full 3x3 Omega, combined error."""

    theta = Params(tka=0.0, tcl=1.0, tv=3.0, tq=0.5, tvp=3.5)
    omega = Omega.block(
        ["eta_ka", "eta_cl", "eta_v"], [[0.2, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 0.1]]
    )
    sigma = Params(add_sd=Positive(0.05), prop_sd=Positive(0.1))
    dynamics = TwoCmtOral()

    def individual(self, th, eta, cov):
        return dict(_oral_ka_cl_v(th, eta), q=jnp.exp(th.tq), vp=jnp.exp(th.tvp))

    def observe(self, p, sol, sg):
        return {"cp": combined(sol.central / p["v"], sg.add_sd, sg.prop_sd)}


#: Built-in models by CLI name.
MODELS = {
    "theophylline": Theophylline,
    "onecmt-oral": OneCmtOralProp,
    "onecmt-iv": OneCmtIVProp,
    "twocmt-iv": TwoCmtIVComb,
    "twocmt-oral": TwoCmtOralComb,
}


class Biomarker(Model):
    """Linear disease progression of a biomarker: `B(t) = base exp(eta_base) + (slope +
    eta_slope) t`, additive error. Two random effects; time in weeks, biomarker in U/L."""

    theta = Params(tbase=Positive(40.0), slope=0.5)
    omega = Omega(eta_base=0.04, eta_slope=0.04)
    sigma = Params(add_sd=Positive(2.0))

    dynamics = RecordTimes()

    def individual(self, th, eta, cov):
        return dict(base=th.tbase * jnp.exp(eta.eta_base), slope=th.slope + eta.eta_slope)

    def observe(self, p, sol, sg):
        return {"b": Normal(p["base"] + p["slope"] * sol.t, sg.add_sd)}


class BiomarkerPair(Model):
    """Two `Biomarker` endpoints (DVID 1 = "a", 2 = "b") with one full 4x4 Omega: the joint
    model used to simulate correlated endpoints (the demo's joining study)."""

    theta = Params(tbase_a=Positive(40.0), slope_a=0.5, tbase_b=Positive(30.0), slope_b=0.3)
    omega = Omega.block(
        ["base_a", "slope_a", "base_b", "slope_b"],
        [[0.04, 0.0, 0.03, 0.0], [0.0, 0.04, 0.0, 0.028], [0.03, 0.0, 0.04, 0.0],
         [0.0, 0.028, 0.0, 0.04]],
    )  # fmt: skip
    sigma = Params(sd_a=Positive(2.0), sd_b=Positive(1.5))
    dynamics = RecordTimes()

    def individual(self, th, eta, cov):
        return dict(
            base_a=th.tbase_a * jnp.exp(eta.base_a), slope_a=th.slope_a + eta.slope_a,
            base_b=th.tbase_b * jnp.exp(eta.base_b), slope_b=th.slope_b + eta.slope_b,
        )  # fmt: skip

    def observe(self, p, sol, sg):
        return {
            "a": Normal(p["base_a"] + p["slope_a"] * sol.t, sg.sd_a),
            "b": Normal(p["base_b"] + p["slope_b"] * sol.t, sg.sd_b),
        }
