"""Adapters on a pipeline: scale 0 = base, stacking, fuse/unfuse, kohya parity with plain diffusers, fit errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from loracraft.infer import adapters as A
from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.formats import LORA_WEIGHT_NAME, read_lora, read_safetensors, write_lora
from loracraft.infer.generation import generate
from loracraft.infer.models import load_base

STEPS = 2
PROMPT = "a red circle on a blue background"


@pytest.fixture
def pipe(tiny_sd):
    return load_base(tiny_sd)


def image(pipe, seed: int = 0, prompt: str = PROMPT) -> np.ndarray:
    return np.asarray(generate(pipe, prompt, seed=seed, steps=STEPS)[0].image).astype(np.int16)


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("style.safetensors", ("style.safetensors", 1.0)),
        ("style.safetensors:0.7", ("style.safetensors", 0.7)),
        ("dir/lora:-1", ("dir/lora", -1.0)),
        ("C:/loras/style.safetensors", ("C:/loras/style.safetensors", 1.0)),
        ("C:/loras/style.safetensors:2", ("C:/loras/style.safetensors", 2.0)),
    ],
)
def test_parse_lora_arg(text, expected):
    assert A.parse_lora_arg(text) == expected


def test_adapter_changes_the_image_and_scale_zero_equals_base(pipe, lora_dir):
    base = image(pipe)
    loaded = A.load_adapter(pipe, lora_dir)
    assert loaded.name == lora_dir.name and loaded.format == "diffusers" and loaded.num_modules == 32
    with_lora = image(pipe)
    assert max_diff(with_lora, base) > 5
    A.set_scales(pipe, {loaded.name: 0.0})
    assert np.array_equal(image(pipe), base)


def test_two_adapters_weights_1_0_equal_the_first_alone(pipe, lora_dir, lora_dir_b):
    A.load_adapter(pipe, lora_dir, name="a")
    first_alone = image(pipe)
    A.load_adapter(pipe, lora_dir_b, name="b")
    both = image(pipe)
    assert max_diff(both, first_alone) > 5  # b (UNet + text encoder) does something
    A.set_scales(pipe, [1.0, 0.0])
    assert np.array_equal(image(pipe), first_alone)
    A.set_scales(pipe, [0.0, 0.0])
    A.unload(pipe)
    assert A.loaded_adapters(pipe) == []


def test_fused_matches_unfused_and_unfuse_restores_base_exactly(pipe, lora_dir, lora_dir_b):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = image(pipe)
    A.load_adapters(pipe, [f"{lora_dir}:0.8", (lora_dir_b, 0.5)])
    unfused = image(pipe)
    A.fuse(pipe)
    assert A.is_fused(pipe)
    # fused = the base's own modules, no PEFT wrappers left to slow each layer down
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    fused = image(pipe)
    assert max_diff(fused, unfused) <= 2
    with pytest.raises(UsageError):
        A.set_scales(pipe, [1.0, 1.0])  # scales are baked in while fused
    A.unfuse(pipe)
    assert any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert np.array_equal(image(pipe), unfused)
    A.unload(pipe)
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit, not "close"
    assert np.array_equal(image(pipe), base)


def test_kohya_file_gives_the_same_image_via_loracraft_and_plain_diffusers(pipe, lora_dir, tmp_path):
    ours_diffusers = A.load_adapter(pipe, lora_dir, name="d")
    img_ours = image(pipe)
    A.unload(pipe)

    kohya_dir = tmp_path / "kohya"
    write_lora(read_lora(lora_dir), kohya_dir / "style_kohya.safetensors", to="kohya")
    k = A.load_adapter(pipe, kohya_dir / "style_kohya.safetensors", name="k")
    assert k.format == "kohya" and ours_diffusers.format == "diffusers"
    assert np.array_equal(image(pipe), img_ours)  # same tensors, same alpha -> same numbers
    A.unload(pipe)

    # diffusers' own kohya reader (lora_conversion_utils), folder + weight_name as diffusers wants
    pipe.load_lora_weights(str(kohya_dir), weight_name="style_kohya.safetensors", adapter_name="plain")
    assert max_diff(image(pipe), img_ours) <= 2
    pipe.unload_lora_weights()


def test_plain_diffusers_reads_our_diffusers_file_with_its_alpha(pipe, lora_dir):
    A.load_adapter(pipe, lora_dir)
    ours = image(pipe)
    A.unload(pipe)
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME, adapter_name="plain")
    assert pipe.unet.peft_config["plain"].lora_alpha == 4 and pipe.unet.peft_config["plain"].r == 8
    assert max_diff(image(pipe), ours) <= 2


def _rewrite(src_dir, dst, edit):
    tensors, header = read_safetensors(src_dir / LORA_WEIGHT_NAME)
    tensors = edit(dict(tensors))
    save_file(tensors, str(dst), metadata=header)
    return dst


def test_shape_mismatch_names_module_and_both_shapes(pipe, lora_dir, tmp_path):
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"

    def edit(t):
        t[key] = torch.zeros(8, 768)  # an SD1.5 text width on a 32-wide tiny model
        return t

    bad = _rewrite(lora_dir, tmp_path / "wrong_base.safetensors", edit)
    with pytest.raises(AdapterError) as e:
        A.load_adapter(pipe, bad)
    msg = one_line(e)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k" in msg
    assert "[64, 32]" in msg and "[64, 768]" in msg, msg
    assert "different base" in msg
    assert A.loaded_adapters(pipe) == [] and not getattr(pipe.unet, "peft_config", {})


def test_keys_matching_no_module_is_an_error_not_a_no_op(pipe, lora_dir, tmp_path):
    def edit(t):
        return {k.replace("unet.", "unet.input_blocks.", 1): v for k, v in t.items()}

    bad = _rewrite(lora_dir, tmp_path / "sgm_names.safetensors", edit)
    with pytest.raises(AdapterError) as e:
        A.load_adapter(pipe, bad)
    msg = one_line(e)
    assert "none of the adapter's 32 modules exist in the base" in msg
    assert "unet.input_blocks." in msg


def test_some_keys_matching_no_module_is_an_error_too(pipe, lora_dir, tmp_path):
    def edit(t):
        return {k.replace("mid_block.", "mid_block.extra.", 1): v for k, v in t.items()}

    bad = _rewrite(lora_dir, tmp_path / "partial.safetensors", edit)
    with pytest.raises(AdapterError) as e:
        A.load_adapter(pipe, bad)
    assert "8 of the adapter's 32 modules do not exist" in one_line(e)


def test_missing_and_corrupt_files_fail_before_touching_the_pipeline(pipe, lora_dir, tmp_path):
    with pytest.raises(AdapterError) as e:
        A.load_adapter(pipe, tmp_path / "missing.safetensors")
    assert "not found" in one_line(e)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(AdapterError) as e:
        A.load_adapter(pipe, broken)
    assert "not a readable safetensors file" in one_line(e)
    assert A.loaded_adapters(pipe) == []


def test_pickled_adapter_needs_allow_pickle(pipe, lora_dir, tmp_path):
    tensors, _ = read_safetensors(lora_dir / LORA_WEIGHT_NAME)
    torch.save(tensors, tmp_path / "lora.ckpt")
    with pytest.raises(AdapterError) as e:
        A.load_adapter(pipe, tmp_path / "lora.ckpt")
    assert "--allow-pickle" in one_line(e)
    loaded = A.load_adapter(pipe, tmp_path / "lora.ckpt", allow_pickle=True)
    assert loaded.num_modules == 32


def test_names_are_unique_and_duplicates_refused(pipe, lora_dir):
    a = A.load_adapter(pipe, lora_dir)
    b = A.load_adapter(pipe, lora_dir)
    assert a.name != b.name
    with pytest.raises(UsageError):
        A.load_adapter(pipe, lora_dir, name=a.name)


def test_sdxl_text_encoder_2_weights_refused_on_sd1(pipe, lora_dir, tmp_path):
    def edit(t):
        t["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)
        t["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 4)
        return t

    bad = _rewrite(lora_dir, tmp_path / "sdxl.safetensors", edit)
    with pytest.raises(AdapterError) as e:
        A.load_adapter(pipe, bad)
    assert "SDXL adapter (it has text_encoder_2 weights) on an SD1.x/2.x base" in one_line(e)


def test_diffusers_kohya_diffusers_round_trip_gives_the_same_image(pipe, lora_dir, tmp_path):
    from loracraft.infer.formats import convert_lora_file

    A.load_adapter(pipe, lora_dir)
    reference = image(pipe)
    A.unload(pipe)
    kohya = convert_lora_file(lora_dir, tmp_path / "k.safetensors", "kohya")
    back = convert_lora_file(kohya, tmp_path / "back", "diffusers")
    A.load_adapter(pipe, back)
    assert np.array_equal(image(pipe), reference)


def test_attention_plus_projection_adapter_loads_fully_in_plain_diffusers(pipe, tiny_sd, tmp_path):
    """diffusers' mixed key spelling (to_q.lora.down next to proj_in.lora_A) made plain
    load_lora_weights drop every attention LoRA silently; save_diffusers_lora writes one spelling."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    path = A.build_random_lora(tiny_sd, tmp_path / "t" / LORA_WEIGHT_NAME, targets=targets, seed=3, std=0.3)
    tensors, _ = read_safetensors(path)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in tensors)
    A.load_adapter(pipe, path)
    ours = image(pipe)
    A.unload(pipe)
    pipe.load_lora_weights(str(path.parent), weight_name=LORA_WEIGHT_NAME, adapter_name="plain")
    assert max_diff(image(pipe), ours) <= 2


