"""The shared adapter files of a run and of every checkpoint: plain diffusers and the kohya single file
load them to the very weights that were trained, and their headers hold no path of this machine."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory, make_trainer):
    """4 steps, a checkpoint every 2, EMA exported beside the trained weights; every path absolute."""
    from loracraft.infer.testing import write_captioned_dataset

    root = tmp_path_factory.mktemp("export").absolute()
    data = write_captioned_dataset(root / "data", n=2, seed=5)
    over = {"train.max_steps": STEPS, "checkpoint.every": EVERY, "train.ema_decay": 0.5,
            "validation.prompts": '["a secret prompt"]', "validation.every": 1000}
    trainer = make_trainer(tiny_sd, data, root / "mystyle", **over)
    trainer.train()
    trainer.cleanup()
    return trainer, root


def _unet_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), torch.randn(1, 77, 32, generator=g)


def _unet_out(unet):
    with torch.no_grad():
        return unet(*_unet_inputs()).sample


def _reference(trainer, adapter: dict[str, torch.Tensor]):
    """The trainer's own (peft) UNet holding ``adapter`` - the weights as they were at that step."""
    saved = {n: p.detach().clone() for n, p in trainer.trainables.items()}
    with torch.no_grad():
        for n, p in trainer.trainables.items():
            p.copy_(adapter[n])
        out = _unet_out(trainer.accelerator.unwrap_model(trainer.unet))
        for n, p in trainer.trainables.items():
            p.copy_(saved[n])
    return out


def _plain_diffusers(tiny_sd, folder, weight_name=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd))
    pipe.load_lora_weights(str(folder), **({"weight_name": weight_name} if weight_name else {}))
    return _unet_out(pipe.unet)


def test_every_checkpoint_holds_both_shared_files_that_load_to_its_weights(run, tiny_sd):
    trainer, root = run
    folders = sorted((root / "mystyle" / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step-000002", "step-000004"]
    outputs = []
    for folder in folders:
        step = int(folder.name.removeprefix("step-"))
        kohya = f"mystyle-step-{step:06d}.safetensors"
        assert {"pytorch_lora_weights.safetensors", "pytorch_lora_weights_ema.safetensors", kohya,
                f"mystyle-step-{step:06d}-ema.safetensors"} <= {p.name for p in folder.iterdir()}
        expected = _reference(trainer, load_file(str(folder / "adapter.safetensors")))
        torch.testing.assert_close(_plain_diffusers(tiny_sd, folder), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(_plain_diffusers(tiny_sd, folder, kohya), expected, rtol=1e-4, atol=1e-5)
        with safe_open(str(folder / kohya), "pt") as f:
            keys, header = list(f.keys()), f.metadata()
        assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
        assert header["ss_network_dim"] == "8" and header["ss_network_alpha"] == "4.0"
        assert header["ss_steps"] == str(step)
        outputs.append(expected)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-6  # two different steps, not one file twice


def test_the_run_folder_holds_the_final_adapter_in_both_layouts(run, tiny_sd):
    trainer, root = run
    folder = root / "mystyle"
    assert (folder / "mystyle.safetensors").is_file() and (folder / "mystyle-ema.safetensors").is_file()
    expected = _unet_out(trainer.accelerator.unwrap_model(trainer.unet))
    torch.testing.assert_close(_plain_diffusers(tiny_sd, folder), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_plain_diffusers(tiny_sd, folder, "mystyle.safetensors"), expected, rtol=1e-4,
                               atol=1e-5)
    with trainer.ema.applied(trainer.trainables):  # the EMA pair holds the averaged weights
        averaged = _unet_out(trainer.accelerator.unwrap_model(trainer.unet))
    torch.testing.assert_close(_plain_diffusers(tiny_sd, folder, "mystyle-ema.safetensors"), averaged,
                               rtol=1e-4, atol=1e-5)


def _headers(folder):
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            yield path, f.metadata() or {}


def test_shared_headers_hold_no_path_of_this_machine(run, tiny_sd):
    from pathlib import Path

    _, root = run
    machine = [str(root), str(tiny_sd), str(Path.home()), "/tmp/"]
    absolute = re.compile(r"(^|[\s\"'(=:,])/[^/\s\"']+/")  # any absolute POSIX path inside a value
    seen = 0
    for path, header in _headers(root / "mystyle"):
        for key, value in header.items():
            seen += 1
            assert not any(m in value for m in machine), (path.name, key, value[:200])
            assert not absolute.search(value), (path.name, key, value[:200])
            assert "secret prompt" not in value and "loracraft_config" != key
    assert seen > 50
    header = dict(_headers(root / "mystyle"))[root / "mystyle" / "mystyle.safetensors"]
    assert header["ss_sd_model_name"] == Path(tiny_sd).name  # the base by name, as kohya writes it
    manifest = json.loads((root / "mystyle" / "run.json").read_text())
    assert manifest["config"]["data"]["path"] == str(root / "data")  # the full config stays local


def test_share_config_puts_the_config_into_the_header(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "shared",
                           **{"train.max_steps": 1, "output.share_config": "true"})
    trainer.train()
    out = trainer.cleanup()
    with safe_open(str(out), "pt") as f:
        config = json.loads(f.metadata()["loracraft_config"])
    assert config["data"]["path"] == str(tiny_dataset) and config["output"]["share_config"] is True


def test_base_model_name_is_the_folder_name_or_the_hub_id(tmp_path):
    from loracraft.train.export import base_model_name

    assert base_model_name(str(tmp_path / "models" / "sd15")) == "sd15"
    assert base_model_name("~/models/sd15") == "sd15"
    assert base_model_name("./sd15") == "sd15"
    assert base_model_name("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
