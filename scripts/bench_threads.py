"""Thread policies (OpenMP passive vs spinning waits, ``train.threads=auto``), idle and beside competing CPU load, in one run.

    python scripts/bench_threads.py [--model sd15-small|tiny] [--steps 30] [--threads 2] [--load 2] [--json FILE]

Method: see ``bench.threads``. Prints s/step of the four phases and the loaded/idle ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.args import dataclass_parser, from_args, work_root
from bench.threads import ThreadsBench, measure


def main(argv: list[str] | None = None) -> int:
    a = dataclass_parser(ThreadsBench, __doc__).parse_args(argv)
    b = from_args(ThreadsBench, a)
    with work_root(a.work_dir, "loracraft-bench-threads-") as root:
        r = measure(b, root, log=lambda m: print(m, file=sys.stderr, flush=True))
    ratios = ", ".join(f"{n} {v:.2f}" for n, v in r["loaded_over_idle"].items())
    idle = ", ".join(f"{n} {v:.2f}" for n, v in r["idle_over_spinning_idle"].items())
    auto = f"; train.threads=auto (spinning) {r['auto_loaded_over_idle']:.2f}" if r["auto_loaded_over_idle"] else ""
    print(f"{b.model}, {b.threads} threads, {b.load} busy process(es): loaded/idle s/step: {ratios}{auto}"
          + (f"; idle s/step over spinning's: {idle}" if idle else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
