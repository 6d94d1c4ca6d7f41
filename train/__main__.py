"""``python -m loracraft.train CONFIG [overrides]`` — what ``accelerate launch -m`` and ``torchrun -m`` run."""

import sys

from loracraft.train.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
