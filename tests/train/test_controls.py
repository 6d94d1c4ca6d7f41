"""Training controls (timesteps, noise, loss) against the formulas of the papers and trainers
they come from (kohya sd-scripts, diffusers, the SD3 / zero-terminal-SNR / pseudo-Huber papers)."""

import math
from statistics import NormalDist

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors import safe_open

from loracraft.infer.errors import ConfigError
from loracraft.train.config import TrainCfg, build_config
from loracraft.train.data import keyed_generator
from loracraft.train.loss import (
    apply_noise_offset,
    debiased_estimation_weights,
    diffusion_loss,
    elementwise_loss,
    huber_threshold,
    loss_weights,
    min_snr_weights,
    noise_latents,
    offset_draws,
    prior_preservation_loss,
    pyramid_noise,
    sample_noise,
    sample_timesteps,
    with_zero_terminal_snr,
)

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
MANY = list(range(4000))


@pytest.fixture(scope="module")
def sched():
    return DDPMScheduler(**SD)


@pytest.fixture(scope="module")
def ztsnr(sched):
    return with_zero_terminal_snr(sched)


def _snr(s, t):
    ab = float(s.alphas_cumprod[t])
    return ab / (1 - ab)


# ----------------------------------------------------------------------------- timesteps
def test_uniform_timesteps_are_kohyas_randint_within_min_max():
    got = sample_timesteps(MANY, 3, 1000, "uniform", min_timestep=200, max_timestep=800)
    assert got.min() == 200 and got.max() == 799  # max exclusive, both ends reached
    # each sample: torch.randint(min, max) from its own "timestep" generator
    for pos in (0, 17, 3999):
        expected = torch.randint(200, 800, (1,), generator=keyed_generator(3, pos, "timestep"))
        assert got[pos] == expected


def test_logit_normal_timesteps_follow_the_sd3_density():
    mean, std = 0.5, 0.8
    got = sample_timesteps(MANY, 0, 1000, "logit_normal", logit_mean=mean, logit_std=std).float()
    # exact: t = floor(1000 * sigmoid(mean + std * z)), z the sample's first normal draw
    for pos in (0, 5, 123):
        z = torch.randn(1, generator=keyed_generator(0, pos, "timestep"))
        assert got[pos] == math.floor(1000 * torch.sigmoid(mean + std * z).item())
    # the distribution: quantile q of t/1000 is sigmoid(mean + std * Phi^-1(q))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        expected = 1 / (1 + math.exp(-(mean + std * NormalDist().inv_cdf(q))))
        assert torch.quantile(got, q).item() / 1000 == pytest.approx(expected, abs=0.02), q


def test_logit_normal_respects_the_timestep_range():
    got = sample_timesteps(MANY, 0, 1000, "logit_normal", min_timestep=100, max_timestep=300)
    assert got.min() >= 100 and got.max() <= 299
    assert torch.quantile(got.float(), 0.5).item() == pytest.approx(200, abs=6)  # sigmoid(0) = mid-range


def test_mode_timesteps_follow_the_sd3_formula():
    scale = 1.29
    got = sample_timesteps([0, 1, 2], 9, 1000, "mode", mode_scale=scale)
    for pos in range(3):
        v = torch.rand(1, generator=keyed_generator(9, pos, "timestep")).item()
        u = 1 - v - scale * (math.cos(math.pi * v / 2) ** 2 - 1 + v)
        assert got[pos] == math.floor(u * 1000)


def test_timestep_range_outside_the_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="max_timestep"):
        sample_timesteps([0], 0, 1000, max_timestep=1200)


