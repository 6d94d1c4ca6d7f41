"""Diffusion training math as tensor-in/tensor-out functions, each unit-tested by hand.

References: DDPM (Ho et al. 2020) epsilon objective; v-prediction (Salimans & Ho 2022,
"Progressive Distillation", sec. 4); min-SNR-gamma weighting (Hang et al. 2023,
arXiv:2303.09556); noise offset (Guttenberg 2023, crosslabs.org/blog/diffusion-with-offset-noise);
the rest of the training controls cite their source where they are defined.

Every random draw about one sample comes from a generator keyed by (seed, global sample
position, purpose): noise, timestep, noise offset, multi-resolution noise and input
perturbation each have their own key, so switching one control on or off leaves every other
draw unchanged (two runs differing only in ``noise_offset`` see the same timesteps and base
noise), and results depend neither on batch layout, process count nor where a run resumed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_snr

from loracraft.infer.errors import ConfigError
from loracraft.train.data import keyed_generator

#: the purpose keys of the per-sample generators (changing one changes every run's draws)
NOISE, TIMESTEP, OFFSET, MULTIRES, PERTURBATION = "noise", "timestep", "noise-offset", "multires-noise", "input-perturbation"
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")
LOSS_TYPES = ("mse", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


# ----------------------------------------------------------------------------- draws
def keyed_normal(shape: tuple[int, ...], positions: list[int], seed: int, purpose: str) -> torch.Tensor:
    """``[len(positions), *shape]`` standard normal draws, each sample's from its own
    generator keyed by (seed, position, purpose)."""
    return torch.stack([torch.randn(shape, generator=keyed_generator(seed, p, purpose)) for p in positions])


def sample_noise(latent_shape: tuple[int, ...], positions: list[int], seed: int) -> torch.Tensor:
    """The diffusion noise: one keyed standard normal draw per sample."""
    return keyed_normal(latent_shape, positions, seed, NOISE)


def sample_timesteps(
    positions: list[int],
    seed: int,
    num_train_timesteps: int,
    sampling: str = "uniform",
    min_timestep: int = 0,
    max_timestep: int | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Integer timesteps in ``[min_timestep, max_timestep)``, one keyed generator per sample.

    ``uniform`` is ``torch.randint(min, max)`` (kohya sd-scripts ``get_timesteps``, whose
    ``--min_timestep``/``--max_timestep`` bound it the same way, max exclusive). ``logit_normal``
    and ``mode`` are the SD3 paper's densities (Esser et al. 2024, arXiv:2403.03206, sec. 3.1),
    drawn by diffusers' ``compute_density_for_timestep_sampling``: ``u = sigmoid(N(mean, std))``
    (logit-normal) or ``u = 1 - v - scale * (cos(pi v / 2)^2 - 1 + v)`` with ``v ~ U(0, 1)``
    (mode); the timestep is ``min + floor(u * (max - min))``, as diffusers' SD3 scripts map
    ``u`` to ``indices = (u * num_train_timesteps).long()``.
    """
    lo, hi = min_timestep, num_train_timesteps if max_timestep is None else max_timestep
    if not 0 <= lo < hi <= num_train_timesteps:
        raise ConfigError(
            f"timestep range [{lo}, {hi}) is not inside the scheduler's [0, {num_train_timesteps}), "
            f"train.min_timestep/max_timestep, use 0 <= min_timestep < max_timestep <= {num_train_timesteps}"
        )
    if sampling not in TIMESTEP_SAMPLINGS:
        raise ConfigError(f"unknown train.timestep_sampling {sampling!r}, config, use one of {', '.join(TIMESTEP_SAMPLINGS)}")
    steps = []
    for pos in positions:
        gen = keyed_generator(seed, pos, TIMESTEP)
        if sampling == "uniform":
            steps.append(torch.randint(lo, hi, (1,), generator=gen))
            continue
        u = compute_density_for_timestep_sampling(
            sampling, 1, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, generator=gen
        )
        # sigmoid can round to exactly 1.0 in float32: keep the top index inside the range
        steps.append(lo + (u * (hi - lo)).long().clamp(0, hi - lo - 1))
    return torch.cat(steps).long()


