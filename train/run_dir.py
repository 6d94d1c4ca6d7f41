"""What training may do with ``output.dir``: start fresh, resume, report a finished run, or refuse.

A folder is a loracraft run folder only when loracraft made it: the first thing a fresh run
writes is :data:`MARKER`. Anything else in ``output.dir`` belongs to the user, so
``output.overwrite`` removes only the entries loracraft writes into a run folder
(:data:`RUN_FILES`, :data:`RUN_SUBTREES`) and never the folder itself. A folder that holds the
dataset, the class images or the cache (or sits inside one of them) is refused before anything
is written, because "remove the previous run" there would be one glob away from the user's data.

Everything here reads the file system and decides; only :func:`claim` and :func:`clear` write,
and the trainer calls them on the main process. No torch, no Accelerator: this module is
imported while the config is still being checked.
"""

from __future__ import annotations

import datetime
import fnmatch
import glob
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from loracraft.infer.errors import UsageError
from loracraft.infer.io import write_json_atomic

MARKER = ".loracraft-run"
MANIFEST = "run.json"
MARKER_FORMAT = 1

#: Top-level files a run writes (glob patterns). Their atomic-write leftovers (``.NAME.*.tmp``) too.
RUN_FILES = (
    MANIFEST,
    MARKER,
    "pytorch_lora_weights*.safetensors",
    "lycoris_weights*.safetensors",
    "report.html",
    "eval.json",
    "metrics.jsonl",
)
#: Folders a run writes, and which of their entries are its own; a folder left empty is removed.
RUN_SUBTREES = {
    "checkpoints": ("step-*", ".tmp-step-*"),
    "samples": ("step-*.png", "scale-sweep.png"),
    "logs": ("metrics.jsonl", "loracraft", "wandb", "events.out.tfevents.*"),
}

FIX_EMPTY = "choose an empty or new output.dir"


@dataclass(frozen=True)
class Fresh:
    """Start at step 0. ``clear``: remove the previous run's files first (output.overwrite)."""

    clear: bool = False


@dataclass(frozen=True)
class Resume:
    checkpoint: Path


@dataclass(frozen=True)
class Complete:
    """The same run already finished: nothing to do (exit 0)."""


@dataclass(frozen=True)
class Refuse:
    reason: str
    differences: tuple[str, ...] = ()


Decision = Fresh | Resume | Complete | Refuse


@dataclass(frozen=True)
class FolderState:
    path: Path
    exists: bool
    entries: tuple[str, ...] = ()
    owned: bool = False  # loracraft made it (marker, or a manifest written before the marker existed)
    manifest: dict | None = field(default=None, compare=False)

    @property
    def empty(self) -> bool:
        return not self.entries


def _is_loracraft_manifest(data: object) -> bool:
    # Runs written before the marker existed: their run.json has these keys.
    return isinstance(data, dict) and "config_training" in data and "status" in data


def read_manifest(path: Path) -> tuple[bool, dict | None]:
    """(exists, the manifest when it is loracraft's). A run.json that is not JSON or not ours -> (True, None)."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        return p.exists(), None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True, None
    return True, data if _is_loracraft_manifest(data) else None


def inspect(path: str | Path) -> FolderState:
    path = Path(path)
    if not path.is_dir():
        return FolderState(path, exists=False)
    entries = tuple(sorted(os.listdir(path)))
    has_manifest, manifest = read_manifest(path)
    owned = (path / MARKER).is_file() or manifest is not None
    if has_manifest and manifest is None:
        owned = False
    return FolderState(path, True, entries, owned, manifest)


def _resolved(p: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def _overlap(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other in out.parents:
        return "is inside"
    if out in other.parents:
        return "contains"
    return None


def _check_location(out: Path) -> None:
    """A file, a path under a file, or an unwritable place: refused before the dataset is read."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output.dir is a file, {out}, {FIX_EMPTY} (a folder path)")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output.dir is under a file, {existing}, {FIX_EMPTY} (a folder path)")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = out if existing == out else f"{out} (in {existing})"
        raise UsageError(f"output.dir is not writable, {where}, choose a folder you can write to")


def preflight(out_dir: str | Path, guarded: Iterable[tuple[str, str | Path | None]]) -> FolderState:
    """Every check of ``output.dir`` that needs neither the dataset nor weights.

    ``guarded``: (config key, path) pairs that must not overlap the run folder (the dataset,
    class images, cache); None is skipped.
    """
    out = _resolved(out_dir)
    _check_location(out)
    for key, value in guarded:
        if value is None:
            continue
        relation = _overlap(out, _resolved(value))
        if relation:
            raise UsageError(
                f"output.dir {relation} {key} ({out} vs {_resolved(value)}), config, choose an output.dir "
                f"outside {key} (a run folder must never hold or sit inside your data)"
            )
    state = inspect(out)
    has_manifest, manifest = read_manifest(out) if state.exists else (False, None)
    if has_manifest and manifest is None:
        raise UsageError(f"output.dir holds a run.json that loracraft did not write, {out}, {FIX_EMPTY}")
    if state.exists and not state.empty and not state.owned:
        raise UsageError(
            f"output.dir is not empty and was not made by loracraft, {out}, {FIX_EMPTY} "
            "(output.overwrite only replaces loracraft's own runs)"
        )
    return state


