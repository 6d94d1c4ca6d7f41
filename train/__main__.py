"""``python -m loracraft.train CONFIG [overrides]`` — what ``accelerate launch -m`` and ``torchrun -m`` run."""

import sys

from loracraft.train.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    flags = [a for a in args if a == "--debug"]
    sys.exit(main([*flags, "train", *[a for a in args if a != "--debug"]]))
