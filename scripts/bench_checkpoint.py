"""Checkpoint cost: python scripts/bench_checkpoint.py [--base MODEL_DIR] (default: tiny model)."""

import argparse
import json

from bench.checkpoint import measure

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--base", help="diffusers model folder with 32 px-capable UNet (default: build the tiny one)")
    p.add_argument("--repeats", type=int, default=5)
    r = measure(p.parse_args().base, p.parse_args().repeats)
    print(f"step {r['step_s'] * 1000:.1f} ms, checkpoint {r['checkpoint_s'] * 1000:.1f} ms "
          f"= {r['checkpoint_over_step']:.2f} x a training step; "
          f"{r['checkpoint_bytes'] / 1024:.0f} KiB on disk = {r['size_over_adapter']:.2f} x the fp32 adapter")
    print(json.dumps(r, indent=2))
