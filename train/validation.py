"""Held-out loss: the diffusion loss on images the run never trains on, comparable across checkpoints.

Training loss is measured on a fresh noise draw and timestep per step, so it jitters and, worse,
falls even when the adapter memorises the training set. The held-out figure fixes both: every
image gets the same noise and timestep (keyed by its index and :data:`HELDOUT_SEED`, independent
of the training step), so two checkpoints, or two runs on the same held-out set, differ only
by their weights. The lowest figure names the checkpoint that generalises best.

``validation.heldout`` is a folder of captioned images, or a fraction of the training data set
aside by :func:`split_heldout`. The trainer encodes the set once (:func:`encode_heldout`, before
the cache frees the VAE encoder and text encoders) and evaluates it with :func:`heldout_loss_of`;
``loracraft eval`` computes the same figure from a pipeline with :func:`heldout_loss`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loracraft.infer.errors import ConfigError, DataError
from loracraft.infer.io import write_json_atomic
from loracraft.train.data import CaptionedImages, load_captioned_images, load_pixels, size_conditioning
from loracraft.train.loss import diffusion_loss, sample_noise_and_timesteps, training_target

#: Fixed for every run and checkpoint: a figure is comparable only with the same noise and timesteps.
HELDOUT_SEED = 1234
HELDOUT_FILE = "heldout.json"


@dataclass
class HeldoutSet:
    """The held-out images encoded once: scaled latents, captions, text embeddings, SDXL size conditioning."""

    latents: list[torch.Tensor]
    captions: list[str]
    text: list[dict[str, torch.Tensor]]
    size_cond: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.latents)


def split_heldout(
    images: CaptionedImages, fraction: float, seed: int
) -> tuple[CaptionedImages, CaptionedImages]:
    """``(training, held out)``: the ``round(fraction x n)`` (at least 1) items whose sha256 of
    ``seed:key`` is lowest. Keyed by the item's name, not its position, so re-ordering the folder
    keeps the same images aside."""
    n = len(images)
    held = max(1, round(fraction * n))
    if n - held < 1:
        raise DataError(
            f"validation.heldout={fraction:g} leaves no training image, {images.root} ({n} images), "
            "add images or give a held-out folder instead"
        )
    rank = sorted(
        range(n), key=lambda i: hashlib.sha256(f"{seed}:{images.items[i].key}".encode()).hexdigest()
    )
    aside = set(rank[:held])
    keep = [it for i, it in enumerate(images.items) if i not in aside]
    out = [it for i, it in enumerate(images.items) if i in aside]
    return _view(images, keep), _view(images, out)


def _view(images: CaptionedImages, items: list) -> CaptionedImages:
    return CaptionedImages(
        items, images.layout, images.root, hf_dataset=images._hf, image_column=images._image_column
    )


def heldout_images(cfg, images: CaptionedImages) -> tuple[CaptionedImages, CaptionedImages | None]:
    """``(training images, held-out images or None)`` per ``validation.heldout``."""
    h = cfg.validation.heldout
    if h is None:
        return images, None
    if isinstance(h, float):
        return split_heldout(images, h, cfg.train.seed)
    if not Path(h).is_dir():
        raise ConfigError(
            f"held-out folder not found, validation.heldout={h}, give a folder of captioned images "
            "or a fraction such as 0.1"
        )
    d = cfg.data
    return images, load_captioned_images(h, d.image_column, d.caption_column, d.allow_outside_links)


def encode_heldout(
    images: CaptionedImages,
    resolution: int,
    vae,
    encode_text: Callable[[list[str]], dict[str, torch.Tensor]],
    dtype: torch.dtype | None = None,
) -> HeldoutSet:
    """Centre-cropped squares at ``resolution``, the VAE posterior mean (no sampling: fixed)."""
    device = next(vae.parameters()).device
    target = (resolution, resolution)
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    latents, captions, text, sizes = [], [], [], []
    with torch.no_grad():
        for i in range(len(images)):
            pixels, crop = load_pixels(images, i, target, True, False)
            mean = vae.encode(pixels[None].to(device, vae.dtype)).latent_dist.mean
            latents.append(((mean.float() - shift) * scale).to(dtype or mean.dtype))
            captions.append(images.caption(i))
            text.append(encode_text([captions[-1]]))
            sizes.append(size_conditioning(images.size(i), target, crop, False)[None].to(device))
    return HeldoutSet(latents, captions, text, sizes)


def heldout_loss_of(
    unet,
    scheduler,
    heldout: HeldoutSet,
    unet_kwargs: Callable[[dict, torch.Tensor], dict],
    encode_text: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
    seed: int = HELDOUT_SEED,
) -> float:
    """Mean plain MSE (no loss weighting, so every run's figure means the same) over the set.

    ``encode_text`` re-encodes the captions (a text encoder that trains changes its embeddings);
    without it the embeddings from :func:`encode_heldout` are used. Dropout is off meanwhile.
    """
    losses = []
    with torch.no_grad(), eval_mode(unet):
        for i, latents in enumerate(heldout.latents):
            noise, t = sample_noise_and_timesteps(
                tuple(latents.shape[1:]), [i], seed, scheduler.config.num_train_timesteps
            )
            noise, t = noise.to(latents.device, latents.dtype), t.to(latents.device)
            text = encode_text([heldout.captions[i]]) if encode_text else heldout.text[i]
            pred = unet(
                scheduler.add_noise(latents, noise, t), t, **unet_kwargs(text, heldout.size_cond[i])
            ).sample
            target = training_target(scheduler, latents, noise, t, scheduler.config.prediction_type)
            losses.append(float(diffusion_loss(pred.float(), target.float())))
    return math.fsum(losses) / len(losses)


@contextlib.contextmanager
def eval_mode(*modules):
    """Dropout off inside (LoRA dropout would make the figure random), each module's mode restored after."""
    was = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(modules, was, strict=True):
            m.train(training)


def heldout_loss(pipe, images: CaptionedImages, resolution: int, seed: int = HELDOUT_SEED) -> float:
    """The held-out loss of a pipeline's UNet with its current adapters and scales (``loracraft eval``)."""
    from diffusers import DDPMScheduler

    from loracraft.infer.models import model_family
    from loracraft.train.conditioning import conditioning_for

    cond = conditioning_for(model_family(pipe))  # the trainer's own text/size conditioning (SD1 or SDXL)
    n_enc = 2 if cond.family == "sdxl" else 1
    tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)][:n_enc]
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)][:n_enc]
    device = next(pipe.unet.parameters()).device

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        return cond.encode_prompt(tokenizers, encoders, captions, device)

    with torch.no_grad():
        heldout = encode_heldout(images, resolution, pipe.vae, encode, pipe.unet.dtype)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return heldout_loss_of(pipe.unet, sched, heldout, cond.unet_kwargs, seed=seed)


def write_heldout(folder: Path, step: int, loss: float) -> Path:
    """``heldout.json`` beside a checkpoint's adapter files: the figure that ranks it."""
    path = Path(folder) / HELDOUT_FILE
    write_json_atomic(path, {"step": step, "heldout_loss": loss, "seed": HELDOUT_SEED})
    return path


def read_heldout(folder: Path) -> float | None:
    path = Path(folder) / HELDOUT_FILE
    if not path.is_file():
        return None
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["heldout_loss"])
    except (ValueError, KeyError, TypeError):
        return None


__all__ = [
    "HELDOUT_SEED",
    "HeldoutSet",
    "split_heldout",
    "heldout_images",
    "encode_heldout",
    "heldout_loss_of",
    "heldout_loss",
    "write_heldout",
    "read_heldout",
    "eval_mode",
]
