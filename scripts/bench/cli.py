"""What the command line costs per step: ``loracraft train`` against the bare floor, same run.

The harness in ``bench.train`` times ``LoraTrainer.optimizer_step()`` from inside; a user meets
the whole command: data loading, the progress bar, logging, checkpoints, the step loop. Here:

- the cache is filled once by a first short run (its files are shared by every later run);
- each round runs ``loracraft train`` twice on the same config, ``short`` and ``long`` steps
  (report off, no checkpoint inside the run), in fresh output folders; start-up, model load,
  cache read and the final export cost the same in both, so ``(wall_long - wall_short) /
  (long - short)`` is the command line's seconds per step;
- right after, in this process, the floor (``bench.train.FloorRunner``: UNet fwd + bwd + AdamW
  with the same LoRA on precomputed inputs, same threads) runs ``long - short`` steps;
- ``ratio = floor s/step / CLI s/step`` per round (1.0 = the command line adds nothing); the
  median over rounds is the headline, every round and the load average before it are kept.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.train import MODELS, BenchConfig, BenchSpec, FloorRunner, prepare_floor_inputs, prepare_model


@dataclass
class CliBench:
    model: str = "sd15-small"
    short: int = 10
    long: int = 130
    rounds: int = 1
    threads: int = 2
    device: str = "cpu"  # cuda: the floor runs there; the command line uses it whenever it sees it
    dtype: str = "fp32"  # fp16 | bf16: train.mixed_precision of both
    batch_size: int = 4
    rank: int = 4
    images: int = 32
    seed: int = 0
    overrides: tuple[str, ...] = ()


def prepare(b: CliBench, root: Path) -> BenchSpec:
    """The model, its dataset and the floor's precomputed inputs under ``root`` (reused if there)."""
    cfg = BenchConfig(
        batch_size=b.batch_size,
        rank=b.rank,
        images=b.images,
        threads=b.threads,
        device=b.device,
        seed=b.seed,
        overrides=[*precision_overrides(b.dtype), *b.overrides],
    )
    spec = prepare_model(MODELS[b.model], cfg, root)
    prepare_floor_inputs(spec)
    return spec


def precision_overrides(dtype: str) -> list[str]:
    return [] if dtype == "fp32" else [f"train.mixed_precision={dtype}"]


def cli_command(spec: BenchSpec, steps: int, out_dir: Path) -> list[str]:
    recipe = Path(spec.work_dir) / "bench.yaml"
    recipe.write_text(json.dumps({"model": {"base": spec.model_dir}, "data": {"path": spec.data_dir}}))
    overrides = spec.loracraft_overrides(True, str(out_dir))
    overrides = [o for o in overrides if not o.startswith(("train.max_steps=", "train.cache_dir="))]
    return [
        sys.executable,
        "-m",
        "loracraft.train.cli",
        "train",
        str(recipe),
        *overrides,
        f"train.max_steps={steps}",
        f"train.cache_dir={Path(spec.work_dir) / 'cache'}",
        "output.report=false",
    ]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cli(spec: BenchSpec, steps: int, out_dir: Path, env: dict | None = None) -> tuple[float, float]:
    """Wall and CPU seconds of one ``loracraft train`` run; its log goes to ``out_dir``.log."""
    if out_dir.exists():  # this benchmark's own run folder from an earlier round: only a loracraft run goes
        from loracraft.train.run_dir import MARKER

        if not (out_dir / MARKER).is_file():
            raise SystemExit(f"bench_cli: {out_dir} exists and is not a loracraft run folder; choose another --work-dir")
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads), **(env or {}))
    if spec.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate would take a GPU it can see
    log = out_dir.with_suffix(".log")
    t0, c0 = time.perf_counter(), _children_cpu()
    with open(log, "w") as fh:
        rc = subprocess.run(
            cli_command(spec, steps, out_dir), env=env, stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if rc != 0:
        raise RuntimeError(f"loracraft train exited {rc}; see {log}")
    return wall, cpu


def floor_seconds_per_step(spec: BenchSpec, steps: int, warmup: int = 3) -> tuple[float, float]:
    """Wall and CPU seconds per step of the floor, in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        runner = FloorRunner(spec, Path(spec.work_dir) / "floor")
        runner.setup()
        runner.run(warmup)
        t0, c0 = time.perf_counter(), time.process_time()
        runner.run(steps)
        return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    finally:
        torch.set_num_threads(before)


def measure(b: CliBench, root: Path, log=print) -> dict:
    spec = prepare(b, root)
    runs = Path(spec.work_dir) / "cli"
    log(f"[{b.model}] filling the cache: {run_cli(spec, 2, runs / 'warm')[0]:.1f} s")
    rounds = []
    for r in range(b.rounds):
        load = os.getloadavg()[0]
        (short, short_cpu), (long_, long_cpu) = (
            run_cli(spec, n, runs / f"r{r}-{n}") for n in (b.short, b.long)
        )
        n = b.long - b.short
        cli, cli_cpu = (long_ - short) / n, (long_cpu - short_cpu) / n
        floor, floor_cpu = floor_seconds_per_step(spec, n)
        rounds.append(
            {
                "load1": load,
                "short_s": short,
                "long_s": long_,
                "cli_s_per_step": cli,
                "floor_s_per_step": floor,
                "ratio": floor / cli,
                "cli_cpu_s_per_step": cli_cpu,
                "floor_cpu_s_per_step": floor_cpu,
                "cpu_ratio": floor_cpu / cli_cpu,
            }
        )
        log(
            f"[{b.model}] round {r + 1}/{b.rounds} (load {load:.1f}): CLI {cli:.3f} s/step, floor {floor:.3f} "
            f"s/step, ratio {floor / cli:.2f}x (in CPU time {cli_cpu:.3f} vs {floor_cpu:.3f}: {floor_cpu / cli_cpu:.2f}x)"
        )
    return {
        "bench": b.__dict__,
        "rounds": rounds,
        "ratio_median": statistics.median(x["ratio"] for x in rounds),
        "cpu_ratio_median": statistics.median(x["cpu_ratio"] for x in rounds),
    }


def quick(**kw) -> CliBench:
    return replace(CliBench(model="tiny", short=2, long=6, images=8), **kw)
