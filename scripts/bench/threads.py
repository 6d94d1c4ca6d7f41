"""``train.threads``: step speed on an idle machine and beside competing CPU load, in one run.

One ``LoraTrainer`` (real setup, cache on) runs ``steps`` optimizer steps in each of four
phases, in this order: fixed threads idle, auto idle, fixed loaded, auto loaded. "Fixed" is
the behaviour without ``train.threads`` (PyTorch's count, here ``threads``); "auto" is
``train.threads=auto``'s policy object, created once and carried from the idle phases into the
loaded ones, as in a run where the load arrives midway (so it pays for noticing the change and
probing again). "Loaded" = ``load`` busy-loop processes (pure Python, one core each) running
for the phase and stopped after it; each ends by itself after ``load_limit_s`` whatever happens.

Figures: seconds per step of each phase (wall time over its steps, probes included), and the
ratios loaded/idle for fixed and for auto (1.0 = the load costs nothing), auto idle / fixed idle.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.cli import CliBench, prepare
from bench.train import BenchSpec


@dataclass
class ThreadsBench:
    model: str = "sd15-small"
    steps: int = 30
    threads: int = 2
    load: int = 2
    load_limit_s: float = 900.0


@contextlib.contextmanager
def busy_cores(n: int, limit_s: float):
    """``n`` processes spinning in pure Python, each ending by itself after ``limit_s``."""
    code = f"import time\nend = time.time() + {limit_s}\nwhile time.time() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]
    try:
        time.sleep(0.5)  # let them start spinning
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _trainer(spec: BenchSpec, out: Path):
    from accelerate.state import AcceleratorState

    from loracraft.train.trainer import LoraTrainer

    cfg = spec.loracraft_config(True, str(out))
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = LoraTrainer(cfg)
    trainer.setup()
    return trainer


def _phase(trainer, policy, steps: int) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    for _ in range(steps):
        policy.timed(trainer.optimizer_step)
    return {
        "s_per_step": (time.perf_counter() - t0) / steps,
        "load1_before": load,
        "threads_at_end": torch.get_num_threads(),
    }


def measure(b: ThreadsBench, root: Path, log=print) -> dict:
    from loracraft.train.threads import AdaptiveThreads, FixedThreads

    spec = prepare(CliBench(model=b.model, threads=b.threads), root)
    torch.set_num_threads(b.threads)
    trainer = _trainer(spec, Path(spec.work_dir) / "threads-run")
    fixed = FixedThreads(b.threads)
    auto = AdaptiveThreads(b.threads, log=lambda m: log(f"  auto: {m}"))
    for _ in range(3):  # warm-up at the fixed count
        fixed.timed(trainer.optimizer_step)
    phases = {}
    for loaded in (False, True):
        with busy_cores(b.load, b.load_limit_s) if loaded else contextlib.nullcontext():
            for name, policy in (("fixed", fixed), ("auto", auto)):
                torch.set_num_threads(b.threads if name == "fixed" else auto.threads)  # where each left off
                key = f"{name}_{'loaded' if loaded else 'idle'}"
                phases[key] = _phase(trainer, policy, b.steps)
                log(
                    f"[{b.model}] {key}: {phases[key]['s_per_step']:.3f} s/step "
                    f"(load {phases[key]['load1_before']:.1f} before)"
                )
    s = {k: v["s_per_step"] for k, v in phases.items()}
    return {
        "bench": b.__dict__,
        "phases": phases,
        "fixed_loaded_over_idle": s["fixed_loaded"] / s["fixed_idle"],
        "auto_loaded_over_idle": s["auto_loaded"] / s["auto_idle"],
        "auto_idle_over_fixed_idle": s["auto_idle"] / s["fixed_idle"],
    }


def quick(**kw) -> ThreadsBench:
    return replace(ThreadsBench(model="tiny", steps=12, load=1, load_limit_s=120.0), **kw)
