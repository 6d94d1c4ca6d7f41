"""What a checkpoint costs: save time as a multiple of one training step, and size on disk.

Measured in one process on the same trainer: median step time (the baseline) and median
checkpoint time, interleaved so machine load affects both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def measure(base: str | Path | None = None, repeats: int = 5, batch_size: int = 4) -> dict:
    from accelerate.state import AcceleratorState

    from loracraft.infer.testing import build_tiny_sd, write_captioned_dataset
    from loracraft.train.config import build_config
    from loracraft.train.trainer import LoraTrainer

    work = Path(tempfile.mkdtemp(prefix="loracraft-bench-ckpt-"))
    base = Path(base) if base else build_tiny_sd(work / "tiny")
    data = write_captioned_dataset(work / "data", n=16)
    cfg = build_config(
        {"model": {"base": str(base)}, "data": {"path": str(data), "resolution": 32}},
        [f"output.dir={work / 'run'}", "output.report_to=[]", "output.report=false",
         f"train.batch_size={batch_size}", "train.max_steps=1000", f"train.cache_dir={work / 'cache'}"],
    )
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = LoraTrainer(cfg)
    trainer.setup()
    for _ in range(3):  # warm-up
        trainer.optimizer_step()
    steps, saves = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        trainer.optimizer_step()
        steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer._checkpoint()
        saves.append(time.perf_counter() - t0)
    ckpt = sorted((work / "run" / "checkpoints").iterdir())[-1]
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    adapter = sum(p.numel() * 4 for p in trainer.trainables.values())
    step, save = statistics.median(steps), statistics.median(saves)
    return {"base": str(base), "step_s": step, "checkpoint_s": save, "checkpoint_over_step": save / step,
            "checkpoint_bytes": size, "adapter_fp32_bytes": adapter, "size_over_adapter": size / adapter}
