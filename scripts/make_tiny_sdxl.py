"""Build the tiny random-initialised SDXL model used by tests: python scripts/make_tiny_sdxl.py OUT_DIR"""

import argparse

from loracraft.infer.testing import build_tiny_sdxl

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    print(build_tiny_sdxl(a.out_dir, seed=a.seed))