@pytest.fixture(scope="module")
def dora(tiny_sd, tmp_path_factory):
    """A DoRA adapter (Linear and Conv2d targets) saved like the trainer does, plus the UNet it came from."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from loracraft.infer.formats import save_diffusers_lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in"], use_dora=True)
    unet.add_adapter(config)
    g = torch.Generator().manual_seed(0)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3
        if "lora_magnitude_vector" in name:
            p.data = p.data * (1 + 0.3 * torch.rand(p.shape, generator=g))
    out = tmp_path_factory.mktemp("dora") / LORA_WEIGHT_NAME
    save_diffusers_lora(
        out, convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)), config.to_dict()
    )
    return out, unet


def test_dora_adapter_loads_exactly_and_in_plain_diffusers(pipe, tiny_sd, dora, tmp_path):
    from diffusers import StableDiffusionPipeline

    path, trained_unet = dora
    reference = StableDiffusionPipeline.from_pretrained(tiny_sd, unet=trained_unet)
    reference.set_progress_bar_config(disable=True)
    in_memory = np.asarray(
        reference(
            PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), height=32, width=32
        ).images[0]
    ).astype(np.int16)
    base = image(pipe)
    A.load_adapter(pipe, path)
    ours = image(pipe)
    assert np.array_equal(ours, in_memory) and max_diff(ours, base) > 5
    A.fuse(pipe)
    assert max_diff(image(pipe), ours) <= 2
    A.unload(pipe)
    assert np.array_equal(image(pipe), base)
    pipe.load_lora_weights(str(path.parent), weight_name=LORA_WEIGHT_NAME, adapter_name="plain")
    assert max_diff(image(pipe), ours) <= 2
    pipe.unload_lora_weights()
    # diffusers -> diffusers and diffusers -> kohya (dora_scale) -> diffusers keep the magnitudes
    copy = write_lora(read_lora(path), tmp_path / "copy.safetensors")
    assert read_lora(copy).tensors_sha256() == read_lora(path).tensors_sha256()
    kohya = write_lora(read_lora(path), tmp_path / "k.safetensors", to="kohya")
    back = write_lora(read_lora(kohya), tmp_path / "back.safetensors")
    assert read_lora(back).tensors_sha256() == read_lora(path).tensors_sha256()
