"""Diffusion training math as tensor-in/tensor-out functions, each unit-tested by hand.

References: DDPM (Ho et al. 2020) epsilon objective; v-prediction (Salimans & Ho 2022,
"Progressive Distillation", sec. 4); min-SNR-gamma weighting (Hang et al. 2023,
arXiv:2303.09556); noise offset (Guttenberg 2023, crosslabs.org/blog/diffusion-with-offset-noise).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from loracraft.train.data import keyed_generator


def sample_noise_and_timesteps(
    latent_shape: tuple[int, ...],
    positions: list[int],
    seed: int,
    num_train_timesteps: int,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise and timesteps, each drawn from a generator keyed by (seed, position).

    Drawing per sample (rather than one ``randn`` for the batch) makes the draws independent
    of batch size, accumulation and process count; that is what lets a 2-process run equal a
    1-process run and a resumed run equal an uninterrupted one.
    """
    noises, steps = [], []
    for pos in positions:
        gen = keyed_generator(seed, pos, "noise")
        noise = torch.randn(latent_shape, generator=gen)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=gen)
        noises.append(noise)
        steps.append(torch.randint(0, num_train_timesteps, (1,), generator=gen))
    return torch.stack(noises), torch.cat(steps).long()


def sample_latents(mean: torch.Tensor, std: torch.Tensor, positions: list[int], seed: int) -> torch.Tensor:
    """Sample the VAE posterior ``mean + std * eps`` with keyed eps (one generator per sample)."""
    eps = torch.stack(
        [torch.randn(mean.shape[1:], generator=keyed_generator(seed, p, "latent")) for p in positions]
    )
    return mean + std * eps.to(device=mean.device, dtype=mean.dtype)


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or v = sqrt(a)*noise - sqrt(1-a)*x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample loss weights: min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR+1) for v."""
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE in fp32, per-sample weighted then averaged over the batch."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()


def prior_preservation_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_instance: int,
    prior_loss_weight: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """DreamBooth's objective (Ruiz et al. 2022, eq. 2): instance loss + weight x class ("prior") loss.

    The batch is the instance samples followed by their class samples, as in diffusers'
    ``train_dreambooth_lora.py`` (``torch.chunk(model_pred, 2)``); each half is averaged on its
    own, so the prior term keeps its weight whatever the two halves' sizes.

    Args:
        pred: model output, ``[n_instance + n_class, ...]``.
        target: what it should be (same shape).
        n_instance: how many leading samples are instance samples (at least 1, fewer than the batch).
        prior_loss_weight: weight of the class half's loss.
        weights: optional per-sample weights (min-SNR), ``[batch]``.
    """
    if not 0 < n_instance < pred.shape[0]:
        raise ValueError(f"n_instance={n_instance} must split a batch of {pred.shape[0]} into two non-empty parts")
    w_inst = w_prior = None
    if weights is not None:
        w_inst, w_prior = weights[:n_instance], weights[n_instance:]
    instance = diffusion_loss(pred[:n_instance], target[:n_instance], w_inst)
    prior = diffusion_loss(pred[n_instance:], target[n_instance:], w_prior)
    return instance + prior_loss_weight * prior
