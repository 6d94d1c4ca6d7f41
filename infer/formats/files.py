"""Reading and writing adapter files: safetensors (and opt-in pickle), atomically, with content hashes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from loracraft.infer.errors import AdapterError
from loracraft.infer.io import atomic_path
from loracraft.infer.names import LORA_WEIGHT_NAME, LYCORIS_WEIGHT_NAME

#: Suffixes of pickle-based files: loading one can run arbitrary code, so they are refused by default.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def resolve_adapter_file(path: str | Path) -> Path:
    """Return the weights file for ``path`` (a file, or a folder holding one adapter)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AdapterError(
            f"adapter file not found, {p}, check the path (a .safetensors file or a folder holding {LORA_WEIGHT_NAME})"
        )
    if p.is_dir():
        for default in (LORA_WEIGHT_NAME, LYCORIS_WEIGHT_NAME):  # a loracraft run folder
            if (p / default).is_file():
                return p / default
        candidates = sorted(x for x in p.iterdir() if x.suffix == ".safetensors" and x.is_file())
        if len(candidates) == 1:
            return candidates[0]
        what = "no .safetensors file" if not candidates else f"{len(candidates)} .safetensors files"
        raise AdapterError(f"adapter folder holds {what}, {p}, pass the adapter file itself")
    return p


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load tensors and header metadata; a damaged file becomes a one-line AdapterError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(
            f"adapter file is not a readable safetensors file ({reason}), {path}, "
            "re-download or re-export it (the header or data is damaged or truncated)"
        ) from e
    return tensors, metadata


def read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """A ``.ckpt/.pt/.bin`` adapter, only when the user allows it and only its tensors."""
    if not allow_pickle:
        raise AdapterError(
            f"refusing to load a pickle-based adapter (loading it can run arbitrary code), {path}, "
            "convert it to .safetensors or pass --allow-pickle if you trust its source"
        )
    try:
        # Even when the user allows pickles, only tensors and plain containers are unpickled:
        # weights_only=True cannot run code; a file that needs more is refused, not trusted.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise AdapterError(
            f"cannot load pickle adapter with weights_only=True ({type(e).__name__}), {path}, "
            "re-export it as .safetensors"
        ) from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterError(
            f"pickle file does not hold a flat tensor dict, {path}, re-export it as safetensors"
        )
    return obj


def read_tensors(
    path: str | Path, allow_pickle: bool = False
) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """(the resolved file, its tensors, its header) for a file or a folder holding one adapter."""
    file = resolve_adapter_file(path)
    if file.suffix.lower() in PICKLE_SUFFIXES:
        tensors, header = read_pickle(file, allow_pickle), {}
    else:
        tensors, header = read_safetensors(file)
    if not tensors:
        raise AdapterError(f"adapter file holds no tensors, {file}, re-export it")
    return file, tensors, header


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write contiguous CPU copies of ``tensors`` atomically (a crash never leaves half a file)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of tensor names, dtypes, shapes and bytes: equal iff the weights are bit-identical.

    Independent of the file's metadata (which holds wall times and paths), so two runs
    that learned the same weights compare equal.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hash of the file's bytes (what a download or a reproduced run is compared by)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
