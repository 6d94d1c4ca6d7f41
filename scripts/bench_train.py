"""Benchmark loracraft's training step against the floor and the diffusers reference script.

    python scripts/bench_train.py [--quick] [--json FILE] [--models sd15-small,tiny] [--threads N] ...
    python scripts/bench_train.py --device cuda --dtype fp16 --models sd15   (GPU: peak GPU memory too)

Variants: (a) floor (bare UNet fwd+bwd+AdamW on precomputed inputs), (b) loracraft with
cache, (c) loracraft without cache, (d) the reference script's per-step work, re-implemented,
(e) (b) over 2 torchrun processes sharing the cores, (f) (b) with ``preserve`` on half of each batch.
The logic lives in ``bench.train``; see its docstring for the method.
"""

from __future__ import annotations

import argparse
import signal
import sys

import torch
from bench.train import MODELS, VARIANTS, BenchConfig, format_report, run_benchmark, write_json


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    defaults = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny model only (unless --models), 8 images, 1 + 2x2 steps",
    )
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--models",
        type=_csv,
        help=f"comma-separated, from {','.join(MODELS)} (default: sd15-small,tiny; sd15 is GPU-sized)",
    )
    p.add_argument("--variants", type=_csv, help=f"comma-separated, from {','.join(VARIANTS)} (default: all)")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--rank", type=int, help=f"LoRA rank (default {defaults.rank})")
    p.add_argument("--images", type=int, help=f"dataset size (default {defaults.images})")
    p.add_argument("--warmup", type=int, help=f"discarded steps per variant (default {defaults.warmup})")
    p.add_argument("--window", type=int, help=f"steps per timed window (default {defaults.window})")
    p.add_argument("--rounds", type=int, help=f"timed windows per variant (default {defaults.rounds})")
    p.add_argument("--threads", type=int, help=f"torch threads in every variant (default {defaults.threads})")
    p.add_argument("--device", choices=["cpu", "cuda"], help="where the steps run (default cpu)")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        help="training precision of (a), (b), (c), (d), (f): train.mixed_precision (fp16 needs CUDA; default fp32)",
    )
    p.add_argument(
        "--num-workers", type=int, help="DataLoader workers of the reference (d) (default 0, as it)"
    )
    p.add_argument("--no-flip", action="store_true", help="train without random horizontal flips")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra loracraft config override for (b) and (c), e.g. train.mixed_precision=bf16 (repeatable); "
        "the floor (a) follows the same step settings",
    )
    p.add_argument(
        "--in-process", action="store_true", help="run all variants in this process (no per-variant RSS)"
    )
    p.add_argument(
        "--work-dir", help="keep models, data and logs here (default: a temporary folder, removed)"
    )
    a = p.parse_args(argv)

    given = {
        "models": a.models,
        "variants": a.variants,
        "batch_size": a.batch_size,
        "rank": a.rank,
        "images": a.images,
        "warmup": a.warmup,
        "window": a.window,
        "rounds": a.rounds,
        "threads": a.threads,
        "device": a.device,
        "num_workers": a.num_workers,
        "work_dir": a.work_dir,
    }
    kw = {k: v for k, v in given.items() if v is not None}
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible to PyTorch; run on a GPU machine or drop --device")
    precision = [] if a.dtype in (None, "fp32") else [f"train.mixed_precision={a.dtype}"]
    kw.update(overrides=precision + a.override, isolate=not a.in_process)
    if a.no_flip:
        kw["random_flip"] = False
    cfg = BenchConfig.quick(**kw) if a.quick else BenchConfig(**kw)
    # SIGTERM unwinds like Ctrl-C, so the variant processes are shut down on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run_benchmark(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(results))
    if a.json:
        write_json(results, a.json)
        print(f"results written to {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
