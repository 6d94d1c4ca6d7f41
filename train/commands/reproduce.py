"""``loracraft reproduce RUN_DIR``: re-run a finished run from its manifest and compare weights.

The comparison is of ``weights_sha256`` (tensor bytes, not file bytes: the file's metadata
holds paths and times). On a mismatch the environment differences are listed, since a
different torch build, CPU instruction set or thread count is the usual cause.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loracraft.infer.errors import LoracraftError, NotFoundError, UsageError
from loracraft.train.config import build_config
from loracraft.train.manifest import environment, environment_diff, versions


class Mismatch(LoracraftError):
    exit_code = 3


def reproduce(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    from loracraft.train.trainer import run_training

    run_dir = Path(run_dir)
    manifest_path = run_dir / "run.json"
    if not run_dir.exists():
        raise NotFoundError(f"run folder not found, {run_dir}, point reproduce at a finished run directory")
    if not manifest_path.is_file():
        raise UsageError(f"no run.json in {run_dir}, point reproduce at a finished run directory")
    old = json.loads(manifest_path.read_text(encoding="utf-8"))
    if old.get("status") != "complete" or not old.get("weights_sha256"):
        raise UsageError(f"run is not complete, {run_dir}, finish it (run `loracraft train` again) first")
    out = Path(out_dir) if out_dir else run_dir.with_name(run_dir.name + "-reproduce")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"reproduction folder exists, {out}, remove it or pass --out NEW_DIR")
    cfg_data = _with_legacy_paths(old["config"], run_dir)
    cfg_data["output"]["dir"] = str(out.resolve())
    cfg_data["checkpoint"]["resume"] = False
    run_training(build_config(cfg_data, source=str(manifest_path)))
    new = json.loads((out / "run.json").read_text(encoding="utf-8"))
    if new["weights_sha256"] == old["weights_sha256"]:
        print(f"MATCH {new['weights_sha256']} ({out})")
        return out
    diff = environment_diff(old, new) or ["no environment difference recorded (a nondeterministic kernel?)"]
    if new.get("dataset_fingerprint") != old.get("dataset_fingerprint"):
        diff.insert(0, "dataset contents changed since the original run")
    if new.get("base_fingerprint") != old.get("base_fingerprint"):
        diff.insert(0, "base model files changed since the original run")
    raise Mismatch(
        f"MISMATCH: weights {new['weights_sha256'][:16]} != original {old['weights_sha256'][:16]}, {out}",
        [f"MISMATCH: weights {new['weights_sha256'][:16]} != original {old['weights_sha256'][:16]}, {out}"]
        + [f"  differs: {line}" for line in diff],
    )


def _with_legacy_paths(cfg: dict, run_dir: Path) -> dict:
    """Runs recorded before paths were stored absolute hold them relative to the folder training
    was started from, usually the one holding ``runs/NAME``: try that when the current folder
    has no such path (never for hub ids, which do not exist locally either way)."""
    start = run_dir.resolve().parent.parent
    for section, key in (("model", "base"), ("data", "path")):
        value = (cfg.get(section) or {}).get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and not Path(value).exists():
            if (start / value).exists():
                cfg[section][key] = str(start / value)
    return cfg


def cmd_reproduce(args: argparse.Namespace) -> int:
    reproduce(args.run_dir, args.out)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="re-run a finished run from its run.json and compare the weights hash",
        description="Re-run RUN_DIR's resolved config into a new folder; exit 0 on MATCH, 3 on MISMATCH.",
    )
    p.add_argument("run_dir")
    p.add_argument("--out", help="folder for the reproduction (default: RUN_DIR-reproduce)")
    p.set_defaults(func=cmd_reproduce)


__all__ = ["reproduce", "register", "environment", "versions"]
