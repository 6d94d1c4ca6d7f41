"""LoRA file formats: diffusers/PEFT safetensors with metadata (kohya/A1111 conversion lives here too).

diffusers' own ``save_lora_weights`` writes no training metadata and loses alpha unless
``lora_adapter_metadata`` is passed; we write the same layout with both, atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loracraft.infer.io import atomic_path

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
#: diffusers' key for the per-component LoraConfig (diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def _jsonable_lora_config(config: dict) -> dict:
    """LoraConfig.to_dict() holds sets and enums; safetensors metadata must be JSON strings."""
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))


def save_diffusers_lora(
    path: str | Path,
    unet_state: dict[str, torch.Tensor],
    unet_lora_config: dict,
    extra_metadata: dict[str, str] | None = None,
    text_encoder_state: dict[str, torch.Tensor] | None = None,
    text_encoder_lora_config: dict | None = None,
) -> Path:
    """Write an adapter that plain ``pipe.load_lora_weights(dir)`` loads with the trained alpha.

    Args:
        path: target file (usually ``<dir>/pytorch_lora_weights.safetensors``).
        unet_state: PEFT state dict in diffusers naming (``convert_state_dict_to_diffusers``), no prefix.
        unet_lora_config: ``LoraConfig.to_dict()``; stored under ``lora_adapter_metadata``
            as ``unet.<key>`` exactly like ``StableDiffusionPipeline.save_lora_weights``.
        extra_metadata: training parameters (strings) merged into the safetensors header.
    """
    from diffusers import StableDiffusionPipeline

    tensors = StableDiffusionPipeline.pack_weights(unet_state, "unet")
    adapter_meta = {f"unet.{k}": v for k, v in _jsonable_lora_config(unet_lora_config).items()}
    if text_encoder_state:
        tensors.update(StableDiffusionPipeline.pack_weights(text_encoder_state, "text_encoder"))
        if text_encoder_lora_config:
            te = _jsonable_lora_config(text_encoder_lora_config)
            adapter_meta.update({f"text_encoder.{k}": v for k, v in te.items()})
    metadata = {"format": "pt", **(extra_metadata or {})}
    metadata[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_meta, indent=2, sort_keys=True)
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
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
