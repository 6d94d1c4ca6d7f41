"""EMA of the adapter weights: hand-computed values, checkpoint round trip, export, config checks."""

import pytest
import torch
from safetensors.torch import load_file

from loracraft.infer.errors import ConfigError
from loracraft.train.ema import AdapterEMA


def test_update_every_n_steps_with_the_warm_up_by_hand():
    p = {"w": torch.nn.Parameter(torch.tensor([1.0, -2.0]))}
    ema = AdapterEMA(p, decay=0.5, every=2)
    with torch.no_grad():
        p["w"].copy_(torch.tensor([3.0, 2.0]))
    ema.update(p, step=1)  # not a multiple of every: skipped
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1.0, -2.0]))
    ema.update(p, step=2)  # the first update copies the weights (decay 0)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([3.0, 2.0]))
    with torch.no_grad():
        p["w"].copy_(torch.tensor([14.0, 13.0]))
    ema.update(p, step=4)  # the second: decay min(0.5, 2 / 11)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([3.0 + 11 * 9 / 11, 2.0 + 11 * 9 / 11]))
    with ema.applied(p):
        torch.testing.assert_close(p["w"].detach(), torch.tensor([12.0, 11.0]))
    torch.testing.assert_close(p["w"].detach(), torch.tensor([14.0, 13.0]))


@pytest.mark.parametrize("decay,every", [(0.999, 1), (0.9, 1), (0.95, 3)])
def test_matches_diffusers_ema_model_on_random_weights(decay, every):
    """diffusers' EMAModel (default warm-up), stepped at the same optimizer steps, is the reference."""
    from diffusers.training_utils import EMAModel

    g = torch.Generator().manual_seed(0)
    p = {"a": torch.nn.Parameter(torch.randn(4, 3, generator=g)), "b": torch.nn.Parameter(torch.randn(5, generator=g))}
    ours = AdapterEMA(p, decay=decay, every=every)
    theirs = EMAModel(list(p.values()), decay=decay)
    for step in range(1, 21):
        with torch.no_grad():
            for t in p.values():
                t.add_(torch.randn(t.shape, generator=g))
        ours.update(p, step)
        if step % every == 0:
            theirs.step(list(p.values()))
            assert ours.decay_at(step) == theirs.cur_decay_value
    for (name, _), shadow in zip(p.items(), theirs.shadow_params, strict=True):
        torch.testing.assert_close(ours.shadow[name], shadow, rtol=1e-6, atol=1e-6)
    assert any((ours.shadow[n] - t).abs().max() > 1e-3 for n, t in p.items())  # it does average


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("pair"), n=2, seed=5)


def _snapshot(trainer):
    return {n: p.detach().clone() for n, p in trainer.trainables.items()}


def test_ema_equals_a_hand_computed_ema_after_3_steps_and_is_exported(tiny_sd, pair, tmp_path, make_trainer):
    trainer = make_trainer(tiny_sd, pair, tmp_path / "r", **{"train.ema_decay": 0.9, "train.max_steps": 3})
    expected = _snapshot(trainer)
    for step in range(1, 4):
        trainer.optimizer_step()
        w = _snapshot(trainer)
        decay = 0.0 if step == 1 else min(0.9, step / (9 + step))  # diffusers EMAModel's warm-up
        expected = {n: decay * expected[n] + (1 - decay) * w[n] for n in w}
    assert any((expected[n] - w[n]).abs().max() > 1e-6 for n in w)  # the EMA lags the weights
    for n in expected:
        torch.testing.assert_close(trainer.ema.shadow[n], expected[n], rtol=1e-6, atol=1e-7)

    out = trainer.cleanup()
    final, ema_file = load_file(str(out)), load_file(str(out.parent / "pytorch_lora_weights_ema.safetensors"))
    assert final.keys() == ema_file.keys()
    by_suffix = {n.replace(".default", ""): t for n, t in expected.items()}
    for key, t in ema_file.items():
        module = key.removeprefix("unet.")
        torch.testing.assert_close(t, by_suffix[module])
    for key, t in final.items():  # the main file keeps the trained (not averaged) weights
        torch.testing.assert_close(t, {k.replace(".default", ""): v for k, v in w.items()}[key.removeprefix("unet.")])


def test_ema_survives_checkpoint_resume_exactly(tiny_sd, pair, tmp_path, make_trainer):
    over = {"train.ema_decay": 0.8, "train.max_steps": 4, "checkpoint.every": 2}
    a = make_trainer(tiny_sd, pair, tmp_path / "a", **over)
    a.train()
    b = make_trainer(tiny_sd, pair, tmp_path / "b", **{**over, "train.max_steps": 2})
    b.train()
    b.cleanup()
    c = make_trainer(
        tiny_sd, pair, tmp_path / "b",
        **{**over, "checkpoint.allow_config_change": "true", "checkpoint.resume": str(tmp_path / "b/checkpoints/step-000002")},
    )
    assert c.step == 2 and (tmp_path / "b/checkpoints/step-000002/ema.safetensors").is_file()
    c.train()
    for n in a.trainables:
        assert torch.equal(a.ema.shadow[n], c.ema.shadow[n]), n
        assert torch.equal(a.trainables[n], c.trainables[n]), n


def test_ema_options_without_ema_are_config_errors():
    from loracraft.train.config import build_config

    base = {"model": {"base": "x"}, "data": {"path": "y"}}
    with pytest.raises(ConfigError) as e:
        build_config(base, ["validation.use_ema=true", "output.export_ema=replace"])
    assert len(e.value.problems) == 2 and all("train.ema_decay is null" in p for p in e.value.problems)
    with pytest.raises(ConfigError, match="ema_decay"):
        build_config(base, ["train.ema_decay=1.5"])
