"""Training metrics: ``logs/metrics.jsonl`` (one JSON row per step) and accelerate's trackers.

Losses stay on the device until a flush (every ``LOG_EVERY`` steps and at each checkpoint), so
logging costs one host sync per flush, not per step.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loracraft.infer.io import write_text_atomic
from loracraft.train.config import Config
from loracraft.train.manifest import scrub

LOG_EVERY = 10  # host syncs for logging happen only this often


def metrics_file(run_dir: Path) -> Path:
    return run_dir / "logs" / "metrics.jsonl"


def prepare_logs(run_dir: Path, step: int) -> None:
    """The logs folder, with the rows after ``step`` dropped (a resume logs them again); main process."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    truncate_metrics(metrics_file(run_dir), after_step=step)


def init_trackers(acc, cfg: Config, run_dir: Path) -> None:
    """accelerate's trackers (output.report_to), given the config flattened and scrubbed."""
    init_kwargs = {"wandb": {"dir": str(run_dir / "logs"), "name": run_dir.name}}
    acc.init_trackers("loracraft", config=flatten(scrub(cfg.dump())), init_kwargs=init_kwargs)


def run_summary(trainables: dict[str, torch.nn.Parameter], num_images: int, cfg: Config, num_processes: int) -> str:
    t = cfg.train
    return (
        f"training {len(trainables)} LoRA tensors "
        f"({sum(p.numel() for p in trainables.values()):,} params) on {num_images} images; "
        f"effective batch {t.batch_size} x {num_processes} processes x {t.grad_accum} accumulation "
        f"= {t.batch_size * num_processes * t.grad_accum}"
    )


def log_rows(pending: list[tuple[int, torch.Tensor, float]], acc, run_dir: Path, bar=None) -> None:
    """``(step, loss, lr)`` rows to the trackers, the progress bar and metrics.jsonl (main process)."""
    if not pending:
        return
    rows = [{"step": s, "loss": float(loss), "lr": lr} for s, loss, lr in pending]
    for row in rows:
        acc.log({"loss": row["loss"], "lr": row["lr"]}, step=row["step"])
    if bar is not None:
        bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{rows[-1]['lr']:.2e}")
    if acc.is_main_process:
        with open(metrics_file(run_dir), "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def log_heldout(acc, run_dir: Path, step: int, loss: float) -> None:
    """The held-out loss, logged like the training loss (the caller is the main process)."""
    acc.log({"heldout_loss": loss}, step=step)
    with open(metrics_file(run_dir), "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": step, "heldout_loss": loss}) + "\n")


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from: they will be logged again."""
    if not path.is_file():
        return
    rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]
    kept = [r for r in rows if json.loads(r)["step"] <= after_step]
    if len(kept) != len(rows):
        write_text_atomic(path, "".join(r + "\n" for r in kept))


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested config -> ``{"a.b": scalar}`` (trackers take flat scalars; others as JSON text)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out
