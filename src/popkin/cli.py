"""The `popkin` command line (typer + rich). Errors are one clear message; --debug shows more."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="popkin: population PK/PD estimation, joining and amortized forecasting.",
)
console = Console()
_state = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")):
    _state["debug"] = debug
    from ._config import enable_compilation_cache

    enable_compilation_cache()


def _fail(e: BaseException) -> None:
    if _state["debug"]:
        raise e
    console.print(f"[bold red]error:[/] {e}")
    console.print("[dim](run with --debug for the traceback)[/]")
    raise typer.Exit(code=2)


def load_model(spec: str, class_name: str | None = None):
    """A built-in model name (see `popkin.models.library.MODELS`) or a Python file path."""
    from .models._model import Model
    from .models.library import MODELS

    if spec in MODELS:
        return MODELS[spec]()
    path = Path(spec)
    if not path.exists():
        raise ValueError(
            f"model {spec!r} is neither a built-in model ({', '.join(MODELS)}) nor an existing "
            "Python file"
        )
    mod_name = f"popkin_user_model_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[mod_name] = module
    loader.loader.exec_module(module)
    classes = [
        v
        for v in vars(module).values()
        if isinstance(v, type)
        and issubclass(v, Model)
        and v is not Model
        and v.__module__ == mod_name
    ]
    if class_name:
        classes = [c for c in classes if c.__name__ == class_name]
    if len(classes) != 1:
        names = [c.__name__ for c in classes]
        raise ValueError(
            f"{path}: expected exactly one popkin.Model subclass"
            + (f" named {class_name}" if class_name else "")
            + f", found {names or 'none'}; use --model-class NAME"
        )
    return classes[0]()


@app.command()
def fit(
    model: str = typer.Argument(..., help="Built-in model name or a Python file defining one."),
    data: Path = typer.Argument(..., help="NONMEM-style CSV (ID, TIME, DV, AMT, EVID, ...)."),
    method: str = typer.Option("focei", help="fo | foce | focei | laplace"),
    out: Path = typer.Option(None, "--out", "-o", help="Where to save the fit (JSON)."),
    covariance: str = typer.Option("r", help="r | sandwich | none"),
    model_class: str = typer.Option(None, help="Model class name when the file has several."),
    maxeval: int = typer.Option(500, help="Maximum objective evaluations (0: evaluate only)."),
):
    """Estimate a model. Example: `popkin fit theophylline theo.csv -o theo_fit.json`."""
    try:
        from .data._reader import read_nonmem
        from .nlme import fit as run_fit

        m = load_model(model, model_class)
        pop = read_nonmem(data)
        console.print(f"{pop}")
        cov = None if covariance == "none" else covariance
        f = run_fit(m, pop, method, covariance=cov, maxeval=maxeval, progress=True)
        console.print(f.summary())
        out = out or data.with_suffix(".fit.json")
        f.save(out)
        console.print(f"saved fit to [bold]{out}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command()
def simulate(
    model: str = typer.Argument(..., help="Built-in model name or a Python file defining one."),
    design: Path = typer.Argument(..., help="NONMEM-style CSV giving doses and sampling times."),
    out: Path = typer.Option(..., "--out", "-o", help="Output CSV (NONMEM layout)."),
    seed: int = typer.Option(0, help="Random seed."),
    replicates: int = typer.Option(1, help="Number of replicates of the design."),
    fit_file: Path = typer.Option(None, "--fit", help="Simulate at a saved fit's estimates."),
    model_class: str = typer.Option(None, help="Model class name when the file has several."),
):
    """Simulate a design. Example: `popkin simulate theophylline theo.csv -o sim.csv`."""
    try:
        import jax

        from .data._reader import read_nonmem
        from .nlme import load_fit
        from .simulate import simulate as run_sim

        m = load_model(model, model_class)
        params = load_fit(fit_file, model=m).params if fit_file else None
        pop = read_nonmem(design)
        df = run_sim(m, pop, params, key=jax.random.key(seed), n_replicates=replicates)
        from ._io import atomic_path

        with atomic_path(out) as tmp:  # no partial CSV on an error or Ctrl-C
            df.to_csv(tmp, index=False)
        console.print(f"wrote {len(df)} rows to [bold]{out}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="Output folder."),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Run the demo: fit theophylline, diagnostics, simulated band. Writes OUT/."""
    try:
        from .demo import run_demo

        t0 = time.perf_counter()
        files = run_demo(out, seed=seed, console=console)
        console.print(f"[green]demo finished in {time.perf_counter() - t0:.0f}s[/]; wrote:")
        for f in files:
            console.print(f"  {f}")
    except Exception as e:  # noqa: BLE001
        _fail(e)