# ----------------------------------------------------------------------------- schedule
def test_zero_terminal_snr_matches_diffusers_and_lin_et_al_algorithm_1(sched, ztsnr):
    assert ztsnr.alphas_cumprod[-1].item() == 0.0
    ref = DDPMScheduler(**SD, rescale_betas_zero_snr=True)
    torch.testing.assert_close(ztsnr.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    # Algorithm 1: sqrt(abar) shifted so the last is 0, scaled so the first is unchanged
    s = sched.alphas_cumprod.double().sqrt()
    expected = ((s - s[-1]) * s[0] / (s[0] - s[-1])) ** 2
    torch.testing.assert_close(ztsnr.alphas_cumprod.double(), expected, rtol=1e-5, atol=1e-7)
    assert ztsnr.config.prediction_type == sched.config.prediction_type


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_min_snr_is_finite_at_zero_snr(ztsnr, pred_type):
    t = torch.tensor([0, 500, 998, 999])
    got = min_snr_weights(ztsnr, t, 5.0, pred_type)
    assert torch.isfinite(got).all()
    # SNR = 0 at t = 999: limit of min(snr, g)/snr is 1 (epsilon); min(snr, g)/(snr+1) is 0 (v)
    assert got[-1].item() == (1.0 if pred_type == "epsilon" else 0.0)
    for i, step in enumerate(t.tolist()[:-1]):
        snr = _snr(ztsnr, step)
        expected = min(snr, 5.0) / snr if pred_type == "epsilon" else min(snr, 5.0) / (snr + 1)
        assert got[i].item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("pred_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_is_kohyas_formula(sched, ztsnr, pred_type):
    t = torch.tensor([0, 10, 500, 999])
    got = debiased_estimation_weights(sched, t, pred_type)
    for i, step in enumerate(t.tolist()):
        snr = min(_snr(sched, step), 1000)  # kohya caps SNR at 1000 (t=0 of SD's schedule is ~1175)
        expected = 1 / math.sqrt(snr) if pred_type == "epsilon" else 1 / (snr + 1)
        assert got[i].item() == pytest.approx(expected, rel=1e-4)
    assert torch.isfinite(debiased_estimation_weights(ztsnr, torch.tensor([999]), pred_type)).all()


def test_min_snr_and_debiased_weights_multiply(sched):
    t = torch.tensor([3, 400])
    cfg = TrainCfg(snr_gamma=5.0, debiased_estimation=True)
    expected = min_snr_weights(sched, t, 5.0, "epsilon") * debiased_estimation_weights(sched, t, "epsilon")
    torch.testing.assert_close(loss_weights(sched, t, cfg, "epsilon"), expected)
    assert loss_weights(sched, t, TrainCfg(), "epsilon") is None


# ----------------------------------------------------------------------------- losses
def test_pseudo_huber_and_smooth_l1_by_hand():
    pred, target = torch.tensor([[3.0, 0.01]]), torch.zeros(1, 2)
    c = torch.tensor([0.1])
    huber = elementwise_loss(pred, target, "huber", c)
    assert huber[0, 0].item() == pytest.approx(2 * 0.1 * (math.sqrt(9 + 0.01) - 0.1), rel=1e-6)
    assert huber[0, 1].item() == pytest.approx(0.01**2, rel=5e-3)  # ~ squared error for small errors
    smooth = elementwise_loss(pred, target, "smooth_l1", c)
    assert smooth[0, 0].item() == pytest.approx(2 * (math.sqrt(9 + 0.01) - 0.1), rel=1e-6)
    assert elementwise_loss(pred, target, "l1")[0, 0].item() == 3.0
    assert elementwise_loss(pred, target, "mse")[0, 0].item() == 9.0


def test_huber_c_is_per_sample():
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    c = torch.tensor([0.1, 1.0])
    per = [2 * cc * (math.sqrt(1 + cc**2) - cc) for cc in (0.1, 1.0)]
    assert diffusion_loss(pred, target, None, "huber", c).item() == pytest.approx(sum(per) / 2, rel=1e-6)
    w = torch.tensor([2.0, 0.0])
    assert diffusion_loss(pred, target, w, "huber", c).item() == pytest.approx(per[0], rel=1e-6)
    # DreamBooth halves split huber_c like the weights
    pp = prior_preservation_loss(pred, target, 1, 0.5, None, "huber", c)
    assert pp.item() == pytest.approx(per[0] + 0.5 * per[1], rel=1e-6)


def test_huber_schedules_are_kohyas(sched, ztsnr):
    t = torch.tensor([0, 250, 999])
    torch.testing.assert_close(huber_threshold(sched, t, 0.1, "constant"), torch.full((3,), 0.1))
    expo = huber_threshold(sched, t, 0.1, "exponential")  # exp(-(-ln c / T) t) = c ** (t / T)
    torch.testing.assert_close(expo, torch.tensor([0.1 ** (s / 1000) for s in (0, 250, 999)]))
    snr = huber_threshold(sched, t, 0.1, "snr")
    for i, step in enumerate(t.tolist()):
        ab = float(sched.alphas_cumprod[step])
        sigma = math.sqrt((1 - ab) / ab)
        assert snr[i].item() == pytest.approx((1 - 0.1) / (1 + sigma) ** 2 + 0.1, rel=1e-5)
    assert huber_threshold(ztsnr, torch.tensor([999]), 0.1, "snr").item() == pytest.approx(0.1)


# ----------------------------------------------------------------------------- noise
def test_pyramid_noise_is_kohyas_pyramid_noise_like():
    noise = sample_noise((4, 8, 8), [5, 6], seed=1)
    got = pyramid_noise(noise, [5, 6], 1, iterations=3, discount=0.4)
    for k, pos in enumerate([5, 6]):  # kohya's loop, with the keyed generator in place of random/randn
        gen = keyed_generator(1, pos, "multires-noise")
        n = noise[k : k + 1].clone()
        up = torch.nn.Upsample(size=(8, 8), mode="bilinear")
        for i in range(3):
            r = torch.rand((), generator=gen).item() * 2 + 2
            wn, hn = max(1, int(8 / (r**i))), max(1, int(8 / (r**i)))
            n += up(torch.randn(1, 4, wn, hn, generator=gen)) * 0.4**i
            if wn == 1 or hn == 1:
                break
        torch.testing.assert_close(got[k : k + 1], n / n.std())
    assert got[0].std().item() == pytest.approx(1.0, rel=1e-5)


def test_adaptive_noise_offset_is_kohyas_formula():
    latents = torch.randn(2, 4, 8, 8) + torch.tensor([0.5, -1.0, 0.0, 2.0]).view(1, 4, 1, 1)
    noise, draws = torch.zeros(2, 4, 8, 8), offset_draws(4, [0, 1], seed=0)
    got = apply_noise_offset(noise, draws, 0.05, latents, adaptive_noise_scale=0.02)
    offset = (0.05 + 0.02 * latents.mean(dim=(2, 3), keepdim=True).abs()).clamp(min=0)
    torch.testing.assert_close(got, offset * draws.expand_as(got))
    clamped = apply_noise_offset(noise, draws, 0.05, latents, adaptive_noise_scale=-1.0)  # negative: floored at 0
    floored = torch.clamp(0.05 - latents.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    assert (floored == 0).any()
    torch.testing.assert_close(clamped, (floored * draws).expand_as(got))


def _cfg(**over):
    return TrainCfg(seed=4, **over)


def test_each_noise_control_leaves_the_other_draws_unchanged(sched):
    """Every draw has its own key: turning a control on changes only its own term, so runs
    with and without it are paired draw for draw (same timesteps, same base noise)."""
    latents, positions = torch.randn(3, 4, 8, 8), [10, 11, 12]
    plain_noise, plain_t, plain_noisy = noise_latents(sched, latents, positions, _cfg())
    for over in ({"noise_offset": 0.1}, {"multires_noise_iterations": 4}, {"input_perturbation": 0.1},
                 {"noise_offset": 0.1, "adaptive_noise_scale": 0.05, "multires_noise_iterations": 2}):
        noise, t, noisy = noise_latents(sched, latents, positions, _cfg(**over))
        assert torch.equal(t, plain_t), over
        assert not torch.equal(noisy, plain_noisy), over
    offset_noise, _, _ = noise_latents(sched, latents, positions, _cfg(noise_offset=0.1))
    delta = offset_noise - plain_noise  # exactly the offset term: constant per sample and channel
    torch.testing.assert_close(delta, 0.1 * offset_draws(4, positions, 4).expand_as(delta))
    # input perturbation: the target noise is unchanged, the latents are noised with noise + g * fresh
    noise, t, noisy = noise_latents(sched, latents, positions, _cfg(input_perturbation=0.1))
    assert torch.equal(noise, plain_noise)
    fresh = torch.stack([torch.randn(4, 8, 8, generator=keyed_generator(4, p, "input-perturbation")) for p in positions])
    torch.testing.assert_close(noisy, sched.add_noise(latents, plain_noise + 0.1 * fresh, t))
    # the timestep control changes only the timesteps
    noise, t, _ = noise_latents(sched, latents, positions, _cfg(timestep_sampling="logit_normal"))
    assert torch.equal(noise, plain_noise) and not torch.equal(t, plain_t)


def test_noisy_latents_are_the_schedulers_add_noise(sched):
    latents = torch.randn(2, 4, 8, 8)
    noise, t, noisy = noise_latents(sched, latents, [0, 1], _cfg(min_timestep=900))
    assert (t >= 900).all()
    torch.testing.assert_close(noisy, sched.add_noise(latents, noise, t))
    torch.testing.assert_close(noise, sample_noise((4, 8, 8), [0, 1], 4))


# ----------------------------------------------------------------------------- config
BASE = {"model": {"base": "x"}, "data": {"path": "y"}}


@pytest.mark.parametrize(
    "over, expected",
    [
        (["train.min_timestep=500", "train.max_timestep=500"], "is not below train.max_timestep"),
        (["train.adaptive_noise_scale=0.1"], "train.adaptive_noise_scale is set but has no effect"),
        (["train.huber_c=0.2"], "set train.loss_type=huber"),
        (["train.logit_std=2"], "timestep_sampling=logit_normal"),
        (["train.multires_noise_discount=0.5"], "multires_noise_iterations"),
        (["train.timestep_sampling=lognormal"], "train.timestep_sampling"),
        (["train.loss_type=l2"], "train.loss_type"),
    ],
)
def test_inconsistent_controls_are_one_line_config_errors(over, expected):
    with pytest.raises(ConfigError) as e:
        build_config(BASE, over)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_controls_parse_from_the_command_line_and_a_full_dump_revalidates():
    cfg = build_config(BASE, ["train.loss_type=huber", "train.huber_c=0.2", "train.timestep_sampling=logit_normal",
                              "train.logit_mean=-0.5", "train.optimizer_args={betas: [0.9, 0.99], eps: 1.0e-7}"])
    assert cfg.train.huber_c == 0.2 and cfg.train.logit_mean == -0.5
    assert cfg.train.optimizer_args == {"betas": [0.9, 0.99], "eps": 1.0e-7}
    assert build_config(build_config(BASE).dump()).train == TrainCfg()  # every key present, nothing flagged


# ----------------------------------------------------------------------------- in training
CONTROLS = {
    "model.prediction_type": "v_prediction", "train.zero_terminal_snr": "true",
    "train.noise_offset": 0.05, "train.adaptive_noise_scale": 0.02, "train.multires_noise_iterations": 3,
    "train.input_perturbation": 0.1, "train.timestep_sampling": "logit_normal", "train.logit_mean": -0.3,
    "train.min_timestep": 50, "train.max_timestep": 950, "train.loss_type": "huber", "train.huber_c": 0.2,
    "train.snr_gamma": 5.0, "train.debiased_estimation": "true", "train.optimizer_args": "{betas: [0.8, 0.95]}",
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("pair"), n=2, seed=5)


def test_controls_resume_exactly_and_change_training(tiny_sd, pair, tmp_path, make_trainer):
    over = {**CONTROLS, "train.max_steps": 4, "checkpoint.every": 2}
    a = make_trainer(tiny_sd, pair, tmp_path / "a", **over)
    assert a.c.noise_scheduler.alphas_cumprod[-1].item() == 0.0  # zero_terminal_snr reached the trainer
    assert a.optimizer.optimizer.param_groups[0]["betas"] == (0.8, 0.95)
    a.train()
    b = make_trainer(tiny_sd, pair, tmp_path / "b", **{**over, "train.max_steps": 2})
    b.train()
    out = b.cleanup()
    with safe_open(str(out), "pt") as f:  # the controls are named in the adapter's kohya header
        assert f.metadata()["ss_zero_terminal_snr"] == "True" and f.metadata()["ss_loss_type"] == "huber"
    c = make_trainer(
        tiny_sd, pair, tmp_path / "b",
        **{**over, "checkpoint.allow_config_change": "true", "checkpoint.resume": str(tmp_path / "b/checkpoints/step-000002")},
    )
    assert c.step == 2
    c.train()
    for n in a.trainables:
        assert torch.equal(a.trainables[n], c.trainables[n]), n
    # the controls are used, not accepted and ignored: without them the same 4 steps train other weights
    plain = make_trainer(tiny_sd, pair, tmp_path / "plain", **{"train.max_steps": 4, "model.prediction_type": "v_prediction"})
    plain.train()
    assert any(not torch.equal(a.trainables[n], plain.trainables[n]) for n in a.trainables)


def test_controls_that_are_on_are_named_in_kohyas_metadata_keys():
    from loracraft.train.loss import kohya_metadata

    assert kohya_metadata(build_config(BASE)) == {}  # defaults add nothing to the adapter header
    cfg = build_config(BASE, ["model.clip_skip=2", "data.max_token_length=225", "train.noise_offset=0.05",
                              "train.zero_terminal_snr=true",
                              "train.loss_type=huber", "train.input_perturbation=0.1", "train.debiased_estimation=true"])
    assert kohya_metadata(cfg) == {
        "ss_clip_skip": "2",
        "ss_max_token_length": "225",
        "ss_noise_offset": "0.05", "ss_zero_terminal_snr": "True", "ss_ip_noise_gamma": "0.1",
        "ss_debiased_estimation": "True", "ss_loss_type": "huber", "ss_huber_schedule": "snr", "ss_huber_c": "0.1",
    }


def test_controls_give_two_processes_the_same_result_as_one(tiny_sd, pair, tmp_path, make_trainer):
    """Every control's draw is keyed by the sample, and multi-resolution noise is normalised per
    sample, so 2 processes x batch 1 train what 1 process x batch 2 trains (up to the order of
    the gradient sum)."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    controls = {"train.noise_offset": 0.05, "train.adaptive_noise_scale": 0.02, "train.multires_noise_iterations": 3,
                "train.input_perturbation": 0.1, "train.timestep_sampling": "logit_normal", "train.loss_type": "huber",
                "train.debiased_estimation": "true", "train.max_steps": 2, "train.lr": 1e-3, "lora.rank": 4}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{base: {tiny_sd}}}\ndata: {{path: {pair}, resolution: 32}}\n"
                      "output: {report_to: [], report: false}\n")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
         "loracraft.train", str(recipe), f"output.dir={tmp_path / 'two'}", "train.batch_size=1",
         *(f"{k}={v}" for k, v in controls.items())],
        capture_output=True, text=True, timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = make_trainer(tiny_sd, pair, tmp_path / "one", **controls, **{"train.batch_size": 2})
    one.train()
    a = load_file(str(tmp_path / "two" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(one.cleanup()))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
