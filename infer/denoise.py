"""The text-to-image denoising loop, written out: tokenize -> encode -> CFG loop -> VAE decode.

diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` ``__call__`` run the same
steps between argument checks, hooks and callbacks; here they are one screen long so each
tensor can be seen and changed (a per-step ``callback`` may replace the latents). For the same
seed and scheduler the result equals the pipeline's bit for bit on CPU (the tests check it).

Shapes for one image (B = 1), with the VAE factor ``f`` (8 for SD1/SD2/SDXL; derived from the
VAE, so toy and tiny models with other factors work too):

=====================  =====================================  ==================================
step                    SD1 (512 px)                           SDXL (1024 px)
=====================  =====================================  ==================================
token ids               77 per 75-token chunk (BOS + 75 + EOS)  same, once per tokenizer
text embeddings         (B, 77k, 768) last hidden state         (B, 77k, 768 + 1280) penultimate
                                                                states of both encoders, concat
pooled / micro-cond.    -                                      pooled (B, 1280) from encoder 2;
                                                               add_time_ids (B, 6) = original
                                                               size, crop top-left, target size
initial latents         (B, 4, H/f, W/f) = (1, 4, 64, 64),      (1, 4, 128, 128)
                        N(0, 1) x ``init_noise_sigma``
UNet input              (2B, 4, H/f, W/f): [uncond; text]      same, plus added_cond_kwargs
guidance                ``uncond + g * (text - uncond)``       same
decode                  ``vae.decode(latents / scaling)``       scaling 0.13025 instead of 0.18215
image                   (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) in [0, 1]
=====================  =====================================  ==================================
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from loracraft.infer.errors import UsageError
from loracraft.infer.prompts import Chunk, apply_emphasis, build_chunks, parse_emphasis

__all__ = ["TextConditioning", "encode_prompts", "denoise", "is_sdxl", "StepCallback"]

#: ``callback(step, timestep, latents)``; return a tensor to replace the latents, or None.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


@dataclass
class TextConditioning:
    """What the UNet is conditioned on for one prompt: ``embeds`` (B, 77k, D), SDXL ``pooled`` (B, P)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None


def is_sdxl(pipe) -> bool:
    """SDXL-style pipelines have a second text encoder whose pooled output feeds the UNet."""
    return (
        getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "tokenizer_2", None) is not None
    )


def _encoders(pipe) -> list[tuple]:
    pairs = [(pipe.tokenizer, pipe.text_encoder)]
    if is_sdxl(pipe):
        pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
    return [(t, e) for t, e in pairs if t is not None and e is not None]


def _chunks(tokenizer, text: str, min_chunks: int = 1) -> list[Chunk]:
    def tokenize(fragment: str) -> list[int]:
        return tokenizer(fragment, add_special_tokens=False, truncation=False)["input_ids"]

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return build_chunks(
        parse_emphasis(text),
        tokenize,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=pad,
        min_chunks=min_chunks,
        comma=tokenizer.get_vocab().get(",</w>"),
    )


