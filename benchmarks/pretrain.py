"""Pre-train the in-context PK model from a config (the script behind `popkin pretrain`).

    python benchmarks/pretrain.py CONFIG.json OUT_DIR [--max-seconds S] [--no-progress]

Resumes from OUT_DIR when it holds a checkpoint of the same config. Float64 is switched off
in this process (pre-training is float32 throughout; NLME is not used here).
"""

from __future__ import annotations

import argparse
import sys

import jax


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("out")
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    import popkin  # noqa: F401
    from popkin.amortized._train import TrainConfig, train

    jax.config.update("jax_enable_x64", False)
    cfg = TrainConfig.load(a.config)
    print(f"devices: {jax.devices()}", flush=True)
    _, log = train(cfg, a.out, progress=not a.no_progress, max_seconds=a.max_seconds)
    last = log[-1] if log else {}
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in last.items()}, flush=True)
    vals = [e for e in log if "val_loss" in e]
    for e in vals:
        print(f"step {e['step']:6d} val {e['val_loss']:.4f} (attn {e['val_attention']:.4f}, "
              f"phys {e['val_physics']:.4f}) t {e['seconds']:.0f}s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
