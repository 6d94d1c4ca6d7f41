"""The run manifest (``run.json``): everything needed to know what produced an adapter and redo it."""

from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

# Keys that END in a credential word (hf_token, api_key): data.max_token_length is no secret, and
# scrubbing it made run.json unusable for `loracraft reproduce`.
SECRET_NAME = re.compile(r"(token|secret|password|passwd|api[_-]?key|auth)$", re.IGNORECASE)
PACKAGES = ("loracraft", "torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "safetensors")


def scrub(obj):
    """Replace values of keys that look like credentials, recursively (never log a token)."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_NAME.search(str(k)) and v else scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj


def versions() -> dict[str, str]:
    """Installed versions of the packages a run depends on (the same collector generation records use)."""
    from loracraft.infer.generation import installed_versions

    return installed_versions(PACKAGES)


def git_commit() -> str | None:
    """The loracraft source commit, when running from a git checkout (editable installs)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--", "."], capture_output=True, text=True)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }


def environment_diff(a: dict, b: dict) -> list[str]:
    """Differences between two manifests' versions/environment (why a reproduction may differ)."""
    lines = []
    for section in ("versions", "environment"):
        sa, sb = a.get(section, {}), b.get(section, {})
        for k in sorted(set(sa) | set(sb)):
            if sa.get(k) != sb.get(k):
                lines.append(f"{section}.{k}: {sa.get(k)!r} -> {sb.get(k)!r}")
    if a.get("git_commit") != b.get("git_commit"):
        lines.append(f"git_commit: {a.get('git_commit')!r} -> {b.get('git_commit')!r}")
    return lines