def _encode_chunk(
    encoder, chunk: Chunk, clip_skip: int, sdxl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One 77-token window through one CLIP encoder -> (1, 77, D) hidden states (+ pooled).

    SD1/SD2 take the last hidden state, or with ``clip_skip`` N > 1 the state N layers from the
    end through the final layer norm (A1111 / kohya counting: 1 = last layer). SDXL takes the
    state N+1 from the end without the norm (N = 1: the penultimate layer, SDXL's default).
    """
    ids = torch.tensor([chunk.ids], device=encoder.device)
    if not sdxl and clip_skip == 1:
        out = encoder(ids, attention_mask=None)
        z, pooled = out[0], None
    else:
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None  # CLIPTextModelWithProjection's text_embeds
        if sdxl:
            z = out.hidden_states[-(clip_skip + 1)]
        else:
            # transformers 5 flattened CLIPTextModel (no ``.text_model``); diffusers' own
            # clip_skip path still reaches for it and fails there.
            norm = getattr(encoder, "text_model", encoder).final_layer_norm
            z = norm(out.hidden_states[-clip_skip])
    return apply_emphasis(z, chunk.weights), pooled


def _encode(pipe, text: str, n_chunks: int, clip_skip: int) -> TextConditioning:
    sdxl = is_sdxl(pipe)
    per_encoder, pooled = [], None
    for tokenizer, encoder in _encoders(pipe):
        zs = []
        for i, chunk in enumerate(_chunks(tokenizer, text, n_chunks)):
            z, p = _encode_chunk(encoder, chunk, clip_skip, sdxl)
            zs.append(z)
            if i == 0 and p is not None:
                pooled = p  # A1111 and diffusers both pool the first window only
        per_encoder.append(torch.cat(zs, dim=1))
    embeds = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
    dtype = (pipe.text_encoder_2 if sdxl else pipe.text_encoder).dtype
    return TextConditioning(embeds.to(dtype=dtype), pooled)


def encode_prompts(
    pipe, prompt: str, negative_prompt: str | None = None, *, clip_skip: int = 1
) -> tuple[TextConditioning, TextConditioning]:
    """Encode a prompt and its negative with A1111 syntax (emphasis, BREAK, > 75 tokens).

    Both get the same number of 77-token windows, so they stack into one CFG batch. An SDXL
    model saved with ``force_zeros_for_empty_prompt`` conditions "no negative prompt" on zeros,
    as its pipeline does; SD1/SD2 encode the empty string.
    """
    if int(clip_skip) < 1:
        raise UsageError(
            f"clip skip must be at least 1 (1 = last layer), --clip-skip {clip_skip}, use 1 or 2"
        )
    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    n = max(len(_chunks(tokenizer, prompt)), len(_chunks(tokenizer, negative_prompt or "")))
    with torch.no_grad():
        cond = _encode(pipe, prompt, n, int(clip_skip))
        zeros = is_sdxl(pipe) and negative_prompt is None and pipe.config.get("force_zeros_for_empty_prompt")
        if zeros:
            uncond = TextConditioning(torch.zeros_like(cond.embeds), torch.zeros_like(cond.pooled))
        else:
            uncond = _encode(pipe, negative_prompt or "", n, int(clip_skip))
    return cond, uncond


def _step_kwargs(scheduler, generator) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = 0.0
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


def _sdxl_added_cond(pipe, cond, uncond, width: int, height: int, cfg: bool) -> dict:
    """Pooled text + the six micro-conditioning numbers SDXL was trained with."""
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.embeds.dtype)
    text_embeds = cond.pooled
    if cfg:
        text_embeds = torch.cat([uncond.pooled, cond.pooled], dim=0)
        time_ids = torch.cat([time_ids, time_ids], dim=0)
    return {"text_embeds": text_embeds.to(pipe.device), "time_ids": time_ids.to(pipe.device)}


@torch.no_grad()
def denoise(
    pipe,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    generator: torch.Generator | None = None,
    clip_skip: int = 1,
    callback: StepCallback | None = None,
    conditioning: tuple[TextConditioning, TextConditioning] | None = None,
) -> np.ndarray:
    """Generate one image with the pipeline's components, step by step.

    Args:
        pipe: a Stable Diffusion or SDXL pipeline (its scheduler, adapters and scales are used).
        prompt: text in A1111 syntax (emphasis, BREAK, any length).
        negative_prompt: text to steer away from (``None``: SDXL zeros / SD1 empty string).
        steps: scheduler steps; guidance: CFG scale (<= 1 switches CFG off, as in diffusers).
        width: pixels, default the model's native size; height likewise.
        generator: the seed's generator; draws the initial noise (and ancestral noise).
        clip_skip: 1 = last CLIP layer, 2 = the one before it (A1111 counting).
        callback: ``callback(step, timestep, latents)`` after every scheduler step; a tensor
            it returns replaces the latents (e.g. to inspect or edit them mid-way).
        conditioning: precomputed :func:`encode_prompts` output (then the texts are ignored).

    Returns:
        the image as a float array (1, H, W, 3) in [0, 1], like ``pipe(..., output_type="np")``.
    """
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = int(pipe.unet.config.sample_size) * f
    width, height = int(width or native), int(height or native)
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise UsageError(
            "this UNet takes guidance as an embedding (LCM-style), denoise, use the diffusers pipeline for it"
        )
    cfg = guidance > 1
    cond, uncond = conditioning or encode_prompts(pipe, prompt, negative_prompt, clip_skip=clip_skip)
    text = torch.cat([uncond.embeds, cond.embeds]) if cfg else cond.embeds
    added = _sdxl_added_cond(pipe, cond, uncond, width, height, cfg) if is_sdxl(pipe) else None

    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=pipe.device)
    shape = (1, pipe.unet.config.in_channels, height // f, width // f)
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor(shape, generator=generator, device=pipe.device, dtype=cond.embeds.dtype)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = _step_kwargs(scheduler, generator)
    if added is not None and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # the SDXL pipeline does this, the SD1 one does not

    for i, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([latents] * 2) if cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = pipe.unet(model_in, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[
            0
        ]
        if cfg:
            pred_uncond, pred_text = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_text - pred_uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
        if callback is not None:
            replaced = callback(i, t, latents)
            latents = latents if replaced is None else replaced

    vae = pipe.vae.config
    if getattr(vae, "latents_mean", None) is not None and getattr(vae, "latents_std", None) is not None:
        mean = torch.tensor(vae.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(vae.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.scaling_factor + mean
    else:
        latents = latents / vae.scaling_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")