def sample_noise_and_timesteps(
    latent_shape: tuple[int, ...],
    positions: list[int],
    seed: int,
    num_train_timesteps: int,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample noise (with an optional plain noise offset) and uniform timesteps.

    Drawing per sample (rather than one ``randn`` for the batch) makes the draws independent
    of batch size, accumulation and process count; that is what lets a 2-process run equal a
    1-process run and a resumed run equal an uninterrupted one.
    """
    noise = sample_noise(latent_shape, positions, seed)
    if noise_offset:
        noise = apply_noise_offset(noise, offset_draws(latent_shape[0], positions, seed), noise_offset)
    return noise, sample_timesteps(positions, seed, num_train_timesteps)


def offset_draws(channels: int, positions: list[int], seed: int) -> torch.Tensor:
    """The noise offset's per-sample, per-channel normal draws, ``[B, C, 1, 1]``."""
    return keyed_normal((channels, 1, 1), positions, seed, OFFSET)


def apply_noise_offset(
    noise: torch.Tensor,
    draws: torch.Tensor,
    noise_offset: float,
    latents: torch.Tensor | None = None,
    adaptive_noise_scale: float | None = None,
) -> torch.Tensor:
    """``noise + offset * draws``: one constant shift per sample and channel (Guttenberg 2023).

    With ``adaptive_noise_scale`` (kohya sd-scripts ``apply_noise_offset``) the offset of each
    channel grows with the latent's mean brightness: ``offset + scale * |mean_hw(latents)|``,
    clamped at 0 (the scale may be negative).
    """
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale is not None:
        if latents is None:
            raise ValueError("adaptive_noise_scale needs the latents")
        mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(noise_offset + adaptive_noise_scale * mean, min=0.0).to(noise.device)
    return noise + offset * draws.to(noise.device, noise.dtype)


def pyramid_noise(
    noise: torch.Tensor, positions: list[int], seed: int, iterations: int, discount: float
) -> torch.Tensor:
    """Multi-resolution ("pyramid") noise (Whitaker 2023, wandb.ai/johnowhitaker/multires_noise;
    kohya sd-scripts ``pyramid_noise_like``): level ``i`` adds normal noise drawn at
    ``1/r**i`` of the size (``r ~ U(2, 4)``, level 0 at full size), bilinearly upsampled and
    weighted ``discount**i``, stopping once a side reaches 1; the sum is divided by its std.

    kohya divides by the std of the whole batch; here each sample is divided by its own, so a
    sample's noise does not depend on what else is in its batch (exact multi-process runs).
    """
    out = []
    for k, pos in enumerate(positions):
        gen = keyed_generator(seed, pos, MULTIRES)
        n = noise[k : k + 1].float().clone()
        _, c, h, w = n.shape
        for i in range(iterations):
            r = float(torch.rand((), generator=gen)) * 2 + 2
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            level = torch.randn((1, c, hn, wn), generator=gen).to(n.device)
            n += F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
            if hn == 1 or wn == 1:
                break
        out.append(n / n.std())
    return torch.cat(out).to(noise.dtype)


def perturbation_draws(latent_shape: tuple[int, ...], positions: list[int], seed: int) -> torch.Tensor:
    """The input perturbation's per-sample normal draws (same shape as the noise)."""
    return keyed_normal(latent_shape, positions, seed, PERTURBATION)


def noise_latents(scheduler, latents: torch.Tensor, positions: list[int], cfg_train) -> tuple[torch.Tensor, ...]:
    """``(noise, timesteps, noisy_latents)`` for a batch with every noise control of ``cfg_train``.

    ``noise`` is what an epsilon model must predict: base noise, then the noise offset
    (adaptive if set), then multi-resolution noise, in kohya sd-scripts' order. Input
    perturbation (Ning et al. 2023, arXiv:2301.11706; diffusers ``train_text_to_image.py
    --input_perturbation``, kohya ``--ip_noise_gamma``) noises the latents with
    ``noise + gamma * fresh`` while the target keeps ``noise``.
    """
    t, device = cfg_train, latents.device
    shape = tuple(latents.shape[1:])
    noise = sample_noise(shape, positions, t.seed).to(device)
    if t.noise_offset:
        draws = offset_draws(shape[0], positions, t.seed)
        noise = apply_noise_offset(noise, draws, t.noise_offset, latents, t.adaptive_noise_scale)
    if t.multires_noise_iterations:
        noise = pyramid_noise(noise, positions, t.seed, t.multires_noise_iterations, t.multires_noise_discount)
    timesteps = sample_timesteps(
        positions, t.seed, scheduler.config.num_train_timesteps, t.timestep_sampling, t.min_timestep,
        t.max_timestep, t.logit_mean, t.logit_std, t.mode_scale,
    ).to(device)
    noised_with = noise
    if t.input_perturbation:
        noised_with = noise + t.input_perturbation * perturbation_draws(shape, positions, t.seed).to(device)
    return noise, timesteps, scheduler.add_noise(latents, noised_with, timesteps)


def sample_latents(mean: torch.Tensor, std: torch.Tensor, positions: list[int], seed: int) -> torch.Tensor:
    """Sample the VAE posterior ``mean + std * eps`` with keyed eps (one generator per sample)."""
    eps = keyed_normal(tuple(mean.shape[1:]), positions, seed, "latent")
    return mean + std * eps.to(device=mean.device, dtype=mean.dtype)


def with_zero_terminal_snr(scheduler):
    """The same scheduler with its betas rescaled to zero terminal SNR (Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", arXiv:2305.08891, Algorithm 1), by
    diffusers' own ``rescale_betas_zero_snr`` option: ``alphas_cumprod[-1] == 0``, so the last
    training timestep is pure noise, as at the start of sampling."""
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


# ----------------------------------------------------------------------------- targets and weights
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
    """Per-sample loss weights: min(SNR, gamma)/SNR for epsilon, min(SNR, gamma)/(SNR+1) for v.

    For epsilon ``min(snr, gamma)/snr`` is written ``gamma / max(snr, gamma)``: the same value
    for every SNR > 0, and its limit 1 at SNR = 0, the last timestep of a zero-terminal-SNR
    schedule, where the literal quotient is 0/0 = NaN (SimpleTuner sets ``weights[snr == 0] = 1``
    for the same reason; kohya's ``apply_snr_weight`` and diffusers' scripts divide as written).
    """
    snr = compute_snr(scheduler, timesteps)
    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return gamma / torch.clamp(snr, min=gamma)


#: SNR bounds of the debiased-estimation weight: kohya caps SNR at 1000 (SNR is huge at t=0);
#: the floor keeps 1/sqrt(SNR) finite at a zero-terminal-SNR schedule's last steps (SNR -> 0),
#: below every SNR of SD's own schedules (their smallest is ~0.005).
DEBIASED_SNR_RANGE = (1e-3, 1000.0)


def debiased_estimation_weights(scheduler, timesteps: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2023, arXiv:2310.08442; kohya ``apply_debiased_estimation``):
    weight ``1/sqrt(SNR)`` for epsilon, ``1/(SNR + 1)`` for v, SNR clamped to ``DEBIASED_SNR_RANGE``."""
    snr = compute_snr(scheduler, timesteps).clamp(*DEBIASED_SNR_RANGE)
    if prediction_type == "v_prediction":
        return 1 / (snr + 1)
    return 1 / torch.sqrt(snr)


def loss_weights(scheduler, timesteps: torch.Tensor, cfg_train, prediction_type: str) -> torch.Tensor | None:
    """The per-sample weights ``cfg_train`` asks for (min-SNR, debiased estimation; both multiply,
    as in kohya's ``train_network.py``), or None for plain averaging."""
    weights = None
    if cfg_train.snr_gamma:
        weights = min_snr_weights(scheduler, timesteps, cfg_train.snr_gamma, prediction_type)
    if cfg_train.debiased_estimation:
        debiased = debiased_estimation_weights(scheduler, timesteps, prediction_type)
        weights = debiased if weights is None else weights * debiased
    return weights


def huber_threshold(scheduler, timesteps: torch.Tensor, huber_c: float, schedule: str = "snr") -> torch.Tensor:
    """Per-sample ``c`` of the (pseudo-)Huber loss (Khrapov et al. 2024, "Improving Diffusion
    Models's Data-Corruption Resistance using Scheduled Pseudo-Huber Loss", arXiv:2403.16728;
    kohya sd-scripts ``get_huber_threshold_if_needed``):

    - ``constant``: ``c``;
    - ``exponential``: ``c ** (t / T)``, from 1 at t = 0 down to ``c`` at t = T;
    - ``snr``: ``(1 - c) / (1 + sigma_t)**2 + c`` with ``sigma_t = sqrt((1 - a_t) / a_t)``,
      near 1 for clean timesteps and ``c`` for noisy ones (kohya's default).
    """
    t = timesteps.float()
    if schedule == "constant":
        return torch.full_like(t, huber_c)
    if schedule == "exponential":
        alpha = -math.log(huber_c) / scheduler.config.num_train_timesteps
        return torch.exp(-alpha * t)
    if schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5  # inf at zero terminal SNR: c there
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ConfigError(f"unknown train.huber_schedule {schedule!r}, config, use one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "mse", huber_c: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-element loss in fp32 (kohya sd-scripts ``conditional_loss``): ``mse`` (kohya's l2)
    ``(p - y)^2``, ``l1`` ``|p - y|``, ``huber`` ``2c (sqrt((p - y)^2 + c^2) - c)`` (pseudo-Huber,
    ~ ``(p - y)^2`` for small errors, ``2c|p - y|`` for large), ``smooth_l1`` the same divided
    by ``c``; ``huber_c`` is per sample (``[B]``)."""
    diff = pred.float() - target.float()
    if loss_type == "mse":
        return diff**2
    if loss_type == "l1":
        return diff.abs()
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type={loss_type} needs huber_c")
        c = huber_c.to(diff.device).float().view(-1, *([1] * (diff.ndim - 1)))
        pseudo = torch.sqrt(diff**2 + c**2) - c
        return 2 * c * pseudo if loss_type == "huber" else 2 * pseudo
    raise ConfigError(f"unknown train.loss_type {loss_type!r}, config, use one of {', '.join(LOSS_TYPES)}")


def loss_options(scheduler, timesteps: torch.Tensor, cfg_train) -> dict:
    """Keyword arguments of :func:`diffusion_loss` for ``cfg_train.loss_type`` (and its ``huber_c``)."""
    if cfg_train.loss_type in ("huber", "smooth_l1"):
        c = huber_threshold(scheduler, timesteps, cfg_train.huber_c, cfg_train.huber_schedule)
        return {"loss_type": cfg_train.loss_type, "huber_c": c}
    return {"loss_type": cfg_train.loss_type}


def mask_weights(mask: torch.Tensor, size: tuple[int, int], unmasked_weight: float = 0.0) -> torch.Tensor:
    """Per-element loss weights ``[B, 1, h, w]`` from pixel masks ``[B, 1, H, W]`` in [0, 1]
    (``data.masks``): the mask at latent size by area averaging (kohya sd-scripts
    ``apply_masked_loss``: ``F.interpolate(mask, size=latents.shape[2:], mode="area")``), then
    ``unmasked_weight + (1 - unmasked_weight) * mask`` (OneTrainer's "unmasked weight": what black
    pixels still weigh), written ``1 - (1 - u)(1 - mask)`` so a white mask weighs exactly 1."""
    m = F.interpolate(mask.float(), size=tuple(size), mode="area").clamp(0.0, 1.0)
    return 1.0 - (1.0 - unmasked_weight) * (1.0 - m)


def mask_options(batch: dict, size: tuple[int, int], unmasked_weight: float) -> dict:
    """``element_weights`` for :func:`diffusion_loss` when the batch carries masks, else nothing."""
    if "mask" not in batch:
        return {}
    return {"element_weights": mask_weights(batch["mask"], size, unmasked_weight)}


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    loss_type: str = "mse",
    huber_c: torch.Tensor | None = None,
    element_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-element loss (MSE unless ``loss_type`` says otherwise) in fp32, times
    ``element_weights`` (loss masks, broadcast over channels), averaged per sample over every
    element (kohya's convention: not divided by the mask's area), weighted per sample, then
    averaged over the batch."""
    loss = elementwise_loss(pred, target, loss_type, huber_c)
    if element_weights is not None:
        loss = loss * element_weights.to(loss.device, loss.dtype)
    per_sample = loss.mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample.device)
    return per_sample.mean()


def prior_preservation_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    n_instance: int,
    prior_loss_weight: float,
    weights: torch.Tensor | None = None,
    loss_type: str = "mse",
    huber_c: torch.Tensor | None = None,
    element_weights: torch.Tensor | None = None,
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
        loss_type, huber_c, element_weights: as :func:`diffusion_loss` (split like ``weights``).
    """
    if not 0 < n_instance < pred.shape[0]:
        raise ValueError(f"n_instance={n_instance} must split a batch of {pred.shape[0]} into two non-empty parts")

    def half(rows: slice) -> torch.Tensor:
        w = None if weights is None else weights[rows]
        c = None if huber_c is None else huber_c[rows]
        e = None if element_weights is None else element_weights[rows]
        return diffusion_loss(pred[rows], target[rows], w, loss_type, c, e)

    return half(slice(0, n_instance)) + prior_loss_weight * half(slice(n_instance, None))


def kohya_metadata(cfg) -> dict[str, str]:
    """The training controls that are on, under kohya sd-scripts' ``ss_*`` metadata keys (what
    A1111's and kohya's LoRA info panels show). Off controls are left out; kohya's ``l2`` loss
    is ``mse`` here.
    """
    t = cfg.train
    on = {
        "ss_clip_skip": cfg.model.clip_skip if cfg.model.clip_skip > 1 else None,
        "ss_max_token_length": cfg.data.max_token_length if cfg.data.max_token_length != 75 else None,
        "ss_noise_offset": t.noise_offset or None,
        "ss_adaptive_noise_scale": t.adaptive_noise_scale,
        "ss_multires_noise_iterations": t.multires_noise_iterations or None,
        "ss_multires_noise_discount": t.multires_noise_discount if t.multires_noise_iterations else None,
        "ss_zero_terminal_snr": t.zero_terminal_snr or None,
        "ss_min_snr_gamma": t.snr_gamma,
        "ss_debiased_estimation": t.debiased_estimation or None,
        "ss_ip_noise_gamma": t.input_perturbation or None,
        "ss_loss_type": {"mse": None, "l1": "l1"}.get(t.loss_type, t.loss_type),
        "ss_masked_loss": True if cfg.data.masks else None,  # kohya --masked_loss / --alpha_mask
    }
    if t.loss_type in ("huber", "smooth_l1"):
        on.update(ss_huber_schedule=t.huber_schedule, ss_huber_c=t.huber_c)
    return {k: str(v) for k, v in on.items() if v is not None}


__all__ = [
    "apply_noise_offset", "debiased_estimation_weights", "diffusion_loss", "elementwise_loss", "huber_threshold",
    "keyed_normal", "kohya_metadata",
    "loss_options", "loss_weights", "mask_options", "mask_weights",
    "min_snr_weights", "noise_latents", "offset_draws", "perturbation_draws",
    "prior_preservation_loss", "pyramid_noise", "sample_latents", "sample_noise", "sample_noise_and_timesteps",
    "sample_timesteps", "training_target", "with_zero_terminal_snr",
]
