"""A random adapter for a base model (tests, benchmarks, demos): no training needed.

Built through the trainer's own save path, so an adapter from here has the layout and
metadata a trained one has; ``lora_B`` is random and non-zero so the adapter visibly changes
the output (PEFT initialises it to zero).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["build_random_lora"]


def build_random_lora(
    base: str | Path,
    out_path: str | Path,
    *,
    rank: int = 8,
    alpha: float = 4,
    seed: int = 0,
    targets: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    std: float = 0.5,
    text_encoder: bool = False,
) -> Path:
    """Write a diffusers-format adapter with random non-zero ``lora_B`` for the model at ``base``.

    Built exactly as the trainer saves: PEFT ``LoraConfig`` -> ``add_adapter`` ->
    ``convert_state_dict_to_diffusers(get_peft_model_state_dict(...))`` -> ``save_diffusers_lora``.
    """
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from loracraft.infer.formats import save_diffusers_lora

    gen = torch.Generator().manual_seed(seed)

    def randomise(model):
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.data = torch.randn(p.shape, generator=gen) * std

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian")
    unet.add_adapter(config)
    randomise(unet)
    unet_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_state = te_config = None
    if text_encoder:
        from peft import inject_adapter_in_model
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(str(base), subfolder="text_encoder")
        te_lora = LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
        )
        inject_adapter_in_model(te_lora, te)
        randomise(te)
        te_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
        te_config = te_lora.to_dict()
    return save_diffusers_lora(
        out_path,
        unet_state,
        config.to_dict(),
        extra_metadata={"loracraft.base_model": str(base)},
        text_encoder_state=te_state,
        text_encoder_lora_config=te_config,
    )
