"""Text-encoder LoRA: trains, turns the text cache off, and round-trips through diffusers and kohya files."""

import pytest
import torch
from safetensors.torch import load_file

from loracraft.infer.errors import ConfigError
from loracraft.train.config import build_config

TE = {"lora.text_encoder": "{rank: 4, alpha: 8}", "train.text_encoder_lr": 1e-2, "train.max_steps": 3}


@pytest.fixture(scope="module")
def te_run(tiny_sd, tmp_path_factory, make_trainer):
    from loracraft.infer.testing import write_captioned_dataset

    data = write_captioned_dataset(tmp_path_factory.mktemp("pair"), n=2, seed=5)
    trainer = make_trainer(tiny_sd, data, tmp_path_factory.mktemp("te") / "r", **TE)
    ids = _ids(trainer.c.tokenizer)
    with torch.no_grad():
        before = trainer.c.text_encoder(ids)[0].clone()
    for _ in range(3):
        trainer.optimizer_step()
    out = trainer.cleanup()
    return trainer, before, out


def _ids(tok):
    return tok(["a red square on blue"], padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids


def _pipe(tiny_sd, adapter=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    if adapter is not None:
        pipe.load_lora_weights(str(adapter.parent), weight_name=adapter.name)
    return pipe


def _assert_same_outputs(trainer, pipe):
    ids = _ids(trainer.c.tokenizer)
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        ours_te = trainer.c.text_encoder(ids)[0]
        torch.testing.assert_close(pipe.text_encoder(ids)[0], ours_te, rtol=1e-4, atol=1e-5)
        ours = trainer.accelerator.unwrap_model(trainer.unet)(x, t, ours_te).sample
        torch.testing.assert_close(pipe.unet(x, t, ours_te).sample, ours, rtol=1e-4, atol=1e-5)


def test_text_encoder_lora_trains_with_its_own_lr_and_changes_outputs(te_run):
    trainer, before, _ = te_run
    assert "text_lookup" not in trainer.sources  # text-embedding cache off
    te_params = [n for n in trainer.trainables if n.startswith("text_encoder.")]
    assert te_params and all("lora_" in n for n in te_params)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.optimizer.param_groups}
    assert groups == {"unet": pytest.approx(3e-3), "text_encoder": pytest.approx(1e-2)}
    assert not any(p.requires_grad for n, p in trainer.c.text_encoder.named_parameters() if "lora_" not in n)
    with torch.no_grad():
        after = trainer.c.text_encoder(_ids(trainer.c.tokenizer))[0]
    assert (after - before).abs().max() > 1e-4


def test_plain_diffusers_loads_the_text_encoder_lora(te_run, tiny_sd):
    trainer, before, out = te_run
    keys = load_file(str(out))
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    pipe = _pipe(tiny_sd, out)
    _assert_same_outputs(trainer, pipe)
    with torch.no_grad():
        assert (pipe.text_encoder(_ids(trainer.c.tokenizer))[0] - before).abs().max() > 1e-4


def test_text_encoder_lora_round_trips_through_kohya_with_loracraft_convert(te_run, tiny_sd, tmp_path, cli):
    trainer, _, out = te_run
    kohya, back = tmp_path / "kohya.safetensors", tmp_path / "back" / "pytorch_lora_weights.safetensors"
    for src, dst, to in ((out, kohya, "kohya"), (kohya, back, "diffusers")):
        proc = cli("convert", src, dst, "--to", to)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(k.startswith("lora_te_") for k in load_file(str(kohya)))
    _assert_same_outputs(trainer, _pipe(tiny_sd, kohya))
    _assert_same_outputs(trainer, _pipe(tiny_sd, back))


def test_text_encoder_options_are_checked():
    base = {"model": {"base": "x"}, "data": {"path": "y"}}
    with pytest.raises(ConfigError) as e:
        build_config(base, ["train.text_encoder_lr=1e-5", "train.cache=true", "lora.text_encoder={rank: 4}"])
    assert len(e.value.problems) == 1 and "train.cache=true but the text encoder trains" in e.value.problems[0]
    with pytest.raises(ConfigError, match="lora.text_encoder is null"):
        build_config(base, ["train.text_encoder_lr=1e-5"])


def test_cache_plan_turns_text_cache_off_when_the_text_encoder_trains():
    from loracraft.train.cache import cache_plan

    cfg = build_config({"model": {"base": "x"}, "data": {"path": "y", "center_crop": True}},
                       ["lora.text_encoder={rank: 4}"])
    plan = cache_plan(cfg, [(32, 32)], [(32, 32)])
    assert plan.latents and not plan.text
    assert any("the text encoder trains" in n for n in plan.notes)
