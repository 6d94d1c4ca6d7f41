"""kohya SDXL (SGM) names follow the base UNet's real block layout, not SDXL's ``layers_per_block=2``.

On SDXL-architecture bases with ``layers_per_block`` 1 and 2: a diffusers adapter on every kind of UNet
layer -> ``loracraft convert --to kohya`` -> plain diffusers ``load_lora_weights`` (which numbers SGM
blocks from the pipeline's own UNet config) adapts exactly the same layers and gives the same UNet
output as the original adapter loaded the same way.
"""

from __future__ import annotations

import pytest
import torch

from loracraft.infer.errors import AdapterError
from loracraft.infer.formats import (
    FAMILY_METADATA_KEY,
    LORA_WEIGHT_NAME,
    UNET_LAYOUT_KEY,
    convert_lora_file,
    read_safetensors,
    save_diffusers_lora,
)
from loracraft.train.cli import main

#: Attention, projection, feed-forward, resnet, shortcut, sampler, embedding and in/out layers.
TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
    "time_emb_proj", "conv_shortcut", "conv", "linear_1", "linear_2", "conv_in", "conv_out",
]  # fmt: skip


@pytest.fixture(scope="module", params=[1, 2], ids=["layers_per_block=1", "layers_per_block=2"])
def base(request, tmp_path_factory):
    from loracraft.infer.testing import build_tiny_sdxl

    return build_tiny_sdxl(
        tmp_path_factory.mktemp(f"sdxl-lpb{request.param}") / "model", layers_per_block=request.param
    )


def _pipe(base):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(base))


def _adapter(base, folder, record_layout: bool = True):
    """A random LoRA on every TARGETS layer of the base's UNet, saved as the trainer does."""
    from peft import LoraConfig, get_peft_model_state_dict

    unet = _pipe(base).unet
    config = LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False)
    unet.add_adapter(config)
    path = folder / LORA_WEIGHT_NAME
    save_diffusers_lora(
        path,
        get_peft_model_state_dict(unet),
        config.to_dict(),
        {FAMILY_METADATA_KEY: "sdxl"},
        unet_config=unet.config if record_layout else None,
    )
    return path


def _unet_out(pipe) -> torch.Tensor:
    c = pipe.unet.config
    g = torch.Generator().manual_seed(0)
    text = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    with torch.no_grad():
        return pipe.unet(
            torch.randn(1, 4, 16, 16, generator=g),
            500,
            torch.randn(1, 7, c.cross_attention_dim, generator=g),
            added_cond_kwargs={
                "text_embeds": torch.randn(1, text, generator=g),
                "time_ids": torch.rand(1, 6, generator=g),
            },
        ).sample


def _adapted(pipe) -> set[str]:
    """UNet layers that received this adapter's weights."""
    from peft.tuners.lora import LoraLayer

    return {n for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer) and "x" in m.lora_A}


def _loaded(base, file) -> tuple[torch.Tensor, set[str]]:
    pipe = _pipe(base)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="x")
    return _unet_out(pipe), _adapted(pipe)


def test_kohya_file_loads_in_plain_diffusers_like_the_original(base, tmp_path):
    src = _adapter(base, tmp_path / "diffusers")
    kohya = convert_lora_file(src, tmp_path / "kohya" / "k.safetensors", to="kohya")
    tensors, header = read_safetensors(kohya)
    assert any(k.startswith("lora_unet_input_blocks_") for k in tensors) and UNET_LAYOUT_KEY in header

    expected, expected_layers = _loaded(base, src)
    got, got_layers = _loaded(base, kohya)
    assert len(expected_layers) > 60 and got_layers == expected_layers  # nothing dropped, nothing misplaced
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (expected - _unet_out(_pipe(base))).abs().max() > 1e-2  # the adapter does change the output


def test_unknown_layout_of_a_non_standard_base_is_refused_and_base_fixes_it(base, tmp_path, capsys):
    src = _adapter(base, tmp_path / "diffusers", record_layout=False)
    out = tmp_path / "k.safetensors"
    capsys.readouterr()
    assert main(["convert", str(src), str(out), "--to", "kohya"]) == AdapterError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layout is unknown" in err and "--base MODEL" in err and not out.exists()

    assert main(["convert", str(src), str(out), "--to", "kohya", "--base", str(base)]) == 0
    expected, layers = _loaded(base, src)
    got, got_layers = _loaded(base, out)
    assert got_layers == layers
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
