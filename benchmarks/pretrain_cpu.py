"""Issue 5: can the small config be pre-trained on 2 CPU cores within 2 hours?

Measures the CPU training throughput of a shipped config (default: the small in-context model,
`src/popkin/amortized/configs/small.json`, batch 64) with the real training step
(`popkin.amortized.train`: sampling from the prior, ELBO of both decoders, AdamW update), warm:
the first `--warmup` steps (compilation) are excluded, then `--steps` steps are timed. It then
projects the wall time of the full schedule and of the step where the shipped checkpoint's
validation loss (trained by the same code on a GPU, same config and seed, so the same loss
curve up to float reordering) first came within 10 % of its final value.

Writes benchmarks/results/pretrain_cpu.json and .md. This is a projection from measured
throughput, not a 2-hour run; the machine's load average is recorded (other work on the machine
slows the measured rate, so the projection is an upper bound for an idle machine).

Run: `.venv/bin/python benchmarks/pretrain_cpu.py [--config small] [--steps 40]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small", help="shipped config / checkpoint name")
    ap.add_argument("--steps", type=int, default=40, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--run",
        type=Path,
        default=None,
        help="summarise a finished CPU training run instead (its checkpoint folder, trained "
        "with `popkin pretrain CONFIG -o DIR`): writes pretrain_cpu_run.json / .md",
    )
    ap.add_argument("--note", default="", help="how the run was made (cores, other load)")
    args = ap.parse_args(argv)
    if args.run is not None:
        return summarise_run(args.run, args.note, args.out)
    import popkin  # noqa: F401
    from popkin.amortized._train import TrainConfig, train

    jax.config.update("jax_enable_x64", False)
    pkg = Path(popkin.__file__).parent / "amortized"
    cfg = TrainConfig.load(pkg / "configs" / f"{args.config}.json")
    shipped = json.loads((pkg / "checkpoints" / args.config / "log.json").read_text())
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        n = args.warmup + args.steps
        run = dataclasses.replace(cfg, steps=n, val_studies=0, checkpoint_every=n)
        _, log = train(run, tmp, progress=False)
    sec = [e["seconds"] for e in log]
    rate = args.steps / (sec[-1] - sec[args.warmup - 1])
    vals = [(e["step"], e["val_loss"]) for e in shipped if "val_loss" in e]
    final = vals[-1][1]
    useful = next(s for s, v in vals if v <= final + 0.1 * abs(final))
    result = {
        "config": args.config,
        "batch": cfg.batch,
        "steps_full": cfg.steps,
        "cpu_steps_per_s": rate,
        "cpu_projected_full_h": cfg.steps / rate / 3600,
        "val_final_shipped": final,
        "steps_to_within_10pct_of_final": useful,
        "cpu_projected_useful_h": useful / rate / 3600,
        "target_h": 2.0,
        "timed_steps": args.steps,
        "compile_and_warmup_s": sec[args.warmup - 1],
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        },  # fmt: skip
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrain_cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        f"CPU pre-training throughput of the `{args.config}` config (batch {cfg.batch}), "
        f"{os.cpu_count()} cores, load average {load0[0]:.1f} at start.",
        "",
        "| steps/s | full schedule | to within 10 % of final val loss | target |",
        "|---|---|---|---|",
        f"| {rate:.2f} | {cfg.steps} steps: {result['cpu_projected_full_h']:.2f} h | "
        f"{useful} steps: {result['cpu_projected_useful_h']:.2f} h | <= 2 h |",
    ]
    (args.out / "pretrain_cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def summarise_run(run: Path, note: str, out: Path) -> int:
    """Wall time, validation curve and final validation loss of an actual CPU training run,
    next to the shipped `small` checkpoint's final validation loss (same validation set: the
    prior's fixed held-out studies, same seed)."""
    import popkin

    meta = json.loads((run / "meta.json").read_text())
    log = json.loads((run / "log.json").read_text())
    cfg = meta.get("config", {})
    vals = [(e["step"], e["val_loss"], e["seconds"]) for e in log if "val_loss" in e]
    pkg = Path(popkin.__file__).parent / "amortized" / "checkpoints"
    small = [e for e in json.loads((pkg / "small" / "log.json").read_text()) if "val_loss" in e]
    small_batch = json.loads((pkg / "small" / "meta.json").read_text())["config"]["batch"]
    result = {
        "config": cfg.get("name"),
        "model": cfg.get("model"),
        "batch": cfg.get("batch"),
        "steps": log[-1]["step"],
        "steps_config": cfg.get("steps"),
        "wall_h": log[-1]["seconds"] / 3600,
        "val_curve": [{"step": s, "val_loss": v, "hours": t / 3600} for s, v, t in vals],
        "val_final": vals[-1][1],
        "val_final_small_gpu": small[-1]["val_loss"],
        "val_small_at_same_examples": next(
            (
                e["val_loss"]
                for e in small
                if e["step"] * small_batch >= log[-1]["step"] * cfg["batch"]
            ),
            None,
        ),
        "target_h": 2.0,
        "note": note,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_cpu_run.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [
        f"CPU training run of the `{result['config']}` config ({note}).",
        "",
        "| steps | wall (h) | final val loss | small (GPU) final val loss | target |",
        "|---|---|---|---|---|",
        f"| {result['steps']} | {result['wall_h']:.2f} | {result['val_final']:.3f} | "
        f"{result['val_final_small_gpu']:.3f} | <= 2 h |",
    ]
    (out / "pretrain_cpu_run.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
