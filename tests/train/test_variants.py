"""peft variants: DoRA (loads in plain diffusers; the kohya file carries dora_scale), rsLoRA, LoRA+ groups (LoHa/LoKr: test_lycoris.py)."""

import pytest
import torch
from safetensors.torch import load_file

from loracraft.train.optim import param_groups


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("pair"), n=2, seed=5)


def _probe():
    torch.manual_seed(0)
    return torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)


def _compare_with_plain_diffusers(trainer, tiny_sd, adapter_dir):
    from diffusers import StableDiffusionPipeline

    x, t, ehs = _probe()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(adapter_dir))
    with torch.no_grad():
        ours = trainer.accelerator.unwrap_model(trainer.unet)(x, t, ehs).sample
        theirs = pipe.unet(x, t, ehs).sample
        pipe.unload_lora_weights()
        base = pipe.unet(x, t, ehs).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    assert (theirs - base).abs().max() > 1e-4
    return pipe


def _train(trainer, steps):
    for _ in range(steps):
        trainer.optimizer_step()


def test_dora_with_loraplus_loads_back_in_plain_diffusers_with_equal_outputs(tiny_sd, pair, tmp_path, make_trainer):

    trainer = make_trainer(
        tiny_sd, pair, tmp_path / "r",
        **{"lora.use_dora": "true", "train.loraplus_lr_ratio": 16, "train.max_steps": 3},
    )
    mags = {n: p.detach().clone() for n, p in trainer.trainables.items() if "lora_magnitude_vector" in n}
    assert mags
    groups = {g["name"]: g for g in trainer.optimizer.optimizer.param_groups}
    assert groups["unet_lora_B"]["lr"] == pytest.approx(16 * groups["unet"]["lr"])
    _train(trainer, 3)
    assert any(not torch.equal(p, trainer.trainables[n]) for n, p in mags.items())  # magnitudes train
    out = trainer.cleanup()
    assert any(k.endswith(".lora_magnitude_vector") for k in load_file(str(out)))
    _compare_with_plain_diffusers(trainer, tiny_sd, out.parent)
    kohya = load_file(str(out.parent / "r.safetensors"))  # the run's kohya/LyCORIS file, DoRA as dora_scale
    assert any(k.endswith(".dora_scale") for k in kohya)


def test_rslora_scales_by_sqrt_rank_and_round_trips_through_kohya(tiny_sd, pair, tmp_path, make_trainer):
    from diffusers import StableDiffusionPipeline

    from loracraft.infer.formats import convert_lora_file

    trainer = make_trainer(tiny_sd, pair, tmp_path / "r", **{"lora.use_rslora": "true", "train.max_steps": 3})
    unet = trainer.accelerator.unwrap_model(trainer.unet)
    scalings = {m.scaling["default"] for m in unet.modules() if hasattr(m, "scaling") and "default" in m.scaling}
    assert len(scalings) == 1 and scalings.pop() == pytest.approx(4 / 8**0.5)  # alpha 4, rank 8
    _train(trainer, 3)
    out = trainer.cleanup()
    _compare_with_plain_diffusers(trainer, tiny_sd, out.parent)
    kohya = convert_lora_file(out, tmp_path / "k" / "kohya.safetensors", to="kohya")
    x, t, ehs = _probe()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, ehs).sample, unet(x, t, ehs).sample, rtol=1e-4, atol=1e-5)


def test_loraplus_groups_split_b_matrices_and_the_text_encoder():
    p = {n: torch.nn.Parameter(torch.zeros(1)) for n in
         ("m.lora_A.default.weight", "m.lora_B.default.weight", "text_encoder.q.lora_A.default.weight",
          "text_encoder.q.lora_B.default.weight")}
    groups = param_groups(p, 1e-4, loraplus_lr_ratio=16, text_encoder_lr=5e-5)
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [
        ("unet", 1e-4, 1), ("unet_lora_B", pytest.approx(1.6e-3), 1),
        ("text_encoder", 5e-5, 1), ("text_encoder_lora_B", pytest.approx(8e-4), 1),
    ]
    assert [g["name"] for g in param_groups(p, 1e-4)] == ["unet", "text_encoder"]
