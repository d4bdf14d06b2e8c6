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
        tmp = out.with_suffix(out.suffix + ".tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(out)
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


def main():  # pragma: no cover
    app()
