"""What the UNet is conditioned on, per model family: SD1.x/2.x or SDXL.

The training loop asks one :class:`Conditioning` (chosen once from the base's family) two
questions: how to encode a batch of captions, and which keyword arguments the UNet gets.
Everything SDXL-specific lives here, so ``train_step`` has no family branches.

SDXL follows diffusers' ``train_text_to_image_lora_sdxl.py`` (``encode_prompt``,
``compute_time_ids``) and kohya's ``sdxl_train_network.py``: both text encoders' penultimate
hidden states (``hidden_states[-2]``) concatenated on the feature axis, the pooled embedding
from ``text_encoder_2``'s projection, and ``add_time_ids`` = (original size, crop top-left,
target size) of each sample, taken from the data pipeline's resize/crop bookkeeping
(:func:`loracraft.train.data.size_conditioning`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from loracraft.infer.errors import ConfigError

TextEmbeds = dict[str, torch.Tensor]


def _token_ids(tokenizer, captions: Sequence[str], device) -> torch.Tensor:
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def _layer_back(out, back: int, clip_skip: int | None) -> torch.Tensor:
    """``hidden_states[-(back + 1)]``: the output ``back`` layers before the last."""
    layers = len(out.hidden_states) - 1  # hidden_states[0] is the token embedding, before any layer
    if back >= layers:
        raise ConfigError(
            f"model.clip_skip={clip_skip} skips every layer of a {layers}-layer text encoder, config, "
            f"use at most {clip_skip - (back - layers) - 1}"
        )
    return out.hidden_states[-(back + 1)]


def encode_prompt_sd(
    tokenizers, text_encoders, captions: Sequence[str], device, clip_skip: int | None = None
) -> TextEmbeds:
    """SD1.x/2.x: the text encoder's last hidden state (``{"text_embeds": (B, 77, D)}``).

    With ``clip_skip`` = k, the hidden state k layers before the last, through the encoder's
    final layer norm, as diffusers' ``StableDiffusionPipeline.encode_prompt(clip_skip=k)`` and
    kohya's ``--clip_skip k+1`` (A1111's "Clip skip" k+1) compute it.
    """
    encoder, ids = text_encoders[0], _token_ids(tokenizers[0], captions, device)
    if not clip_skip:
        return {"text_embeds": encoder(ids)[0]}
    hidden = _layer_back(encoder(ids, output_hidden_states=True), clip_skip, clip_skip)
    # transformers < 5 nests the layers in ``encoder.text_model``; 5 puts them on the encoder itself
    return {"text_embeds": getattr(encoder, "text_model", encoder).final_layer_norm(hidden)}


def encode_prompt_sdxl(
    tokenizers, text_encoders, captions: Sequence[str], device, clip_skip: int | None = None
) -> TextEmbeds:
    """SDXL: ``text_embeds`` = concat of both encoders' penultimate hidden states (B, 77, D1 + D2);
    ``pooled_text_embeds`` = ``text_encoder_2``'s projected pooled output (B, P).

    The penultimate layer is what SDXL was trained on (and what ``StableDiffusionXLPipeline``
    feeds at inference), so the adapter learns against the same features it will see there.
    ``clip_skip`` = k goes k layers further back, without a layer norm, as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt(clip_skip=k)`` does (``hidden_states[-(k + 2)]``).
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        out = encoder(_token_ids(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(_layer_back(out, 1 + (clip_skip or 0), clip_skip))
        pooled = getattr(out, "text_embeds", None)  # only CLIPTextModelWithProjection has it
    if pooled is None:
        raise TypeError("SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_embeds output)")
    return {"text_embeds": torch.cat(hidden, dim=-1), "pooled_text_embeds": pooled}


def unet_kwargs_sd(text: TextEmbeds, size_cond: torch.Tensor | None) -> dict:
    """SD1.x/2.x: cross-attention on the hidden states only."""
    return {"encoder_hidden_states": text["text_embeds"]}


def unet_kwargs_sdxl(text: TextEmbeds, size_cond: torch.Tensor) -> dict:
    """SDXL: also ``added_cond_kwargs`` = pooled text embedding + ``time_ids`` (B, 6).

    ``size_cond`` is the per-sample (orig h, orig w, crop top, crop left, target h, target w)
    from the data pipeline; it goes in as the hidden states' dtype, as diffusers' script does.
    """
    hidden = text["text_embeds"]
    time_ids = size_cond.to(hidden.device, hidden.dtype)
    return {
        "encoder_hidden_states": hidden,
        "added_cond_kwargs": {"text_embeds": text["pooled_text_embeds"], "time_ids": time_ids},
    }


@dataclass(frozen=True)
class Conditioning:
    """How one model family turns captions and size bookkeeping into UNet inputs."""

    family: str
    encode_prompt: Callable[..., TextEmbeds]
    unet_kwargs: Callable[[TextEmbeds, torch.Tensor | None], dict]
    #: batch keys the text cache provides for this family
    text_keys: tuple[str, ...]


CONDITIONINGS = {
    "sd": Conditioning("sd", encode_prompt_sd, unet_kwargs_sd, ("text_embeds",)),
    "sdxl": Conditioning("sdxl", encode_prompt_sdxl, unet_kwargs_sdxl, ("text_embeds", "pooled_text_embeds")),
}


def conditioning_for(family: str, clip_skip: int | None = None) -> Conditioning:
    """The :class:`Conditioning` of ``"sd"`` or ``"sdxl"``, its prompts encoded ``clip_skip``
    layers before the usual one (``model.clip_skip``; None or 0 = the family's own layer)."""
    cond = CONDITIONINGS[family]
    if not clip_skip:
        return cond
    return replace(cond, encode_prompt=functools.partial(cond.encode_prompt, clip_skip=clip_skip))


__all__ = [
    "Conditioning",
    "conditioning_for",
    "encode_prompt_sd",
    "encode_prompt_sdxl",
    "unet_kwargs_sd",
    "unet_kwargs_sdxl",
]
