"""Write a diffusers SD1 folder as one original-layout (LDM/A1111) ``.safetensors`` checkpoint.

The inverse of diffusers' ``convert_ldm_{unet,vae,clip}_checkpoint``, just enough for the
tests of ``from_single_file`` on the tiny model (no hub, so no real checkpoint to load).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_DIRECT = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet_key(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RESNET.get(head, head)}.{tail}"


def unet_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    lpb = config["layers_per_block"]
    n_blocks = len(config["down_block_types"])
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        new = None
        for d, ldm in _UNET_DIRECT.items():
            if key.startswith(d + "."):
                new = ldm + key[len(d) :]
        if new is None and parts[0] == "down_blocks":
            b, kind, i, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + b * (lpb + 1) + int(i)}.0.{_resnet_key(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + b * (lpb + 1) + int(i)}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.{'.'.join(parts[5:])}"
        elif new is None and parts[0] == "mid_block":
            kind, i, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{0 if i == 0 else 2}.{_resnet_key(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        elif new is None and parts[0] == "up_blocks":
            b, kind, i, rest = int(parts[1]), parts[2], parts[3], ".".join(parts[4:])
            if kind == "resnets":
                new = f"output_blocks.{b * (lpb + 1) + int(i)}.0.{_resnet_key(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{b * (lpb + 1) + int(i)}.1.{rest}"
            elif kind == "upsamplers":
                slot = 2 if up_has_attn[b] else 1
                new = f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.conv.{'.'.join(parts[5:])}"
        if new is None:
            raise KeyError(f"no LDM name for unet key {key} ({n_blocks} blocks)")
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    n_up = len(config["up_block_types"])
    attn = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":
            i = parts[2]
            if parts[3] == "resnets":
                new = f"{parts[0]}.down.{i}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.down.{i}.downsample.{'.'.join(parts[5:])}"
        elif parts[1] == "up_blocks":
            i = n_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"{parts[0]}.up.{i}.block.{'.'.join(parts[4:])}"
            else:
                new = f"{parts[0]}.up.{i}.upsample.{'.'.join(parts[5:])}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
            else:
                rest = ".".join(parts[4:])
                for d, ldm in attn.items():
                    if rest.startswith(d + "."):
                        rest = ldm + rest[len(d) :]
                new = f"{parts[0]}.mid.attn_1.{rest}"
                if value.ndim == 2:
                    value = value[:, :, None, None]  # LDM keeps VAE attention as 1x1 convs
        new = new.replace("conv_shortcut", "nin_shortcut")
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return out


def write_ldm_checkpoint(model_dir: str | Path, out_file: str | Path) -> Path:
    """Save the tiny diffusers model at ``model_dir`` as one LDM-layout safetensors file."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir = Path(model_dir)
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    state = {}
    state.update(unet_to_ldm(unet.state_dict(), dict(unet.config)))
    state.update(vae_to_ldm(vae.state_dict(), dict(vae.config)))
    state.update(clip_to_ldm(te.state_dict()))
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(out_file))
    return Path(out_file)
