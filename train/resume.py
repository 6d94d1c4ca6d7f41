"""Where a run starts: fresh, from one of its checkpoints, already complete, or refused.

Plain functions the recipe (:class:`loracraft.train.trainer.LoraTrainer`) calls from ``setup()``:
:func:`start_point` decides with :mod:`loracraft.train.run_dir` (every rank the same way) and
:func:`resume` loads the chosen checkpoint once the optimizer exists.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from loracraft.infer.errors import LoracraftError, UsageError
from loracraft.train import checkpoint as ckpt
from loracraft.train import run_dir
from loracraft.train.config import Config, config_diff, normalize_training


class RunAlreadyComplete(LoracraftError):
    exit_code = 0


def start_point(
    cfg: Config, folder: Path, acc, dataset_fingerprint: str | None, adapter_file: Path,
    print_: Callable[[str], None],
) -> Path | None:
    """Decide: fresh start, resume (which checkpoint), already complete, or refuse (run_dir.decide).
    Returns the checkpoint to resume from, or None for a fresh start."""
    state = run_dir.inspect(folder)
    differences = []
    if state.manifest is not None:
        old = state.manifest
        differences = config_diff(normalize_training(old["config_training"]), cfg.training_relevant())
        differences = check_process_change(
            cfg, acc.num_processes, old["config_training"], old.get("num_processes", 1), differences
        )
        if old.get("dataset_fingerprint") != dataset_fingerprint:
            differences.append("dataset contents changed (fingerprint differs)")
    decision = run_dir.decide(
        state, differences, overwrite=cfg.output.overwrite,
        allow_config_change=cfg.checkpoint.allow_config_change, resume=cfg.checkpoint.resume,
        checkpoints=[path for _, path in ckpt.list_checkpoints(folder / "checkpoints")],  # oldest first
    )
    # Every rank has looked at the folder before the main process clears or claims it: a rank that
    # looked later would see a different folder and take another branch (and another collective).
    acc.wait_for_everyone()
    if isinstance(decision, run_dir.Refuse):
        raise UsageError(decision.reason)
    if isinstance(decision, run_dir.Complete):
        raise RunAlreadyComplete(f"run already complete, {folder}, adapter at {adapter_file}")
    if isinstance(decision, run_dir.Fresh) and decision.clear:
        # Only the files loracraft wrote go; the folder and anything else in it stay.
        if acc.is_main_process:
            removed = run_dir.clear(folder)
            print_(f"output.overwrite: removed the previous run's {len(removed)} entries from {folder}")
        acc.wait_for_everyone()
    if acc.is_main_process:
        run_dir.claim(folder)  # the marker goes first: only then is the folder loracraft's
    acc.wait_for_everyone()
    return decision.checkpoint if isinstance(decision, run_dir.Resume) else None


def check_process_change(
    cfg: Config, num_processes: int, old_training: dict, old_p: int, diff: list[str],
    print_: Callable[[str], None] | None = None,
) -> list[str]:
    """A different process count is fine when the effective batch is unchanged: samples are
    keyed by global position, so every step sees the same samples with the same noise; only
    the order of the gradient all-reduce differs (not bit-identical, ~1e-7 relative).
    ``print_`` set: that case is warned about."""
    t = cfg.train
    old_p = int(old_p)
    old_t = old_training.get("train", {})
    old_eff = int(old_t.get("batch_size", t.batch_size)) * old_p * int(old_t.get("grad_accum", t.grad_accum))
    new_eff = t.batch_size * num_processes * t.grad_accum
    if old_p == num_processes:
        return diff
    if old_eff == new_eff:
        if print_ is not None:
            print_(
                f"warning: resuming a {old_p}-process run on {num_processes} processes; same samples "
                "and noise per step, but gradients are summed in a different order, so the result is "
                "close to, not bit-identical with, an uninterrupted run"
            )
        return [d for d in diff if not d.startswith("train.batch_size:")]
    return diff + [
        f"effective batch: {old_eff} ({old_p} processes) -> {new_eff} ({num_processes} processes); "
        f"keep batch_size x processes x grad_accum = {old_eff}"
    ]


def resume(
    cfg: Config, resume_from: Path | None, trainables: dict, optimizer, lr_scheduler, acc, ema,
    print_: Callable[[str], None],
) -> int:
    """Load ``resume_from`` into the adapter, optimizer, scheduler, scaler and EMA; the step it
    was written at (0 without a checkpoint). A changed config is refused unless allowed."""
    if resume_from is None:
        return 0
    state = ckpt.read_state(resume_from)
    diff = config_diff(normalize_training(state["config_training"]), cfg.training_relevant())
    diff = check_process_change(
        cfg, acc.num_processes, state["config_training"], state.get("num_processes", 1), diff, print_
    )
    if diff and not cfg.checkpoint.allow_config_change:
        raise UsageError(
            f"config differs from the checkpoint's, {resume_from}: {'; '.join(diff)}; "
            "restore those values or set checkpoint.allow_config_change=true"
        )
    state = ckpt.load_checkpoint(
        resume_from,
        trainables,
        optimizer.optimizer,
        lr_scheduler,
        rank=acc.process_index,
        scaler=acc.scaler,
        ema=ema.shadow if ema is not None else None,
    )
    if ema is not None and not state["ema_restored"]:
        print_("EMA not in the checkpoint (train.ema_decay was just enabled): starting it at the resumed weights")
        ema.reset(trainables)
    print_(f"resuming from {resume_from} (step {state['step']})")
    return int(state["step"])