def guarded_paths(cfg, cache_dir: str | Path) -> list[tuple[str, str | Path | None]]:
    """The folders of a config that a run folder must stay clear of (``preflight``'s ``guarded``)."""
    db = cfg.dreambooth
    return [
        # a hub dataset id is no folder of the user's; a local path is, even one not made yet
        (
            "data.path",
            cfg.data.path if cfg.data.path and Path(os.path.expanduser(cfg.data.path)).exists() else None,
        ),
        *(
            (f"data.concepts[{i}].path", c.path if Path(os.path.expanduser(c.path)).exists() else None)
            for i, c in enumerate(cfg.data.concepts)
        ),
        ("dreambooth.class_data", db.class_data if db else None),
        ("the cache folder (train.cache_dir)", cfg.train.cache_dir or cache_dir),
    ]


def decide(
    state: FolderState,
    differences: list[str],
    *,
    overwrite: bool,
    allow_config_change: bool,
    resume: str | bool,
    checkpoints: list[Path],
) -> Decision:
    """The run folder's fate from its state, how the new config differs from the run in it
    (``differences``, empty when there is none) and the complete checkpoints it holds (oldest first)."""
    old = state.manifest
    if state.exists and not state.empty and not state.owned:
        return Refuse(f"output.dir is not empty and was not made by loracraft, {state.path}, {FIX_EMPTY}")
    if old is not None and differences:
        if overwrite:
            return Fresh(clear=True)
        if not allow_config_change:
            return Refuse(
                f"output.dir holds a different run, {state.path}: {'; '.join(differences)}; choose another "
                "output.dir, or set output.overwrite=true (discard that run's files) or "
                "checkpoint.allow_config_change=true (continue it with the new settings)",
                tuple(differences),
            )
    if old is not None and old.get("status") == "complete" and not differences:
        return Complete()
    return _resume_decision(state, resume, checkpoints)


def _resume_decision(state: FolderState, resume: str | bool, checkpoints: list[Path]) -> Decision:
    if resume is False or resume == "false":
        return Fresh(clear=bool(state.owned and not state.empty))
    if resume in ("auto", "latest", True):
        if checkpoints:
            return Resume(checkpoints[-1])
        if resume == "latest":
            return Refuse(
                f"checkpoint.resume=latest but no complete checkpoint exists, {state.path / 'checkpoints'}, "
                "use resume=auto to start fresh"
            )
        return Fresh(clear=bool(state.owned and not state.empty))
    path = Path(str(resume))
    if not (path / "state.json").is_file():
        return Refuse(
            f"checkpoint.resume is not a complete checkpoint, {path}, point it at a step-NNNNNN folder"
        )
    return Resume(path)


def owned_entries(path: str | Path) -> list[Path]:
    """The entries of a loracraft run folder that loracraft wrote (what ``clear`` removes)."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = []
    # + the kohya-layout single file named after the run folder (``runs/mystyle/mystyle.safetensors``)
    own = RUN_FILES + (
        f"{glob.escape(path.absolute().name)}.safetensors",
        f"{glob.escape(path.absolute().name)}-*.safetensors",
    )
    file_patterns = own + tuple(f".{p}.*.tmp" for p in own)
    for name in sorted(os.listdir(path)):
        p = path / name
        if name in RUN_SUBTREES and p.is_dir() and not p.is_symlink():
            found += [
                p / n for n in sorted(os.listdir(p)) if any(fnmatch.fnmatch(n, g) for g in RUN_SUBTREES[name])
            ]
        elif any(fnmatch.fnmatch(name, g) for g in file_patterns) and (p.is_file() or p.is_symlink()):
            found.append(p)
    return found


def clear(path: str | Path) -> list[Path]:
    """Remove loracraft's own entries from a run folder it made; the user's files stay. Returns them."""
    path = Path(path)
    state = inspect(path)
    if not state.owned:
        raise UsageError(f"output.dir was not made by loracraft, {path}, {FIX_EMPTY}")
    removed = [p for p in owned_entries(path) if p.name != MARKER]
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    for sub in RUN_SUBTREES:
        d = path / sub
        if d.is_dir() and not d.is_symlink() and not os.listdir(d):
            d.rmdir()
    return removed


def claim(path: str | Path) -> Path:
    """Create the run folder (if needed) and mark it as loracraft's, before anything else is written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.is_file():
        write_json_atomic(
            marker,
            {
                "format": MARKER_FORMAT,
                "loracraft_run": True,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "note": "written by loracraft: output.overwrite removes only the files loracraft wrote here",
            },
        )
    return marker


__all__ = [
    "MARKER",
    "RUN_FILES",
    "RUN_SUBTREES",
    "Fresh",
    "Resume",
    "Complete",
    "Refuse",
    "Decision",
    "FolderState",
    "inspect",
    "preflight",
    "guarded_paths",
    "decide",
    "owned_entries",
    "clear",
    "claim",
    "read_manifest",
]