# -- join / evaluate / report (self-contained block) -------------------------------------------


def _load_fits(paths: list[Path], models: list[str] | None, model_class: str | None = None):
    """Saved fits, with `--model SPEC` (one per fit, in order) where a class cannot be imported."""
    from .nlme import load_fit

    if models and len(models) != len(paths):
        raise ValueError(f"give --model once per fit ({len(paths)}), got {len(models)}")
    out = []
    for k, p in enumerate(paths):
        if not p.exists():
            raise ValueError(f"{p}: no such file; give a fit saved by `popkin fit ... -o FIT.json`")
        m = load_model(models[k], model_class) if models else None
        out.append(load_fit(p, model=m))
    return out


def _load_joint(path: Path, models: list[str] | None):
    from .join import load_joint

    if not path.exists():
        raise ValueError(f"{path}: no such file; create one with `popkin join FIT1 FIT2 -o {path}`")
    ms = [load_model(m) for m in models] if models else None
    return load_joint(path, models=ms)


@app.command()
def join(
    fits: list[Path] = typer.Argument(
        ..., help="Saved fits (JSON from `popkin fit`), one per endpoint."
    ),
    prior: str = typer.Option("gaussian", help="gaussian | flow"),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the joint model (JSON)."),
    seed: int = typer.Option(0, help="Random seed (posterior draws, flow training)."),
    n_samples: int = typer.Option(50, help="Posterior draws per subject for the joint prior."),
    model: list[str] = typer.Option(
        None, "--model", help="Model (name or .py) per fit, when its class cannot be imported."
    ),
):
    """Join independently fitted endpoint models through a joint prior over their random effects.

    Example: `popkin join pk_fit.json pd_fit.json --prior flow -o joined.json`
    """
    try:
        import jax
        import numpy as np

        from .join import join as run_join

        if prior not in ("gaussian", "flow"):
            raise ValueError(f"--prior must be 'gaussian' or 'flow', got {prior!r}")
        fs = _load_fits(fits, model)
        with console.status(f"fitting a {prior} joint prior ..."):
            joint = run_join(fs, prior, key=jax.random.key(seed), n_samples=n_samples)
        xs = np.asarray(joint.prior.sample(jax.random.key(seed + 1), (4000,)))
        corr = np.corrcoef(xs, rowvar=False)
        from rich.table import Table

        table = Table(title=f"{joint.kind} joint prior: correlation of 4000 draws")
        table.add_column("")
        for n in joint.eta_names:
            table.add_column(n, justify="right")
        for n, row in zip(joint.eta_names, corr, strict=True):
            table.add_row(n, *(f"{v:.3f}" for v in row))
        console.print(table)
        joint.save(out)
        console.print(f"saved joint model to [bold]{out}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command()
def evaluate(
    joined: Path = typer.Argument(..., help="Joint model saved by `popkin join`."),
    heldout: list[Path] = typer.Argument(
        ..., help="Held-out NONMEM CSVs, one per fit, same subjects."
    ),
    n_is: int = typer.Option(1000, help="Importance-sampling draws per subject."),
    seed: int = typer.Option(0, help="Random seed (importance sampling)."),
    out: Path = typer.Option(None, "--out", "-o", help="Per-subject results (CSV)."),
    model: list[str] = typer.Option(
        None, "--model", help="Model (name or .py) per fit, when its class cannot be imported."
    ),
):
    """Held-out log-likelihood of the joint prior against the independent one (Laplace and IS).

    Example: `popkin evaluate joined.json pk_test.csv pd_test.csv -o heldout.csv`
    """
    try:
        import warnings

        import jax
        import numpy as np
        import pandas as pd

        from .data._reader import read_nonmem

        joint = _load_joint(joined, model)
        if len(heldout) != len(joint.fits):
            raise ValueError(
                f"{joined} joins {len(joint.fits)} fits; give {len(joint.fits)} held-out CSVs "
                f"(one per fit, in the order of `popkin join`), got {len(heldout)}"
            )
        pops = [read_nonmem(p) for p in heldout]
        key = jax.random.key(seed)
        with console.status("evaluating the held-out marginal likelihood ..."):
            with warnings.catch_warnings():  # reported below, per prior, as one line
                warnings.simplefilter("ignore", RuntimeWarning)
                lj = joint.log_likelihood(pops, n_is=n_is, key=key)
                li = joint.log_likelihood(pops, joint.independent, n_is=n_is, key=key)
        res = pd.DataFrame({"ID": lj["ID"], "ll_joint_laplace": lj["ll_laplace"],
                            "ll_joint_is": lj["ll_is"], "ll_indep_laplace": li["ll_laplace"],
                            "ll_indep_is": li["ll_is"], "ess_joint": lj["ess"],
                            "converged": lj["converged"] & li["converged"]})  # fmt: skip
        res["laplace_defined"] = np.isfinite(res["ll_joint_laplace"]) & np.isfinite(
            res["ll_indep_laplace"]
        )
        res["dll_laplace"] = res["ll_joint_laplace"] - res["ll_indep_laplace"]
        res["dll_is"] = res["ll_joint_is"] - res["ll_indep_is"]
        n = len(res)
        for col, name in [("laplace", "Laplace"), ("is", f"IS ({n_is} draws)")]:
            ok = res["laplace_defined"] if col == "laplace" else np.isfinite(res["dll_is"])
            d = res.loc[ok, f"dll_{col}"]
            m = len(d)
            se = d.std(ddof=1) * m**0.5 if m > 1 else float("nan")
            console.print(f"ΔLL {name}: {d.sum():.2f} ± {se:.2f} nats over {m} subjects "
                          f"(joint {res.loc[ok, f'll_joint_{col}'].sum():.2f}, independent "
                          f"{res.loc[ok, f'll_indep_{col}'].sum():.2f})")  # fmt: skip
            if m < n:
                console.print(f"[yellow]warning:[/] {name} undefined for {n - m} of {n} "
                              "subjects (non-PD Hessian at the mode); they are left out of "
                              "this sum and are NaN in the CSV")  # fmt: skip
        bad = int((~res["converged"]).sum())
        if bad:
            console.print(f"[yellow]warning:[/] mode search did not converge for {bad} subjects")
        if out is not None:
            tmp = out.with_suffix(out.suffix + ".tmp")
            res.to_csv(tmp, index=False)
            tmp.replace(out)
            console.print(f"wrote per-subject results to [bold]{out}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command()
def report(
    fit_or_results: Path = typer.Argument(
        ..., help="A saved fit (`popkin fit`) or joint model (`popkin join`)."
    ),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    n_sim: int = typer.Option(200, help="Simulated replicates for the pcVPC / NPDE."),
    seed: int = typer.Option(0, help="Random seed for the simulations."),
    dv_unit: str = typer.Option("", help="Unit of DV for axis labels, e.g. mg/L."),
    time_unit: str = typer.Option("h", help="Unit of TIME for axis labels."),
    model: list[str] = typer.Option(
        None, "--model", help="Model (name or .py) per fit, when its class cannot be imported."
    ),
):
    """Write a self-contained HTML report (figures embedded): model, data, estimates, GOF,
    pcVPC, NPDE, eta pairs, individual fits, and the joining results for a joint model.

    Example: `popkin report theo_fit.json -o report.html --dv-unit mg/L`
    """
    try:
        import json

        from .report import report as run_report

        if not fit_or_results.exists():
            raise ValueError(f"{fit_or_results}: no such file; give a file saved by `popkin fit` "
                             "or `popkin join`")  # fmt: skip
        try:
            fmt = json.loads(fit_or_results.read_text()).get("format")
        except (ValueError, UnicodeDecodeError, AttributeError):
            fmt = None
        if fmt == "popkin-joint":
            obj = _load_joint(fit_or_results, model)
        elif fmt == "popkin-fit":
            obj = _load_fits([fit_or_results], model)[0]
        else:
            raise ValueError(f"{fit_or_results}: not a popkin fit or joint-model file; create one "
                             "with `popkin fit ... -o FIT.json` or `popkin join ... -o J.json`")  # fmt: skip
        with console.status("writing the report (simulating for pcVPC and NPDE) ...") as st:
            path = run_report(obj, out, n_sim=n_sim, seed=seed, dv_unit=dv_unit,
                              time_unit=time_unit, progress=lambda m: st.update(m))  # fmt: skip
        console.print(f"wrote [bold]{path}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


# -- bootstrap (self-contained block) -----------------------------------------------------------


@app.command()
def bootstrap(
    model: str = typer.Argument(..., help="Built-in model name or a Python file defining one."),
    data: Path = typer.Argument(..., help="NONMEM-style CSV the model is fitted to."),
    n: int = typer.Option(200, "--n", help="Number of bootstrap replicates."),
    seed: int = typer.Option(0, help="Random seed (which subjects each replicate draws)."),
    scheduler: str = typer.Option(
        None,
        help="Dask scheduler address (tcp://host:8786); 'serial' runs in this process; "
        "default: a local cluster of --workers processes.",
    ),
    workers: int = typer.Option(2, help="Workers of the local cluster (when no --scheduler)."),
    method: str = typer.Option("focei", help="fo | foce | focei | laplace"),
    fit_file: Path = typer.Option(None, "--fit", help="Start from a saved fit instead of fitting."),
    level: float = typer.Option(0.95, help="Confidence level of the percentile intervals."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to save the replicates (JSON)."),
    table: Path = typer.Option(None, help="Also write the intervals as CSV here."),
    model_class: str = typer.Option(None, help="Model class name when the file has several."),
):
    """Nonparametric case bootstrap: percentile CIs and the share of failed replicates.

    Example: `popkin bootstrap theophylline theo.csv --n 200 --seed 0 -o boot.json`
    """
    try:
        import sys as _sys

        from ._io import atomic_path
        from .data._reader import read_nonmem
        from .nlme import bootstrap as run_bootstrap
        from .nlme import fit as run_fit
        from .nlme import load_fit
        from .parallel import SERIAL
        from .parallel import client as make_client

        if n < 1:
            raise ValueError(f"--n must be >= 1, got {n}")
        if not 0 < level < 1:
            raise ValueError(f"--level must be in (0, 1), got {level}")
        m = load_model(model, model_class)
        mod = _sys.modules.get(type(m).__module__)
        if scheduler != SERIAL and mod and mod.__name__.startswith("popkin_user_model_"):
            import cloudpickle

            cloudpickle.register_pickle_by_value(mod)  # workers cannot import a model file
        if fit_file is not None:
            base = load_fit(fit_file, model=m)
        else:
            pop = read_nonmem(data)
            console.print(f"{pop}")
            base = run_fit(m, pop, method, covariance=None, progress=True)
            console.print(f"original fit: OFV {base.ofv:.4f}, status {base.status.name}")
        if scheduler == SERIAL:
            res = run_bootstrap(base, n, seed=seed, scheduler=SERIAL)
        else:
            with make_client(scheduler, n_workers=workers) as c:
                console.print(f"dask: {c}")
                res = run_bootstrap(base, n, seed=seed, client=c)
        console.print(res.summary(level))
        res.save(out)
        console.print(f"saved {res.n} replicates to [bold]{out}[/]")
        if table is not None:
            with atomic_path(table) as tmp:
                res.ci(level).to_csv(tmp, index=False)
            console.print(f"wrote intervals to [bold]{table}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


# -- amortized in-context models ------------------------------------------------------------


def _times(spec: str) -> list[float]:
    """'0.5,1,2' or 'start:stop:n' (n evenly spaced times, both ends included)."""
    import numpy as np

    try:
        if ":" in spec:
            a, b, n = spec.split(":")
            return [float(x) for x in np.linspace(float(a), float(b), int(n))]
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--times {spec!r}: expected '0.5,1,2' or 'start:stop:n'") from None


@app.command()
def pretrain(
    config: Path = typer.Argument(
        ...,
        help="Training config (JSON or TOML), e.g. the shipped "
        "src/popkin/amortized/configs/small.json.",
    ),  # fmt: skip
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder (resumed if present)."),
    max_minutes: float = typer.Option(None, help="Stop (checkpointed) after this many minutes."),
    data_parallel: bool = typer.Option(False, help="Shard each batch over all local devices."),
):
    """Pre-train the in-context PK model on the synthetic prior, with checkpoints and resume.

    Example: `popkin pretrain small.json -o runs/small --max-minutes 60` (run it again to resume).
    """
    try:
        from .amortized import TrainConfig, train

        cfg = TrainConfig.load(config)  # the model and data are float32 throughout
        _, log = train(cfg, out, max_seconds=None if max_minutes is None else 60 * max_minutes,
                       data_parallel=data_parallel)  # fmt: skip
        last = log[-1] if log else {}
        console.print(f"step {last.get('step', 0)}/{cfg.steps}, loss {last.get('loss', float('nan')):.4f}; "
                      f"checkpoint in [bold]{out}[/]")  # fmt: skip
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command()
def forecast(
    context: Path = typer.Argument(..., help="NONMEM CSV of the study's other individuals."),
    target: Path = typer.Argument(
        ..., help="NONMEM CSV of the new individual: doses + early samples."
    ),
    times: str = typer.Option(..., help="Forecast times: '1,2,4' or 'start:stop:n' (h)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output CSV (TIME, PRED, LO90..HI90)."),
    model: str = typer.Option("small", help="Shipped checkpoint name or a checkpoint folder."),
    decoder: str = typer.Option("attention", help="attention | physics"),
    png: Path = typer.Option(None, help="Also draw the forecast band to this PNG."),
    seed: int = typer.Option(0, help="Random seed of the Monte Carlo draws."),
):
    """Zero-shot forecast of a new individual from the study context, in one forward pass.

    Example: `popkin forecast others.csv new.csv --times 0:24:49 -o forecast.csv --png f.png`
    """
    try:
        from ._io import atomic_path
        from .amortized import forecast as run_forecast
        from .data._reader import read_nonmem

        tgt = read_nonmem(target)
        df = run_forecast(
            read_nonmem(context), tgt, _times(times), model=model, decoder=decoder, seed=seed
        )
        with atomic_path(out) as tmp:
            df.to_csv(tmp, index=False)
        console.print(f"wrote {len(df)} forecast times to [bold]{out}[/]")
        if png is not None:
            from .diagnostics import forecast_band

            obs = tgt.table[tgt.table.EVID == 0]
            fig = forecast_band(df.TIME, df.PRED, df.LO90, df.HI90, observed=(obs.TIME, obs.DV))
            with atomic_path(png) as tmp:
                fig.savefig(tmp, dpi=120, format="png")
            console.print(f"wrote [bold]{png}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


@app.command()
def generate(
    context: Path = typer.Argument(..., help="NONMEM CSV of the study (the context)."),
    dosing: Path = typer.Argument(..., help="NONMEM CSV with the dose rows of the new regimen."),
    n: int = typer.Option(50, help="Number of virtual individuals."),
    times: str = typer.Option(..., help="Sampling times: '1,2,4' or 'start:stop:n' (h)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output CSV (ID, TIME, DV, PRED)."),
    model: str = typer.Option("small", help="Shipped checkpoint name or a checkpoint folder."),
    decoder: str = typer.Option("attention", help="attention | physics"),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Virtual individuals for a study context under a (possibly new) dosing regimen.

    Example: `popkin generate theo.csv bid.csv --n 100 --times 0:48:97 -o cohort.csv`
    """
    try:
        from ._io import atomic_path
        from .amortized import generate as run_generate
        from .data._reader import read_nonmem

        df = run_generate(read_nonmem(context), read_nonmem(dosing), n, _times(times), model=model,
                          decoder=decoder, seed=seed)  # fmt: skip
        with atomic_path(out) as tmp:
            df.to_csv(tmp, index=False)
        console.print(f"wrote {n} virtual individuals ({len(df)} rows) to [bold]{out}[/]")
    except Exception as e:  # noqa: BLE001
        _fail(e)


def main():  # pragma: no cover
    app()
