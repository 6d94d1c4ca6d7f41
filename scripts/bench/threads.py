"""Thread policies: step speed on an idle machine and beside competing CPU load, in one run.

Two OpenMP wait policies, each in its own process (the policy is read when torch loads):
``spinning`` (``OMP_WAIT_POLICY`` unset: PyTorch's threads spin while they wait, loracraft's
behaviour before it set the policy) and ``passive`` (``OMP_WAIT_POLICY=PASSIVE``, what the
``loracraft`` command sets unless the user set a value). In each process
one ``LoraTrainer`` (real setup, cache on) runs ``steps`` optimizer steps in each of four
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
    auto: bool = True  # also time train.threads=auto (in the spinning process)
    policies: str = "spinning,passive,short-spin"  # which of WAIT_POLICIES (or spin-N), comma-separated


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


def measure_here(b: ThreadsBench, root: Path, log=print) -> dict:
    """The phases in this process, under whatever wait policy it started with."""
    from loracraft.train.threads import AdaptiveThreads, FixedThreads

    spec = prepare(CliBench(model=b.model, threads=b.threads), root)
    torch.set_num_threads(b.threads)
    trainer = _trainer(spec, Path(spec.work_dir) / f"threads-run-{os.getpid()}")
    fixed = FixedThreads(b.threads)
    auto = AdaptiveThreads(b.threads, log=lambda m: log(f"  auto: {m}"))
    policies = (("fixed", fixed), ("auto", auto)) if b.auto else (("fixed", fixed),)
    for _ in range(3):  # warm-up at the fixed count
        fixed.timed(trainer.optimizer_step)
    phases = {}
    for loaded in (False, True):
        with busy_cores(b.load, b.load_limit_s) if loaded else contextlib.nullcontext():
            for name, policy in policies:
                torch.set_num_threads(b.threads if name == "fixed" else auto.threads)  # where each left off
                key = f"{name}_{'loaded' if loaded else 'idle'}"
                phases[key] = _phase(trainer, policy, b.steps)
                log(
                    f"[{b.model}] {key}: {phases[key]['s_per_step']:.3f} s/step "
                    f"(load {phases[key]['load1_before']:.1f} before)"
                )
    s = {k: v["s_per_step"] for k, v in phases.items()}
    out = {"bench": b.__dict__, "phases": phases, "fixed_loaded_over_idle": s["fixed_loaded"] / s["fixed_idle"]}
    if b.auto:
        out["auto_loaded_over_idle"] = s["auto_loaded"] / s["auto_idle"]
        out["auto_idle_over_fixed_idle"] = s["auto_idle"] / s["fixed_idle"]
    return out


#: wait policy name -> the OpenMP environment of its process (libgomp, PyTorch's Linux runtime):
#: spinning = unset (threads spin ~300 000 rounds, a few ms, before they sleep), passive = no spin,
#: short-spin = 1 000 rounds (what the ``loracraft`` command sets unless the user chose);
#: ``spin-N`` (e.g. spin-30000, the previous default) = N rounds, to try other counts.
WAIT_POLICIES = {"spinning": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}, "short-spin": {"GOMP_SPINCOUNT": "1000"}}


def wait_policy_env(name: str) -> dict[str, str]:
    """The OpenMP environment of a policy name (WAIT_POLICIES or ``spin-N``)."""
    if name.startswith("spin-") and name[5:].isdigit():
        return {"GOMP_SPINCOUNT": name[5:]}
    if name not in WAIT_POLICIES:
        raise SystemExit(f"--policies: unknown wait policy {name!r}, use {', '.join(WAIT_POLICIES)} or spin-N")
    return WAIT_POLICIES[name]


def measure(b: ThreadsBench, root: Path, log=print) -> dict:
    """Each wait policy in its own process (auto timed under spinning only); the headline ratios."""
    import json

    results = {}
    for name in b.policies.split(","):
        value = wait_policy_env(name)
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(value, OMP_NUM_THREADS=str(b.threads))
        child = replace(b, auto=b.auto and name == "spinning")
        code = ("import json, sys\nsys.path.insert(0, sys.argv[1])\nfrom pathlib import Path\n"
                "from bench.threads import ThreadsBench, measure_here\n"
                "r = measure_here(ThreadsBench(**json.loads(sys.argv[2])), Path(sys.argv[3]), "
                "log=lambda m: print(m, file=sys.stderr, flush=True))\nprint(json.dumps(r))\n")
        log(f"[{b.model}] wait policy {name} ({value or 'OpenMP defaults'})")
        done = subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), json.dumps(child.__dict__), str(root)],
            env=env, stdout=subprocess.PIPE, text=True, check=True,
        )
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    idle = {n: r["phases"]["fixed_idle"]["s_per_step"] for n, r in results.items()}
    return {
        "bench": b.__dict__,
        "policies": results,
        "loaded_over_idle": {n: r["fixed_loaded_over_idle"] for n, r in results.items()},
        "idle_over_spinning_idle": {n: v / idle["spinning"] for n, v in idle.items()} if "spinning" in idle else {},
        "auto_loaded_over_idle": results.get("spinning", {}).get("auto_loaded_over_idle"),
    }


def quick(**kw) -> ThreadsBench:
    return replace(ThreadsBench(model="tiny", steps=12, load=1, load_limit_s=120.0), **kw)
