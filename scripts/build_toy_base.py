"""Build the toy base model (resumable):
python scripts/build_toy_base.py --out infer/assets/toy-base --work /tmp/toybase-work"""

import argparse
import os
import shlex
import sys

# Other jobs share the 2 cores; OpenMP threads that spin-wait for a busy core made a UNet
# step up to 7x slower here. Must be set before torch initialises OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="infer/assets/toy-base", help="pipeline folder to write")
    p.add_argument("--work", default="/tmp/toybase-work", help="state of the (resumable) build")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    a = p.parse_args()

    from toy_base import ToyBaseConfig, build_toy_base

    cfg = ToyBaseConfig(seed=a.seed)
    if a.vae_steps is not None:
        cfg.vae_steps = a.vae_steps
    if a.unet_steps is not None:
        cfg.unet_steps = a.unet_steps
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    print(build_toy_base(a.out, a.work, cfg, command=command))
