"""Scale-out on Dask: serial vs a 2-worker local cluster, wall seconds, same process.

Two workloads, both on the theophylline FOCE-I problem (`popkin.models.library.Theophylline`,
`popkin.datasets.theophylline()`, the nlmixr2 reference fit of `popkin.reference`):

- `endpoint_fits_8`: 8 independent FOCE-I fits (R-matrix covariance step), each to a data set
  simulated from the reference fit's estimates on the theophylline design (seeds 0..7), via
  `popkin.parallel.fit_many`.
- `bootstrap_200`: a 200-replicate case bootstrap of the reference fit (`popkin.bootstrap`,
  seed 0).

Both paths are warm: the serial path after one fit in this process, the cluster after one fit on
each worker (that warm-up is reported as `cluster_warmup_s`: start-up plus compilation). The
cluster is `LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`. The results of the
two paths are checked to be identical. The machine is shared; the load average is recorded at
the start and end. Run: `.venv/bin/python benchmarks/scaling.py [--n-boot 200] [--n-fits 8]`.

Workers import popkin when they start, after this process did: run from a tree nobody is
editing (the committed results ran from `git archive HEAD` with `PYTHONPATH` pointing at it and
`POPKIN_BENCH_CODE` naming it, recorded as `code` in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import jax
import numpy as np

import popkin
from popkin.models.library import Theophylline

RESULTS = Path(__file__).resolve().parent / "results"


def _warm(_):
    import popkin
    from popkin.models.library import Theophylline

    f = popkin.fit(Theophylline(), popkin.datasets.theophylline(), covariance="r")
    return f.ofv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--n-fits", type=int, default=8)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    model = Theophylline()
    pop = popkin.datasets.theophylline()
    t0 = time.perf_counter()
    ref = popkin.fit(model, pop, "focei")
    compile_serial = time.perf_counter() - t0
    sims = [
        popkin.simulate(model, pop, ref.params, key=jax.random.key(s))[pop.table.columns]
        for s in range(args.n_fits)
    ]
    jobs = [(model, popkin.read_nonmem(d), {"method": "focei"}) for d in sims]
    rows = []

    with popkin.parallel.client(n_workers=2, threads_per_worker=1) as c:
        t0 = time.perf_counter()
        workers = list(c.scheduler_info()["workers"])
        c.gather([c.submit(_warm, w, workers=[w], pure=False) for w in workers])
        warmup = time.perf_counter() - t0

        # 8 endpoint fits
        t0 = time.perf_counter()
        ser = popkin.parallel.fit_many(jobs, scheduler="serial", progress=False)
        t_ser = time.perf_counter() - t0
        t0 = time.perf_counter()
        par = popkin.parallel.fit_many(jobs, client=c, progress=False)
        t_par = time.perf_counter() - t0
        same = all(
            a.ofv == b.ofv and np.array_equal(a.u_hat, b.u_hat)
            for a, b in zip(ser, par, strict=True)
        )
        diff = max(float(np.max(np.abs(a.u_hat - b.u_hat))) for a, b in zip(ser, par, strict=True))
        rows.append(
            dict(
                task=f"endpoint_fits_{args.n_fits}",
                n=args.n_fits,
                serial_s=t_ser,
                cluster_s=t_par,
                ratio=t_ser / t_par,
                identical=same,
                max_abs_diff=diff,
                statuses=sorted({f.status.name for f in ser}),
            )
        )
        print(rows[-1], flush=True)

        # bootstrap
        t0 = time.perf_counter()
        bs = popkin.bootstrap(ref, args.n_boot, seed=0, scheduler="serial", progress=False)
        t_ser = time.perf_counter() - t0
        t0 = time.perf_counter()
        bp = popkin.bootstrap(ref, args.n_boot, seed=0, client=c, progress=False)
        t_par = time.perf_counter() - t0
        same = np.array_equal(bs.estimates, bp.estimates, equal_nan=True) and bs.status == bp.status
        diff = float(np.nanmax(np.abs(bs.estimates - bp.estimates)))
        rows.append(
            dict(
                task=f"bootstrap_{args.n_boot}",
                n=args.n_boot,
                serial_s=t_ser,
                cluster_s=t_par,
                ratio=t_ser / t_par,
                identical=same,
                max_abs_diff=diff,
                failed_share=bp.failed_share,
            )
        )
        print(rows[-1], flush=True)
    ci = bp.ci(0.95)
    load_end = os.getloadavg()
    doc = {
        "code": os.environ.get("POPKIN_BENCH_CODE", "working tree"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": [round(x, 2) for x in load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
        },
        "cluster": {"n_workers": 2, "threads_per_worker": 1, "processes": True},
        "serial_first_fit_s": compile_serial,
        "cluster_warmup_s": warmup,
        "rows": rows,
        "bootstrap_ci": ci.to_dict(orient="records"),
        "reference_fit": {"ofv": ref.ofv, "status": ref.status.name},
        "runtime_s": time.perf_counter() - t_start,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(doc, indent=2, default=str))
    (args.out / "scaling.md").write_text(_markdown(doc))
    print(_markdown(doc))
    return 0


def _markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [
        "# Dask scale-out: serial vs 2-worker local cluster (warm wall seconds)",
        "",
        f"Machine: {m['cpus']} CPUs, {m['platform']}; load average {m['loadavg_start']} (start)"
        f" / {m['loadavg_end']} (end); the machine is shared with other jobs.",
        "",
        "| task | serial (s) | cluster (s) | ratio | results identical | max abs difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['task']} | {r['serial_s']:.1f} | {r['cluster_s']:.1f} | {r['ratio']:.2f} | "
            f"{'yes' if r['identical'] else 'no'} | {r['max_abs_diff']:.2g} |"
        )
    boot = next(r for r in doc["rows"] if r["task"].startswith("bootstrap"))
    lines += [
        "",
        f"Theophylline FOCE-I (OFV {doc['reference_fit']['ofv']:.3f}); endpoint fits: FOCE-I with"
        " R-matrix covariance on data simulated from the reference estimates; bootstrap: case "
        f"resampling, seed 0, failed replicates {100 * boot['failed_share']:.1f}%. Cluster warm-up "
        f"(start-up and compilation on both workers): {doc['cluster_warmup_s']:.0f} s; first "
        f"serial fit (compilation): {doc['serial_first_fit_s']:.0f} s. Total runtime "
        f"{doc['runtime_s']:.0f} s.",
        "",
        "Bootstrap 95% percentile intervals:",
        "",
        "| parameter | estimate | bootstrap SE | 2.5% | 97.5% |",
        "|---|---|---|---|---|",
    ]
    for r in doc["bootstrap_ci"]:
        lines.append(
            f"| {r['parameter']} | {r['estimate']:.4g} | {r['boot_se']:.3g} | "
            f"{r['ci_low']:.4g} | {r['ci_high']:.4g} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
