r"""Pharmacodynamic building blocks: direct Emax, indirect response (turnover), progression.

Pure functions of JAX arrays (broadcasting), usable inside ODE right-hand sides and
prediction functions. `c` is a concentration (amount/volume), times are in the table's time
unit, `kin` is in effect units/time and `kout` in 1/time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._ode import ODE

_KINDS = ("inhibit", "stimulate")
_ONS = ("kin", "kout")


def _hill(c, c50, hill):
    r"""$c^h / (c_{50}^h + c^h)$, with zero (and finite derivatives) at $c \le 0$."""
    c = jnp.asarray(c, float)
    pos = c > 0
    safe = jnp.where(pos, c, 1.0)
    ch = jnp.where(pos, jnp.exp(hill * jnp.log(safe)), 0.0)
    return ch / (jnp.asarray(c50, float) ** hill + ch)


def emax(c, e0, emax, ec50, hill=1.0):
    r"""Direct Emax (sigmoid for `hill` != 1): $E = E_0 + E_{max}\, c^h / (EC_{50}^h + c^h)$.

    `e0`, `emax` in effect units; `ec50` in concentration units; `hill` dimensionless.
    """
    return e0 + emax * _hill(c, ec50, hill)


def turnover(
    c,
    r,
    kin,
    kout,
    *,
    imax=None,
    ic50=None,
    smax=None,
    sc50=None,
    on: str = "kin",
    kind: str | None = None,
    hill=1.0,
):
    r"""$dR/dt$ of the four indirect response models (Jusko), response `r`, drug `c`.

    With $I(c) = I_{max} c^h / (IC_{50}^h + c^h)$ and $S(c) = S_{max} c^h / (SC_{50}^h + c^h)$:
    - inhibit kin:    $k_{in} (1 - I(c)) - k_{out} R$
    - inhibit kout:   $k_{in} - k_{out} (1 - I(c)) R$
    - stimulate kin:  $k_{in} (1 + S(c)) - k_{out} R$
    - stimulate kout: $k_{in} - k_{out} (1 + S(c)) R$

    `kind` ("inhibit" / "stimulate") defaults to the one whose parameters are given
    (`imax`, `ic50` or `smax`, `sc50`); `on` is "kin" or "kout". At $c = 0$ the baseline
    $R_0 = k_{in}/k_{out}$ is an equilibrium.
    """
    if kind is None:
        if (imax is None) == (smax is None):
            raise ValueError("give either imax/ic50 (inhibit) or smax/sc50 (stimulate), or kind")
        kind = "inhibit" if imax is not None else "stimulate"
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if on not in _ONS:
        raise ValueError(f"on must be one of {_ONS}, got {on!r}")
    if kind == "inhibit":
        if imax is None or ic50 is None:
            raise ValueError("kind='inhibit' needs imax and ic50")
        factor = 1.0 - imax * _hill(c, ic50, hill)
    else:
        if smax is None or sc50 is None:
            raise ValueError("kind='stimulate' needs smax and sc50")
        factor = 1.0 + smax * _hill(c, sc50, hill)
    if on == "kin":
        return kin * factor - kout * r
    return kin - kout * factor * r


def turnover_baseline(kin, kout):
    r"""Baseline (drug-free equilibrium) of a turnover model: $R_0 = k_{in} / k_{out}$."""
    return kin / kout


def linear_progression(t, base, slope):
    r"""Linear disease progression $E(t) = E_{base} + \text{slope}\; t$ (slope per time unit)."""
    return base + slope * t


def pk_turnover_ode(pk: str = "oral1", kind: str = "inhibit", on: str = "kin", **kwargs) -> ODE:
    r"""A 1-compartment PK model driving a turnover (indirect response) effect, as an `ODE`.

    - `pk="oral1"`: states ("depot", "central", "effect"), doses into depot (CMT 1),
      $\dot A_d = -k_a A_d$, $\dot A_c = k_a A_d - (CL/V) A_c$.
    - `pk="iv1"`: states ("central", "effect"), doses into central (CMT 1).

    The effect follows `turnover(c = A_c / V, R, kin, kout, ...)`, starting (and reset) at
    $k_{in}/k_{out}$. Parameters: `ka` (oral), `cl`, `v`, `kin`, `kout` and `imax`, `ic50`
    (kind "inhibit") or `smax`, `sc50` (kind "stimulate"); optional `hill`, `lag`, `bioav`.
    `kwargs` go to `ODE` (solver, rtol, atol, max_steps).
    """
    if pk not in ("oral1", "iv1"):
        raise ValueError(f"pk must be 'oral1' or 'iv1', got {pk!r}")
    if kind not in _KINDS or on not in _ONS:
        raise ValueError(f"kind must be in {_KINDS} and on in {_ONS}")
    oral = pk == "oral1"
    names = ("imax", "ic50") if kind == "inhibit" else ("smax", "sc50")

    def rhs(t, s, p: dict) -> dict[str, jax.Array]:
        conc = s.central / p["v"]
        drug = {names[0]: p[names[0]], names[1]: p[names[1]]}
        d_effect = turnover(
            conc, s.effect, p["kin"], p["kout"], on=on, kind=kind, hill=p.get("hill", 1.0), **drug
        )
        elim = p["cl"] / p["v"] * s.central
        if oral:
            absorbed = p["ka"] * s.depot
            return {"depot": -absorbed, "central": absorbed - elim, "effect": d_effect}
        return {"central": -elim, "effect": d_effect}

    def init(p: dict) -> dict[str, jax.Array]:
        return {"effect": turnover_baseline(p["kin"], p["kout"])}

    states = ("depot", "central", "effect") if oral else ("central", "effect")
    return ODE(rhs, states, init=init, dose_compartment=0, **kwargs)
