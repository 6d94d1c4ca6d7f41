"""Atomic, pickle-free training checkpoints and exact resume.

Why not ``accelerator.save_state``: it writes the whole UNet (gigabytes for a 4 M-parameter
adapter) and pickles RNG states and custom objects, which we refuse to load (safe by
default). The full training state of a LoRA run is small and regular, so it is written as
safetensors + JSON:

  step-000040/adapter.safetensors      trainable parameters by name (fp32)
  step-000040/optimizer.safetensors    optimizer state tensors; optimizer.json the rest
  step-000040/rng-rank0.safetensors    torch CPU (+CUDA) RNG state of each rank
  step-000040/ema.safetensors          EMA of the adapter weights (only with train.ema_decay)
  step-000040/state.json               step, LR scheduler, grad scaler, config snapshot, processes,
                                       and the list of files loracraft wrote there
  step-000040/pytorch_lora_weights.safetensors, <run name>-step-000040.safetensors
                                       that step's adapter as shared files (see loracraft.train.export)

The data position is not stored separately: every random draw is keyed by the global
sample position (see data.keyed_seed), which the step counter determines.

A checkpoint is written to ``.tmp-step-N-<pid>``, every file fsynced, then renamed: a
directory named ``step-N`` is complete by construction; leftovers of a killed save are
ignored and cleaned up. Any failure while writing (a full disk, a file-size limit) removes the
temp dir and becomes one :class:`CheckpointError`; the complete checkpoints stay as they were.
Rotation and re-saves delete only the files a checkpoint's ``state.json`` says loracraft wrote.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loracraft.infer.errors import LoracraftError
from loracraft.infer.io import fsync_dir

STEP_DIR = re.compile(r"^step-(\d{6,})$")
#: What checkpoints held before ``state.json`` listed its files.
_OLD_FILES = {"adapter.safetensors", "ema.safetensors", "optimizer.safetensors", "optimizer.json", "state.json"}
_OLD_RNG = re.compile(r"^rng-rank\d+\.safetensors$")


class CheckpointError(LoracraftError):
    exit_code = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temp dirs of interrupted saves are never listed)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for d in ckpt_root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _optimizer_to_safe(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync_tree(root: Path) -> None:
    for f in root.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(root)


def temp_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".tmp-{step_dir_name(step)}"


def begin_checkpoint(ckpt_root: Path, step: int) -> Path:
    """Main process: a fresh temp dir that every rank then writes its own files into."""
    tmp = temp_dir(ckpt_root, step)

    def make() -> Path:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        return tmp

    return _guard(tmp, make)


def save_rank_state(tmp: Path, rank: int) -> None:
    """Every rank: its own RNG state (LoRA dropout draws from the global torch generator)."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _guard(tmp, lambda: save_file(rng, str(tmp / f"rng-rank{rank}.safetensors")))


def commit_checkpoint(
    tmp: Path,
    step: int,
    trainables: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    state: dict,
    scaler=None,
    ema: dict[str, torch.Tensor] | None = None,
    export: Callable[[Path], object] | None = None,
) -> Path:
    """Main process: write the shared state (and ``export(folder)``'s files), fsync everything, rename into place."""

    def write() -> Path:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainables.items()}, str(tmp / "adapter.safetensors"))
        if ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        opt_tensors, opt_meta = _optimizer_to_safe(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        if export is not None:
            export(tmp)
        full_state = dict(state, step=step, lr_scheduler=lr_scheduler.state_dict())
        full_state["files"] = sorted([p.name for p in tmp.iterdir()] + ["state.json"])
        if scaler is not None:
            full_state["grad_scaler"] = scaler.state_dict()
        # state.json last: list_checkpoints() treats a dir without it as incomplete.
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2, default=str), encoding="utf-8")
        _fsync_tree(tmp)
        final = tmp.parent / step_dir_name(step)
        if final.exists():  # an older checkpoint of the same step (a resumed run re-saving it)
            remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(tmp.parent)
        return final

    return _guard(tmp, write)


