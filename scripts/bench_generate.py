#!/usr/bin/env python
"""Cost of a LoRA at generation time: fused and unfused, relative to the bare base, in one run.

    python scripts/bench_generate.py                       # tiny random SD1 model, random rank-8 adapter
    python scripts/bench_generate.py --base DIR --lora FILE --size 64 --steps 25

Three pipelines are loaded side by side - base, base + adapter (PEFT layers active), base +
adapter fused into the weights - and timed in interleaved rounds (the order rotates every
round) so drift in machine load hits all three alike; each figure is the median over rounds,
of wall time and of this process's CPU time (steadier when other jobs share the machine).
Printed ratios: fused/base (goal <= 1.02) and unfused/base.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="diffusers folder (default: build the tiny test model)")
    parser.add_argument("--lora", help="adapter file (default: a random rank-8 attention adapter)")
    parser.add_argument("--size", type=int, help="image side in px (default: the model's native size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median taken)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 = steadier on shared machines)"
    )
    args = parser.parse_args(argv)

    import torch

    from loracraft.infer import adapters as A
    from loracraft.infer.formats import LORA_WEIGHT_NAME
    from loracraft.infer.generation import generate
    from loracraft.infer.models import load_base

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    base = args.base
    if base is None:
        from loracraft.infer.testing import build_tiny_sd

        base = build_tiny_sd(work / "tiny-sd", seed=0)
    lora = args.lora
    if lora is None:
        lora = A.build_random_lora(base, work / "lora" / LORA_WEIGHT_NAME, rank=8, alpha=4, seed=1)

    pipes = {"base": load_base(base), "unfused": load_base(base), "fused": load_base(base)}
    A.load_adapter(pipes["unfused"], lora)
    A.load_adapter(pipes["fused"], lora)
    A.fuse(pipes["fused"])

    def run(name: str) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        generate(pipes[name], "a red circle on a blue background", seed=0, steps=args.steps,
                 width=args.size, height=args.size)  # fmt: skip
        return time.perf_counter() - wall, time.process_time() - cpu

    names = list(pipes)
    for name in names:  # warm-up: first calls pay for allocator and kernel set-up
        run(name)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            w, c = run(name)
            wall[name].append(w)
            cpu[name].append(c)

    print(f"model {base}, adapter {lora}")
    print(
        f"{args.steps} steps, {args.rounds} interleaved rounds, {args.threads} thread(s); seconds per image:"
    )
    print(f"  {'':8s} {'wall median':>11s} {'(min-max)':>17s} {'cpu median':>11s}")
    for n in names:
        print(
            f"  {n:8s} {statistics.median(wall[n]):11.4f} ({min(wall[n]):.3f}-{max(wall[n]):.3f})"
            f" {statistics.median(cpu[n]):11.4f}"
        )
    # Process CPU time is the steadier figure on a shared machine (other jobs inflate wall time).
    for label, t in (("wall", wall), ("cpu", cpu)):
        base_t = statistics.median(t["base"])
        fused, unfused = statistics.median(t["fused"]) / base_t, statistics.median(t["unfused"]) / base_t
        print(f"{label:4s}  fused/base {fused:.3f} (goal <= 1.02)   unfused/base {unfused:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
