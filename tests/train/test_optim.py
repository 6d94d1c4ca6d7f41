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
        trainer._optimizer_step()
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
