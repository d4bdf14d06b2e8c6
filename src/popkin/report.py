"""`popkin.report`: one self-contained HTML file (figures embedded as base64 PNG) for a fit or
a joined model: the model, a data summary, the estimates, diagnostics and extra sections."""

from __future__ import annotations

import base64
import html
import inspect
import io
import time
from pathlib import Path

import numpy as np
import pandas as pd

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1180px;
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{border-bottom:2px solid #2b6cb0;padding-bottom:.2em}h2{color:#2b6cb0;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#eef3fa}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;height:auto;border:1px solid #eee;margin:.4em 0}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:.85em}
.note{color:#555;font-size:.9em}nav a{margin-right:1em}
"""


def figure_html(fig, *, alt: str = "figure", dpi: int = 110) -> str:
    """A matplotlib Figure as an `<img>` with the PNG embedded (base64); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(df: pd.DataFrame, *, digits: int = 4) -> str:
    """A DataFrame as an HTML table, floats to `digits` significant figures."""
    fmt = lambda v: "-" if not np.isfinite(v) else f"{v:.{digits}g}"  # noqa: E731
    return df.to_html(index=False, border=0, float_format=fmt, na_rep="-", escape=True)


def _content(obj, title: str) -> str:
    if obj is None:
        return ""
    if isinstance(obj, pd.DataFrame):
        return table_html(obj)
    if hasattr(obj, "savefig"):
        return figure_html(obj, alt=title)
    if isinstance(obj, str):
        return obj  # HTML, as given
    raise TypeError(
        f"extra section {title!r}: content must be a matplotlib Figure, a DataFrame or an HTML "
        f"string, got {type(obj).__name__}"
    )


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s.lower()).strip("-")


def _model_html(fit) -> str:
    m = fit.model
    cls = type(m)
    doc = inspect.getdoc(cls) or ""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        src = ""
    rows = [("theta (fixed effects)", ", ".join(m.theta.names) if hasattr(m.theta, "names")
             else ", ".join(fit.params.theta))]  # fmt: skip
    rows.append(("random effects (eta)", ", ".join(m.eta_names) or "none"))
    rows.append(("residual parameters", ", ".join(fit.params.sigma) or "none"))
    rows.append(("dynamics", type(getattr(m, "dynamics", None)).__name__))
    rows.append(("estimation method", fit.method.upper()))
    out = f"<p><b>{html.escape(m.name)}</b> (<code>{html.escape(cls.__module__)}."
    out += f"{html.escape(cls.__qualname__)}</code>)</p>"
    if doc:
        out += f"<p>{html.escape(doc)}</p>"
    out += table_html(pd.DataFrame(rows, columns=["block", "contents"]))
    if src:
        out += f"<details><summary>model source</summary><pre>{html.escape(src)}</pre></details>"
    return out


def data_summary(population) -> pd.DataFrame:
    """Per endpoint (DVID): subjects, observations, censored, time and DV ranges; and doses."""
    t = population.table
    obs = (t["EVID"] == 0) & (t["MDV"] == 0)
    rows = []
    for dv, g in t[obs].groupby("DVID") if "DVID" in t else [(1, t[obs])]:
        cens = int((g["CENS"] != 0).sum()) if "CENS" in g else 0
        rows.append({"DVID": dv, "subjects": g["ID"].nunique(), "observations": len(g),
                     "censored (BLQ)": cens, "time min": g["TIME"].min(),
                     "time max": g["TIME"].max(), "DV min": g["DV"].min(),
                     "DV median": g["DV"].median(), "DV max": g["DV"].max()})  # fmt: skip
    doses = t[(t["EVID"] == 1) | (t["EVID"] == 4)] if "EVID" in t else t.iloc[:0]
    df = pd.DataFrame(rows)
    df.attrs["doses"] = len(doses)
    df.attrs["dose_subjects"] = doses["ID"].nunique() if len(doses) else 0
    return df


def _fit_sections(fit, *, label: str, n_sim: int, seed: int, dv_unit: str, time_unit: str,
                  sections: list, log) -> None:  # fmt: skip
    from . import diagnostics as dg

    pop = fit.population
    sections.append((f"{label}Model", _model_html(fit)))
    ds = data_summary(pop)
    src = f" from <code>{html.escape(str(pop.info.source))}</code>" if pop.info.source else ""
    sections.append((f"{label}Data", f"<p>{pop.n_subjects} subjects, {pop.n_observations} "
                     f"observations, {ds.attrs['doses']} dose records{src}.</p>"
                     + table_html(ds)))  # fmt: skip
    est = fit.estimates[["parameter", "block", "estimate", "se", "rse_pct", "ci_low", "ci_high"]]
    head = (f"<p>OFV {fit.ofv:.4f} (-2 log L without N log 2π); AIC {fit.aic:.3f}; "
            f"BIC {fit.bic:.3f}; status: <b>{html.escape(fit.status.value)}</b>; "
            f"{fit.n_evaluations} evaluations; covariance: {fit.covariance or 'not computed'}.</p>")  # fmt: skip
    try:
        sh = fit.shrinkage
        head += (
            "<p>Shrinkage: "
            + ", ".join(f"{html.escape(k)} {100 * v:.1f}%" for k, v in sh["eta"].items())
            + f"; ε {100 * sh['epsilon']:.1f}%.</p>"
        )
    except Exception:  # noqa: BLE001 - informational
        pass
    for msg in fit.messages:
        head += f'<p class="note">warning: {html.escape(msg)}</p>'
    sections.append((f"{label}Estimates", head + table_html(est)))
    kw = dict(dv_unit=dv_unit, time_unit=time_unit)
    log(f"{label}diagnostics: GOF, individual fits")
    diag = figure_html(dg.gof(fit, **kw), alt="goodness of fit")
    diag += figure_html(dg.individual_fits(fit, **kw), alt="individual fits")
    sections.append((f"{label}Goodness of fit", diag))
    log(f"{label}diagnostics: pcVPC ({n_sim} replicates)")
    sections.append((f"{label}Prediction-corrected VPC",
                     figure_html(dg.pcvpc(fit, n_sim, seed=seed, **kw), alt="pcVPC")))  # fmt: skip
    n_npde = max(n_sim, 10 * _max_obs(pop))
    log(f"{label}diagnostics: NPDE ({n_npde} replicates)")
    tab, fig = dg.npde(fit, n_npde, seed=seed + 1, **kw)
    t = tab.attrs["tests"]
    tests = pd.DataFrame([("mean (= 0)", t["mean"], t["mean_p"]),
                          ("variance (= 1)", t["variance"], t["variance_p"]),
                          ("normality (Shapiro-Wilk)", np.nan, t["shapiro_p"])],
                         columns=["test", "value", "p-value"])  # fmt: skip
    sections.append((f"{label}NPDE", figure_html(fig, alt="NPDE") + table_html(tests)))
    if fit.model.eta_names:
        sections.append((f"{label}Random effects", figure_html(dg.eta_pairs(fit, seed=seed),
                                                               alt="eta pairs")))  # fmt: skip


def _max_obs(pop) -> int:
    t = pop.table
    obs = t[(t["EVID"] == 0) & (t["MDV"] == 0)]
    return int(obs.groupby("ID").size().max()) if len(obs) else 1


def _joint_sections(joint, *, seed: int, sections: list, log) -> None:
    from . import diagnostics as dg

    log("joining: prior pair plots")
    text = (f"<p>{len(joint.fits)} endpoint models coupled through a <b>{html.escape(joint.kind)}"
            f"</b> joint prior over {len(joint.eta_names)} random effects "
            f"({html.escape(', '.join(joint.eta_names))}).</p>")  # fmt: skip
    import jax

    xs = np.asarray(joint.prior.sample(jax.random.key(seed), (4000,)))
    corr = pd.DataFrame(np.corrcoef(xs, rowvar=False), columns=list(joint.eta_names))
    corr.insert(0, "eta", list(joint.eta_names))
    text += "<p>Correlation of the joint prior (4000 draws):</p>" + table_html(corr, digits=3)
    text += figure_html(dg.eta_pairs(joint, seed=seed), alt="joined prior pairs")
    if joint.losses and "val" in joint.losses:
        import matplotlib.pyplot as plt

        fig, a = plt.subplots(figsize=(6, 3.4))
        for k, v in joint.losses.items():
            a.plot(np.arange(1, len(v) + 1), v, label=f"{k} loss")
        a.set_xlabel("epoch")
        a.set_ylabel("negative log-likelihood (nats / sample)")
        a.set_title("flow training")
        a.legend()
        fig.tight_layout()
        text += figure_html(fig, alt="flow losses")
    sections.append(("Joining", text))


def report(obj, path="report.html", *, extra_sections=(), title: str | None = None,
           n_sim: int = 200, seed: int = 0, dv_unit: str = "", time_unit: str = "h",
           progress=None) -> Path:  # fmt: skip
    """Write one self-contained HTML report.

    - `obj`: a `Fit`, a `JointModel` (each endpoint fit, then the joining section) or a list
      of fits.
    - `extra_sections`: `(title, content)` pairs appended at the end; content is a matplotlib
      Figure, a DataFrame or an HTML string (e.g. amortized forecasts, a virtual cohort).
    - `n_sim`: replicates for the pcVPC (NPDE uses at least 10x the most observations of a
      subject); `seed` makes the simulations reproducible.
    - `progress`: a callable taking a message (e.g. `print`), or None.

    Returns the path written. The file is written atomically (no partial file on error).
    """
    from .nlme._result import Fit

    log = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    joint = obj if hasattr(obj, "fits") and hasattr(obj, "prior") else None
    fits = joint.fits if joint is not None else (list(obj) if isinstance(obj, list | tuple)
                                                 else [obj])  # fmt: skip
    for f in fits:
        if not isinstance(f, Fit):
            raise TypeError(f"report needs a Fit, a list of Fits or a JointModel, got {type(f)}")
    for t, content in extra_sections:  # check before the (slow) diagnostics
        if not (content is None or isinstance(content, pd.DataFrame | str)
                or hasattr(content, "savefig")):  # fmt: skip
            _content(content, str(t))
    sections: list[tuple[str, str]] = []
    for k, f in enumerate(fits):
        label = f"Endpoint {k}: " if len(fits) > 1 else ""
        _fit_sections(f, label=label, n_sim=n_sim, seed=seed, dv_unit=dv_unit,
                      time_unit=time_unit, sections=sections, log=log)  # fmt: skip
    if joint is not None:
        _joint_sections(joint, seed=seed, sections=sections, log=log)
    for t, content in extra_sections:
        sections.append((str(t), _content(content, str(t))))
    title = title or (f"popkin report: {fits[0].model.name}" if joint is None
                      else f"popkin report: {joint.kind} join of {len(fits)} models")  # fmt: skip
    nav = " ".join(f'<a href="#{_slug(t)}">{html.escape(t)}</a>' for t, _ in sections)
    body = "".join(f'<h2 id="{_slug(t)}">{html.escape(t)}</h2>\n{c}\n' for t, c in sections)
    from . import __version__

    doc = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
           f"<h1>{html.escape(title)}</h1><p class=\"note\">popkin {__version__}; generated "
           f"{time.strftime('%Y-%m-%d %H:%M')} in {time.perf_counter() - t0:.0f} s; seed {seed}."
           f"</p><nav>{nav}</nav>{body}</body></html>\n")  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(doc, encoding="utf-8")
    tmp.replace(path)
    return path
