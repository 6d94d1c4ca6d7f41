"""Build the tiny random-initialised SD model used by tests: python scripts/make_tiny_sd.py OUT_DIR"""

import argparse

from loracraft.infer.testing import build_tiny_sd

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    a = p.parse_args()
    print(build_tiny_sd(a.out_dir, seed=a.seed, prediction_type=a.prediction_type))