def _guard(tmp: Path, fn):
    """Run a write; on any failure remove the temp dir and say how to go on (the complete ones are intact).

    Not only OSError: safetensors reports a full disk or a file-size limit as ``SafetensorError``."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - whatever broke the write, the answer is the same
        shutil.rmtree(tmp, ignore_errors=True)
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).strip().splitlines()
        raise CheckpointError(
            f"could not write checkpoint ({reason[0][:200] if reason else type(e).__name__}), "
            f"{tmp.parent / tmp.name.removeprefix('.tmp-')}, free disk space and run the same command again: "
            "it resumes from the last complete checkpoint, which is intact"
        ) from e


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    trainables: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    state: dict,
    scaler=None,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Single-process convenience: begin + this rank's state + commit."""
    tmp = begin_checkpoint(ckpt_root, step)
    save_rank_state(tmp, 0)
    return commit_checkpoint(tmp, step, trainables, optimizer, lr_scheduler, state, scaler, ema)


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond ``keep`` (called only after a new one is complete)."""
    done = list_checkpoints(ckpt_root)
    for _, path in done[: max(0, len(done) - keep)]:
        remove_checkpoint(path)
    for leftover in ckpt_root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def remove_checkpoint(path: Path) -> None:
    """Delete the files loracraft wrote into checkpoint ``path`` (its ``state.json`` lists them), and the
    folder if nothing else is left in it; a file the user put there stays, and so does its folder."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a checkpoint loracraft can account for: leave it alone
    if not isinstance(state, dict) or "lr_scheduler" not in state:
        return
    files = state.get("files") or [p.name for p in path.iterdir() if p.name in _OLD_FILES or _OLD_RNG.match(p.name)]
    for name in files:
        if name != "state.json" and "/" not in name and "\\" not in name:
            (path / name).unlink(missing_ok=True)
    (path / "state.json").unlink(missing_ok=True)  # last: until then the folder still lists as complete
    try:
        path.rmdir()
    except OSError:
        pass


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint is unreadable, {ckpt}, resume from an older one or start fresh") from e


def load_checkpoint(
    ckpt: Path,
    trainables: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    rank: int = 0,
    scaler=None,
    ema: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Restore parameters, optimizer, scheduler, scaler, this rank's RNG and (if given and saved)
    the EMA tensors in place; returns state.json plus ``ema_restored`` (bool)."""
    state = read_state(ckpt)
    state["ema_restored"] = False
    try:
        saved = load_file(str(ckpt / "adapter.safetensors"))
        missing = sorted(set(trainables) - set(saved))
        if missing:
            raise CheckpointError(
                f"checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]}), {ckpt}, "
                "it was made with different lora settings; resume with the original config"
            )
        with torch.no_grad():
            for name, p in trainables.items():
                p.copy_(saved[name])
        if ema is not None and (ckpt / "ema.safetensors").is_file():
            saved_ema = load_file(str(ckpt / "ema.safetensors"))
            if set(saved_ema) == set(ema):
                for name, t in ema.items():
                    t.copy_(saved_ema[name])
                state["ema_restored"] = True
        opt_meta = json.loads((ckpt / "optimizer.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(_optimizer_from_safe(load_file(str(ckpt / "optimizer.safetensors")), opt_meta))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and "grad_scaler" in state:
            scaler.load_state_dict(state["grad_scaler"])
        rng_file = ckpt / f"rng-rank{rank}.safetensors"
        if rng_file.is_file():
            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available():
                cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
                if cuda:
                    torch.cuda.set_rng_state_all(cuda)
    except (OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint is incomplete or corrupt, {ckpt}, resume from an older one ({e})") from e
    return state


def on_every_rank(write: Callable[[], object]) -> None:
    """Run a checkpoint write; if it failed on any rank, every rank raises that rank's error."""
    from accelerate.utils import gather_object

    try:
        write()
        message = None
    except CheckpointError as e:
        message = str(e)
    failed = [m for m in gather_object([message]) if m]
    if failed:
        raise CheckpointError(failed[0])
