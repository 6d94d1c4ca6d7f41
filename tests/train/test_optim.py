"""Optimizers by name: each available one lowers the loss on a fixed batch; 8-bit AdamW's CPU error."""

import importlib.util
import sys
import types

import pytest
import torch

from loracraft.infer.errors import ConfigError
from loracraft.train import checkpoint as ckpt
from loracraft.train.config import TrainCfg
from loracraft.train.optim import build_optimizer, optimizer_problems

# Prodigy estimates its own step size; lr is a multiplier on it (1.0 is the recommended value).
LR = {"adamw": 3e-3, "adafactor": 3e-3, "prodigy": 1.0}


def _available(name: str) -> bool:
    return name != "prodigy" or importlib.util.find_spec("prodigyopt") is not None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("pair"), n=2, seed=5)


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor"])
def test_each_optimizer_lowers_the_loss_in_5_steps(name, tiny_sd, pair, tmp_path, make_trainer):
    if not _available(name):
        pytest.skip(f"{name} backend not installed")
    trainer = make_trainer(tiny_sd, pair, tmp_path / "r", **{"train.optimizer": name, "train.lr": LR[name]})
    assert type(trainer.optimizer.optimizer).__name__.lower().startswith(name[:5])
    fixed = next(trainer.batches)
    trainer.batches = iter([fixed] * 100)
    with torch.no_grad():
        before = trainer.compute_loss(fixed).item()
    for _ in range(5):
        trainer.optimizer_step()
    with torch.no_grad():
        after = trainer.compute_loss(fixed).item()
    assert after < before, (name, before, after)


@pytest.mark.parametrize("name", ["adamw", "prodigy", "adafactor"])
def test_optimizer_state_survives_the_pickle_free_checkpoint(name, tmp_path):
    if not _available(name):
        pytest.skip(f"{name} backend not installed")

    def state():
        torch.manual_seed(0)
        params = {"a.lora_A.weight": torch.nn.Parameter(torch.randn(4, 3)),
                  "a.lora_B.weight": torch.nn.Parameter(torch.randn(3, 4))}
        opt = build_optimizer(TrainCfg(optimizer=name), list(params.values()), LR[name])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return params, opt, sched

    def step(params, opt):
        opt.zero_grad()
        sum((p**3).sum() for p in params.values()).backward()
        opt.step()

    params, opt, sched = state()
    for _ in range(2):
        step(params, opt)
    path = ckpt.save_checkpoint(tmp_path, 2, params, opt, sched, state={})
    fresh, opt2, sched2 = state()
    ckpt.load_checkpoint(path, fresh, opt2, sched2)
    step(params, opt)
    step(fresh, opt2)
    for n in params:
        assert torch.equal(params[n], fresh[n]), n


def test_adamw8bit_on_cpu_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Whether or not bitsandbytes is installed, the reason given is the missing GPU.
    for module in (None, types.ModuleType("bitsandbytes")):
        monkeypatch.setitem(sys.modules, "bitsandbytes", module)
        with pytest.raises(ConfigError) as e:
            build_optimizer(TrainCfg(optimizer="adamw8bit"), [torch.nn.Parameter(torch.zeros(2))], 1e-3)
        assert "\n" not in str(e.value)
        assert "adamw8bit needs a CUDA GPU" in str(e.value) and "use train.optimizer=adamw" in str(e.value)


def test_adamw8bit_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else object())
    (problem,) = optimizer_problems(TrainCfg(optimizer="adamw8bit"))
    assert "bitsandbytes, which is not installed" in problem and "loracraft[bnb]" in problem


def test_adamw8bit_is_refused_before_any_weights_load(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="adamw8bit needs a CUDA GPU"):
        make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", setup=False, **{"train.optimizer": "adamw8bit"})


def test_prodigy_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else object())
    (problem,) = optimizer_problems(TrainCfg(optimizer="prodigy"))
    assert "pip install 'loracraft[prodigy]'" in problem


@pytest.mark.parametrize(
    "name, args, expected",
    [
        ("adamw", {"betas": [0.9, 0.99], "eps": "1e-7", "amsgrad": True}, {"betas": (0.9, 0.99), "eps": 1e-7, "amsgrad": True}),
        ("prodigy", {"d_coef": 0.5, "betas": [0.9, 0.99], "use_bias_correction": True},
         {"d_coef": 0.5, "betas": (0.9, 0.99), "use_bias_correction": True}),
    ],
)
def test_optimizer_args_reach_the_constructor(name, args, expected):
    if not _available(name):
        pytest.skip(f"{name} backend not installed")
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = build_optimizer(TrainCfg(optimizer=name, optimizer_args=args), params, LR[name])
    for key, value in expected.items():
        assert opt.param_groups[0][key] == value, key
    assert opt.param_groups[0]["lr"] == LR[name] and opt.param_groups[0]["weight_decay"] == 1e-2


@pytest.mark.parametrize(
    "name, args, expected",
    [
        ("adamw", {"beta": [0.9, 0.99]}, "train.optimizer_args.beta is not an argument of adamw, config, did you mean 'betas'?"),
        ("prodigy", {"d_cof": 2.0}, "train.optimizer_args.d_cof is not an argument of prodigy, config, did you mean 'd_coef'?"),
        ("adamw", {"lr": 1.0}, "train.optimizer_args.lr is set by loracraft, config, use train.lr instead"),
    ],
)
def test_unknown_optimizer_args_are_one_line_errors_naming_the_key(name, args, expected):
    if not _available(name):
        pytest.skip(f"{name} backend not installed")
    (problem,) = optimizer_problems(TrainCfg(optimizer=name, optimizer_args=args))
    assert problem.startswith(expected) and "\n" not in problem
    with pytest.raises(ConfigError, match="optimizer_args"):
        build_optimizer(TrainCfg(optimizer=name, optimizer_args=args), [torch.nn.Parameter(torch.zeros(2))], 1e-3)


def test_out_of_range_optimizer_arg_is_a_config_error():
    with pytest.raises(ConfigError, match=r"bad train.optimizer_args for adamw \(Invalid beta parameter"):
        build_optimizer(TrainCfg(optimizer_args={"betas": [1.5, 0.9]}), [torch.nn.Parameter(torch.zeros(2))], 1e-3)


def test_unknown_optimizer_arg_is_refused_before_any_weights_load(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    with pytest.raises(ConfigError, match="optimizer_args.betaz"):
        make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", setup=False, **{"train.optimizer_args": "{betaz: [0.9, 0.9]}"})
