"""What the end-of-run report costs, as users meet it: ``loracraft train`` with the report off and on
(the report then samples its scale sweep on the base already in memory), and ``loracraft report
RUN_DIR`` afterwards (which reads the base from disk), in one run.

    python scripts/bench_report.py [--model sd15-small|tiny] [--steps 10] [--threads 2] [--json FILE]

Method: the same config (validation prompts set, so the trainer keeps the VAE decoder and text
encoder) trains ``--steps`` steps twice, report off then on, each in its own process; the report's
cost is the wall/CPU difference. Then ``loracraft report`` on the second run. Peak RSS is each
process's own high-water mark (``VmHWM``, Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.args import work_root
from bench.cli import CliBench, cli_command, prepare

PROMPTS = '["a red circle on a blue background", "a green square on a white background"]'
# Runs a loracraft command and writes its own peak RSS (KiB) to the file named first: VmHWM of the new
# address space (ru_maxrss would start from this parent's, which Linux keeps across exec).
_WRAP = ("import re, runpy, sys\nout = sys.argv.pop(1)\ntry:\n    runpy.run_module('loracraft.train.cli', "
         "run_name='__main__')\nfinally:\n    open(out, 'w').write(re.search(r'VmHWM:\\s+(\\d+)', "
         "open('/proc/self/status').read()).group(1))")


def _run(cmd_tail: list[str], log: Path, threads: int) -> dict:
    rss = log.with_suffix(".rss")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-c", _WRAP, str(rss), *cmd_tail], env=env, stdout=fh,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"bench_report: command exited {rc}; see {log}")
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": int(rss.read_text()) / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="sd15-small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work-dir", default=None, help="keep models, data and runs here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    with work_root(a.work_dir, "loracraft-bench-report-") as root:
        spec = prepare(CliBench(model=a.model, threads=a.threads), root)
        runs = Path(spec.work_dir) / "report-runs"
        runs.mkdir(parents=True, exist_ok=True)
        extra = [f"validation.prompts={PROMPTS}", "validation.steps=10", f"validation.every={a.steps * 10}"]
        results = {}
        for name, report in (("warm-cache", "false"), ("report-off", "false"), ("report-on", "true")):
            cmd = cli_command(spec, a.steps if name != "warm-cache" else 2, runs / name)[3:]  # after "-m module"
            cmd = [c for c in cmd if not c.startswith("output.report=")] + [*extra, f"output.report={report}"]
            results[name] = _run(cmd, runs / f"{name}.log", a.threads)
            print(f"[{a.model}] {name}: {results[name]}", file=sys.stderr, flush=True)
        results["report-command"] = _run(["report", str(runs / "report-on")], runs / "report-command.log", a.threads)
    off, on, cmd = results["report-off"], results["report-on"], results["report-command"]
    print(f"{a.model}: end-of-run report (base in memory) adds {on['wall_s'] - off['wall_s']:.1f} s wall, "
          f"{on['cpu_s'] - off['cpu_s']:.1f} s CPU, peak RSS {off['peak_rss_mb']:.0f} -> {on['peak_rss_mb']:.0f} MB "
          f"({on['peak_rss_mb'] / off['peak_rss_mb']:.2f}x); `loracraft report` on its own (base read from disk): "
          f"{cmd['wall_s']:.1f} s wall, {cmd['cpu_s']:.1f} s CPU, peak RSS {cmd['peak_rss_mb']:.0f} MB")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
