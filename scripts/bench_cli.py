"""What ``loracraft train`` costs per step against the bare UNet+LoRA floor, measured in one run.

    python scripts/bench_cli.py [--model sd15-small|tiny] [--short 10] [--long 130] [--rounds 3] [--json FILE]
    python scripts/bench_cli.py --model sd15 --device cuda --dtype fp16 --short 10 --long 60   (GPU)

Method: see ``bench.cli``. Prints one line per round and the median ratio (floor s/step over
the command line's s/step; 1.0 = the command line adds nothing to the bare step).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from bench.args import dataclass_parser, from_args, work_root
from bench.cli import CliBench, measure


def main(argv: list[str] | None = None) -> int:
    p = dataclass_parser(CliBench, __doc__, skip=("overrides",))
    p.add_argument(
        "--override", action="append", default=[], metavar="KEY=VALUE", help="extra loracraft override"
    )
    a = p.parse_args(argv)
    if a.dtype not in ("fp32", "fp16", "bf16"):
        p.error(f"--dtype {a.dtype}: use fp32, fp16 or bf16")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to PyTorch; run on a GPU machine or drop --device")
    b = from_args(CliBench, a, overrides=tuple(a.override))
    with work_root(a.work_dir, "loracraft-bench-cli-") as root:
        result = measure(b, root, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(
        f"{b.model}: loracraft train runs at {result['ratio_median']:.2f}x the bare floor's speed "
        f"(median of {b.rounds} round(s), {b.long} vs {b.short} steps); in CPU time {result['cpu_ratio_median']:.2f}x "
        f"(load-insensitive with --threads 1)"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
