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
from loracraft.infer.prompts import build_chunks

TextEmbeds = dict[str, torch.Tensor]


def _token_ids(tokenizer, captions: Sequence[str], device, chunks: int = 1) -> torch.Tensor:
    """``[B * chunks, 77]`` token ids. One window: what the tokenizer gives with truncation.
    More: each caption cut into ``chunks`` windows of ``BOS + 75 tokens + EOS`` by the same
    :func:`loracraft.infer.prompts.build_chunks` that ``loracraft generate`` cuts long prompts
    with (A1111's windows, a phrase after a comma near a window's end moved to the next), the
    caption taken literally (no emphasis syntax), windows past ``chunks`` dropped."""
    length = tokenizer.model_max_length
    if chunks == 1:
        ids = tokenizer(
            list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(device)

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    comma = tokenizer.get_vocab().get(",</w>")
    rows = []
    for caption in captions:
        windows = build_chunks([(caption, 1.0)], tokenize, bos=tokenizer.bos_token_id, eos=tokenizer.eos_token_id,
                               pad=pad, min_chunks=chunks, comma=comma)
        rows += [w.ids for w in windows[:chunks]]
    return torch.tensor(rows, device=device)


def _per_caption(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """``[B * chunks, 77, D]`` -> ``[B, chunks * 77, D]``: the windows side by side, as A1111 joins them."""
    return hidden.reshape(hidden.shape[0] // chunks, chunks * hidden.shape[1], hidden.shape[2])


def _layer_back(out, back: int, clip_skip: int) -> torch.Tensor:
    """``hidden_states[-(back + 1)]``: the output ``back`` layers before the last."""
    layers = len(out.hidden_states) - 1  # hidden_states[0] is the token embedding, before any layer
    if back >= layers:
        raise ConfigError(
            f"model.clip_skip={clip_skip} skips every layer of a {layers}-layer text encoder, config, "
            f"use at most {clip_skip - (back - layers) - 1}"
        )
    return out.hidden_states[-(back + 1)]


def encode_prompt_sd(
    tokenizers, text_encoders, captions: Sequence[str], device, clip_skip: int = 1, chunks: int = 1
) -> TextEmbeds:
    """SD1.x/2.x: the text encoder's last hidden state (``{"text_embeds": (B, 77, D)}``).

    ``clip_skip`` counts as A1111, kohya and ``loracraft generate --clip-skip`` do: 1 = the last
    layer, k = the hidden state k - 1 layers before it, through the encoder's final layer norm
    (diffusers' ``StableDiffusionPipeline.encode_prompt(clip_skip=k - 1)``). With ``chunks`` = n,
    captions up to n x 75 tokens, each window encoded on its own: ``(B, n x 77, D)``.
    """
    encoder, ids = text_encoders[0], _token_ids(tokenizers[0], captions, device, chunks)
    if clip_skip <= 1:
        return {"text_embeds": _per_caption(encoder(ids)[0], chunks)}
    hidden = _layer_back(encoder(ids, output_hidden_states=True), clip_skip - 1, clip_skip)
    # transformers < 5 nests the layers in ``encoder.text_model``; 5 puts them on the encoder itself
    return {"text_embeds": _per_caption(getattr(encoder, "text_model", encoder).final_layer_norm(hidden), chunks)}


def encode_prompt_sdxl(
    tokenizers, text_encoders, captions: Sequence[str], device, clip_skip: int = 1, chunks: int = 1
) -> TextEmbeds:
    """SDXL: ``text_embeds`` = concat of both encoders' penultimate hidden states (B, 77, D1 + D2);
    ``pooled_text_embeds`` = ``text_encoder_2``'s projected pooled output (B, P).

    The penultimate layer is what SDXL was trained on (and what ``StableDiffusionXLPipeline``
    feeds at inference), so the adapter learns against the same features it will see there.
    ``clip_skip`` = k > 1 goes k - 1 layers further back, without a layer norm, as diffusers'
    ``StableDiffusionXLPipeline.encode_prompt(clip_skip=k - 1)`` does (``hidden_states[-(k + 1)]``).
    With ``chunks`` > 1 the pooled embedding is the first window's, as A1111 and kohya take it.
    """
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        out = encoder(_token_ids(tokenizer, captions, device, chunks), output_hidden_states=True)
        hidden.append(_per_caption(_layer_back(out, max(clip_skip, 1), clip_skip), chunks))
        pooled = getattr(out, "text_embeds", None)  # only CLIPTextModelWithProjection has it
    if pooled is None:
        raise TypeError("SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_embeds output)")
    return {"text_embeds": torch.cat(hidden, dim=-1), "pooled_text_embeds": pooled[::chunks]}


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


def conditioning_for(family: str, clip_skip: int = 1, max_token_length: int = 75) -> Conditioning:
    """The :class:`Conditioning` of ``"sd"`` or ``"sdxl"``, its prompts encoded at CLIP layer
    ``clip_skip`` (``model.clip_skip``, A1111 counting: 1 = the family's own layer) in
    ``max_token_length / 75`` windows (``data.max_token_length``)."""
    cond = CONDITIONINGS[family]
    chunks = max(1, max_token_length // 75)
    if clip_skip <= 1 and chunks == 1:
        return cond
    return replace(cond, encode_prompt=functools.partial(cond.encode_prompt, clip_skip=clip_skip, chunks=chunks))


__all__ = [
    "Conditioning",
    "conditioning_for",
    "encode_prompt_sd",
    "encode_prompt_sdxl",
    "unet_kwargs_sd",
    "unet_kwargs_sdxl",
]
