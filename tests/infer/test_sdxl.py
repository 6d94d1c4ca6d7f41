"""SDXL bases in loracraft.infer: loading, generation, adapters, kohya SGM names, family errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from loracraft.infer.adapters import load_adapter, unload
from loracraft.infer.errors import AdapterError
from loracraft.infer.formats import LORA_WEIGHT_NAME, read_lora, read_safetensors, unet_layout, write_lora
from loracraft.infer.generation import generate
from loracraft.infer.models import folder_family, load_base, model_family
from loracraft.infer.testing import run_infer_cli as run


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl):
    return load_base(tiny_sdxl)


@pytest.fixture(scope="module")
def sdxl_lora(tiny_sdxl, tmp_path_factory):
    """A random UNet attention adapter for the tiny SDXL (rank 4, alpha 8), diffusers format."""
    from loracraft.infer.adapters import build_random_lora

    out = tmp_path_factory.mktemp("sdxl-lora")
    build_random_lora(tiny_sdxl, out / LORA_WEIGHT_NAME, rank=4, alpha=8, seed=3)
    return out


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).astype(np.int16)


def test_sdxl_base_is_detected_and_loaded_as_the_xl_pipeline(tiny_sdxl, sdxl_pipe, tiny_sd):
    assert folder_family(tiny_sdxl) == "sdxl" and folder_family(tiny_sd) == "sd"
    assert type(sdxl_pipe).__name__ == "StableDiffusionXLPipeline" and model_family(sdxl_pipe) == "sdxl"


def test_generate_cli_on_sdxl_with_an_adapter_txt2img_img2img_inpaint(tiny_sdxl, sdxl_lora, tmp_path, capsys):
    out = tmp_path / "out"
    common = ("--base", tiny_sdxl, "--prompt", "a red circle", "--seed", 5, "--steps", 2, "--out", out)
    rc, problems = run("generate", *common, "--lora", f"{sdxl_lora}:1.0")
    assert rc == 0, problems
    (first,) = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    with_lora = Image.open(first)
    assert with_lora.size == (32, 32)
    rc, _ = run("generate", *common, "--out", tmp_path / "base")
    (base_file,) = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert np.abs(px(with_lora) - px(Image.open(base_file))).max() > 2  # the adapter changes the image
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(mask)
    for extra, mode in ((("--init-image", first), "img2img"), (("--init-image", first, "--mask", mask), "inpaint")):
        rc, problems = run("generate", *common, "--lora", str(sdxl_lora), "--steps", 4, *extra)
        assert rc == 0, problems
        (path,) = [line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert f'"mode": "{mode}"' in Image.open(path).text["loracraft"]


def test_loracraft_load_matches_plain_diffusers_load_on_sdxl(tiny_sdxl, sdxl_pipe, sdxl_lora):
    from diffusers import StableDiffusionXLPipeline

    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(sdxl_lora))
    load_adapter(sdxl_pipe, sdxl_lora)
    try:
        ours = generate(sdxl_pipe, "a red circle", seed=1, steps=2)[0].image
    finally:
        unload(sdxl_pipe)
    theirs = plain("a red circle", num_inference_steps=2, guidance_scale=7.5, width=32, height=32,
                   generator=torch.Generator().manual_seed(1)).images[0]
    assert np.abs(px(ours) - px(theirs)).max() <= 1


def test_sdxl_adapter_on_an_sd1_base_is_a_clear_adapter_error(tiny_sd, tiny_sdxl, sdxl_lora, sdxl_pipe, tmp_path):
    sd1 = load_base(tiny_sd)
    with pytest.raises(AdapterError) as e:
        load_adapter(sd1, sdxl_lora)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("SDXL adapter (its UNet modules include a second transformer layer) on an SD1.x/2.x base") and "load it on an SDXL base" in msg
    # and the reverse, for a file whose header says what it is (kohya's ss_base_model_version)
    sd_kohya = tmp_path / "sd1.safetensors"
    adapter = read_lora(sdxl_lora)
    adapter.metadata["ss_base_model_version"] = "sd_v1"
    write_lora(adapter, sd_kohya, to="kohya")
    with pytest.raises(AdapterError, match=r"^SD1.x/2.x adapter \(header ss_base_model_version=sd_v1\) on an SDXL base"):
        load_adapter(sdxl_pipe, sd_kohya)


#: kohya's SDXL UNet (SGM layout) names of tiny-SDXL modules, written out by hand from the layout
#: (layers_per_block 2: input_blocks 1-2 = down block 0, 3 = its downsampler, 4-5 = down block 1;
#: output_blocks 0-2 = up block 0 with its upsampler at .2, 3-5 = up block 1; in_layers.2 = conv1,
#: emb_layers.1 = time_emb_proj, out_layers.3 = conv2, skip_connection = conv_shortcut, op = downsampler).
HAND_SGM = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": "input_blocks_5_1_transformer_blocks_1_attn2_to_k",
    "down_blocks.1.attentions.0.proj_in": "input_blocks_4_1_proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": "input_blocks_4_1_transformer_blocks_0_ff_net_0_proj",
    "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0": "middle_block_1_transformer_blocks_1_attn1_to_out_0",
    "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_v": "output_blocks_2_1_transformer_blocks_1_attn2_to_v",
    "up_blocks.0.attentions.0.proj_out": "output_blocks_0_1_proj_out",
    "down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks_2_0_emb_layers_1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks_4_0_skip_connection",
    "mid_block.resnets.1.conv2": "middle_block_2_out_layers_3",
    "up_blocks.0.upsamplers.0.conv": "output_blocks_2_2_conv",
    "up_blocks.1.resnets.2.conv1": "output_blocks_5_0_in_layers_2",
    "time_embedding.linear_1": "time_embed_0",
    "add_embedding.linear_2": "label_emb_0_2",
    "conv_in": "input_blocks_0_0",
    "conv_out": "out_2",
}


def _sgm_and_diffusers_files(unet, tmp_path) -> tuple:
    """The same random LoRA twice: kohya file with SGM names, kohya file with diffusers-layout names."""
    gen = torch.Generator().manual_seed(0)
    modules = dict(unet.named_modules())
    sgm, plain = {}, {}
    for i, (path, sgm_name) in enumerate(HAND_SGM.items()):
        m, r = modules[path], 2
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(r, m.in_channels, *m.kernel_size, generator=gen)
            up = torch.randn(m.out_channels, r, 1, 1, generator=gen)
        else:
            down, up = torch.randn(r, m.in_features, generator=gen), torch.randn(m.out_features, r, generator=gen)
        for names, name in ((sgm, f"lora_unet_{sgm_name}"), (plain, "lora_unet_" + path.replace(".", "_"))):
            names[f"{name}.lora_down.weight"], names[f"{name}.lora_up.weight"] = down * 0.1, up * 0.1
            names[f"{name}.alpha"] = torch.tensor(float(1 + i % 3))
    header = {"ss_base_model_version": "sdxl_base_v1-0"}
    save_file(sgm, str(tmp_path / "sgm.safetensors"), metadata=header)
    save_file(plain, str(tmp_path / "plain.safetensors"), metadata=header)
    return tmp_path / "sgm.safetensors", tmp_path / "plain.safetensors"


def test_kohya_sgm_names_import_to_the_same_diffusers_modules(sdxl_pipe, tmp_path):
    sgm, plain = _sgm_and_diffusers_files(sdxl_pipe.unet, tmp_path)
    a, b = read_lora(sgm), read_lora(plain)
    assert sorted(a.modules["unet"]) == sorted(HAND_SGM)
    assert a.tensors_sha256() == b.tensors_sha256()  # same modules, tensors and alphas
    # converted through `loracraft convert`, the SGM file becomes plain diffusers keys
    rc, problems = run("convert", sgm, tmp_path / "conv", "--to", "diffusers")
    assert rc == 0, problems
    keys = read_safetensors(tmp_path / "conv" / LORA_WEIGHT_NAME)[0]
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    # and it loads onto the SDXL base (every module found, every shape fits)
    load_adapter(sdxl_pipe, sgm)
    unload(sdxl_pipe)
    # exporting writes kohya's SGM names back, exactly the hand-written ones (numbered by the base's layout)
    layout = unet_layout(sdxl_pipe.unet.config)
    exported = read_safetensors(write_lora(b, tmp_path / "again.safetensors", to="kohya", unet_layout=layout))[0]
    assert {k.split(".")[0] for k in exported} == {f"lora_unet_{v}" for v in HAND_SGM.values()}


def test_sgm_export_names_are_what_diffusers_maps_back_on_every_sdxl_module(sdxl_pipe):
    """Our diffusers -> SGM naming is checked against diffusers' SGM -> diffusers converter for every
    LoRA-able layer of the tiny SDXL and of the real SDXL base architecture (built on the meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from loracraft.infer.formats import (
        SDXL_BASE_UNET,
        diffusers_to_sgm_unet_name,
        module_to_kohya_name,
        sgm_unet_names_to_diffusers,
    )

    with init_empty_weights():
        real = UNet2DConditionModel(**SDXL_BASE_UNET)
    for unet in (sdxl_pipe.unet, real):
        paths = [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        names = {"lora_unet_" + module_to_kohya_name(diffusers_to_sgm_unet_name(p)): p for p in paths}
        assert len(names) == len(paths) > 100
        assert sgm_unet_names_to_diffusers(list(names)) == names
    assert diffusers_to_sgm_unet_name("up_blocks.1.upsamplers.0.conv") == "output_blocks.5.2.conv"
    assert diffusers_to_sgm_unet_name("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k") == (
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k"
    )


def test_mixed_sgm_and_diffusers_unet_names_are_refused(sdxl_pipe, tmp_path):
    sgm, plain = _sgm_and_diffusers_files(sdxl_pipe.unet, tmp_path)
    from loracraft.infer.formats import read_safetensors as rs

    mixed = {**rs(sgm)[0], **{k: v for k, v in rs(plain)[0].items() if "attn1_to_q" in k}}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    with pytest.raises(AdapterError, match="mixes SGM"):
        read_lora(tmp_path / "mixed.safetensors")
