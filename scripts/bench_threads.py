"""``train.threads=auto`` vs fixed threads, idle and beside competing CPU load, in one run.

    python scripts/bench_threads.py [--model sd15-small|tiny] [--steps 30] [--threads 2] [--load 2] [--json FILE]

Method: see ``bench.threads``. Prints s/step of the four phases and the loaded/idle ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from bench.threads import ThreadsBench, measure


def main(argv: list[str] | None = None) -> int:
    d = ThreadsBench()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(ThreadsBench):
        p.add_argument(
            f"--{f.name.replace('_', '-')}", type=type(getattr(d, f.name)), default=getattr(d, f.name)
        )
    p.add_argument("--work-dir", help="keep models, data and logs here (default: a temporary folder)")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    b = ThreadsBench(**{f.name: getattr(a, f.name) for f in fields(ThreadsBench)})
    root = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="loracraft-bench-threads-"))
    try:
        r = measure(b, root, log=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        if not a.work_dir:
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"{b.model}, {b.threads} threads, {b.load} busy process(es): loaded/idle s/step = "
        f"{r['fixed_loaded_over_idle']:.2f} fixed, {r['auto_loaded_over_idle']:.2f} auto; "
        f"auto/fixed idle = {r['auto_idle_over_fixed_idle']:.2f}"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
