"""The toy base shipped as package data loads with plain diffusers and generates 32 px images."""

from __future__ import annotations

import json

import pytest
import torch

from loracraft.infer.toyworld import toy_base_path


@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(toy_base_path()), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_base_is_installed_package_data():
    path = toy_base_path()
    assert path.parts[-2:] == ("assets", "toy-base")
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / sub).is_dir(), sub
    weights = list(path.rglob("*.safetensors"))
    assert weights and sum(w.stat().st_size for w in weights) <= 25 * 2**20
    assert not list(path.rglob("*.bin"))  # safetensors only, nothing pickled
    card = (path / "README.md").read_text(encoding="utf-8")
    assert "build_toy_base.py" in card and "Seed" in card
    build = json.loads((path / "build.json").read_text())
    assert build["probe"]["full"] >= 0.8


def test_toy_base_weights_are_fp16_on_disk_and_upcast(toy_pipe):
    from safetensors import safe_open

    with safe_open(str(toy_base_path() / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    for module in (toy_pipe.unet, toy_pipe.vae, toy_pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}
    assert toy_pipe.vae.config.scaling_factor != 0.18215  # measured, not SD1.5's


def test_toy_base_loads_all_fp32_without_dtype():
    # transformers 5 defaults to dtype="auto"; the stored config must not make the text
    # encoder fp16 next to an fp32 UNet (that pipeline fails in its first matmul).
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(toy_base_path()))
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}


def test_toy_base_generates_32px(toy_pipe):
    out = toy_pipe(
        "a red circle on a blue background",
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(out)).all()
