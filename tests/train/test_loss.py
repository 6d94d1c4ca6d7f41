import math

import pytest
import torch
from diffusers import DDPMScheduler

from loracraft.train.loss import (
    diffusion_loss,
    min_snr_weights,
    sample_noise_and_timesteps,
    training_target,
)


@pytest.fixture
def sched():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _alpha_bar(sched, t):
    return float(sched.alphas_cumprod[t])


def test_epsilon_target_is_the_noise(sched):
    x0, noise = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    t = torch.tensor([10, 900])
    assert torch.equal(training_target(sched, x0, noise, t, "epsilon"), noise)


def test_v_target_matches_hand_computation(sched):
    x0 = torch.full((1, 1, 1, 1), 2.0)
    noise = torch.full((1, 1, 1, 1), -1.0)
    t = torch.tensor([500])
    ab = _alpha_bar(sched, 500)
    expected = math.sqrt(ab) * -1.0 - math.sqrt(1 - ab) * 2.0  # v = sqrt(ab)*eps - sqrt(1-ab)*x0
    got = training_target(sched, x0, noise, t, "v_prediction")
    torch.testing.assert_close(got, torch.full_like(got, expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(sched, pred_type):
    t = torch.tensor([0, 100, 500, 999])
    gamma = 5.0
    got = min_snr_weights(sched, t, gamma, pred_type)
    for i, step in enumerate(t.tolist()):
        ab = _alpha_bar(sched, step)
        snr = ab / (1 - ab)
        expected = min(snr, gamma) / snr if pred_type == "epsilon" else min(snr, gamma) / (snr + 1)
        assert got[i].item() == pytest.approx(expected, rel=1e-4)


def test_weighted_mse_by_hand():
    pred = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]])
    target = torch.zeros_like(pred)
    # per-sample MSE: (1+9)/2 = 5 and 0; weights 0.5 and 2 -> mean(2.5, 0) = 1.25
    assert diffusion_loss(pred, target, torch.tensor([0.5, 2.0])).item() == pytest.approx(1.25)
    assert diffusion_loss(pred, target).item() == pytest.approx(2.5)


def test_noise_is_keyed_by_position_not_batch_layout():
    shape = (4, 2, 2)
    together, t_together = sample_noise_and_timesteps(shape, [3, 4, 5], seed=7, num_train_timesteps=1000)
    alone, t_alone = sample_noise_and_timesteps(shape, [4], seed=7, num_train_timesteps=1000)
    assert torch.equal(together[1], alone[0]) and t_together[1] == t_alone[0]
    other_seed, _ = sample_noise_and_timesteps(shape, [4], seed=8, num_train_timesteps=1000)
    assert not torch.equal(alone, other_seed)


def test_noise_offset_shifts_each_channel_uniformly_and_keeps_the_timesteps():
    shape = (4, 8, 8)
    plain, t_plain = sample_noise_and_timesteps(shape, [0, 1, 2], seed=0, num_train_timesteps=1000)
    offset, t_offset = sample_noise_and_timesteps(shape, [0, 1, 2], seed=0, num_train_timesteps=1000, noise_offset=0.1)
    # the offset has its own generator: the same timesteps, and noise that differs only by the offset
    assert torch.equal(t_plain, t_offset)
    delta = offset - plain
    # the offset is constant over each channel's spatial extent, and not zero
    assert torch.allclose(delta, delta[..., :1, :1].expand_as(delta))
    assert delta.abs().max() > 0
