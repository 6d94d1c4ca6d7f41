"""generate(): seeds, sizes, schedulers, img2img/inpaint with adapters, PNG records and regeneration."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from loracraft.infer import adapters as A
from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.generation import (
    SCHEDULERS,
    generate,
    read_record,
    regenerate,
    save_grid,
    scheduler_name,
    set_scheduler,
    sweep_scales,
)
from loracraft.infer.models import load_base, size_multiple

PROMPT = "a red circle on a blue background"
STEPS = 2


@pytest.fixture
def pipe(tiny_sd):
    return load_base(tiny_sd)


@pytest.fixture(scope="module")
def init_and_mask(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(d / "init.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(d / "mask.png")
    return d / "init.png", d / "mask.png"


def px(img) -> np.ndarray:
    return np.asarray(img.image if hasattr(img, "image") else img).astype(np.int16)


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_same_seed_gives_identical_png_bytes(pipe, tmp_path):
    a = generate(pipe, PROMPT, seed=7, steps=STEPS)[0].save(tmp_path / "a.png")
    b = generate(pipe, PROMPT, seed=7, steps=STEPS)[0].save(tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    c = generate(pipe, PROMPT, seed=8, steps=STEPS)[0]
    assert not np.array_equal(px(c), px(Image.open(a)))


def test_each_image_is_reproducible_alone(pipe):
    batch = generate(pipe, [PROMPT, "a green square"], seed=10, steps=STEPS, num_images_per_prompt=2)
    assert [g.record.seed for g in batch] == [10, 11, 12, 13]
    assert [g.record.prompt for g in batch] == [PROMPT, PROMPT, "a green square", "a green square"]
    alone = generate(pipe, "a green square", seed=13, steps=STEPS)[0]
    assert np.array_equal(px(alone), px(batch[3]))


def test_explicit_seed_list_and_count_check(pipe):
    imgs = generate(pipe, PROMPT, seed=[5, 3], steps=STEPS, num_images_per_prompt=2)
    assert [g.record.seed for g in imgs] == [5, 3]
    with pytest.raises(UsageError) as e:
        generate(pipe, PROMPT, seed=[1, 2, 3], steps=STEPS)
    assert "3 seeds for 1 images" in one_line(e)


def test_random_seed_is_recorded(pipe):
    g = generate(pipe, PROMPT, steps=STEPS)[0]
    again = generate(pipe, PROMPT, seed=g.record.seed, steps=STEPS)[0]
    assert np.array_equal(px(g), px(again))


def test_size_multiple_comes_from_the_model_configs(pipe):
    assert size_multiple(pipe) == 4  # VAE x2, UNet downsamples once
    sd15 = SimpleNamespace(
        vae=SimpleNamespace(config=SimpleNamespace(block_out_channels=[128, 256, 512, 512])),
        unet=SimpleNamespace(
            config=SimpleNamespace(down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
        ),
    )
    assert size_multiple(sd15) == 64
    g = generate(pipe, PROMPT, seed=0, steps=STEPS, width=40, height=24)[0]
    assert g.image.size == (40, 24)
    with pytest.raises(UsageError) as e:
        generate(pipe, PROMPT, seed=0, steps=STEPS, width=30)
    msg = one_line(e)
    assert "width 30 not a multiple of 4" in msg and "32x32" in msg


def test_bad_settings_are_collected_together(pipe):
    with pytest.raises(UsageError) as e:
        generate(pipe, PROMPT, steps=0, guidance=-1, num_images_per_prompt=0)
    assert len(e.value.problems) == 3
    assert all("\n" not in p for p in e.value.problems)


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_runs_by_name(pipe, name):
    g = generate(pipe, PROMPT, seed=0, steps=STEPS, scheduler=name)[0]
    assert g.record.scheduler == name == scheduler_name(pipe)
    assert g.image.size == (32, 32)


def test_unknown_scheduler(pipe):
    with pytest.raises(UsageError) as e:
        set_scheduler(pipe, "Heun2000")
    assert "DPMSolverMultistep" in one_line(e)


def test_switching_schedulers_back_and_forth_does_not_drift(pipe):
    first = generate(pipe, PROMPT, seed=0, steps=STEPS, scheduler="UniPC")[0]
    generate(pipe, PROMPT, seed=0, steps=STEPS, scheduler="DDIM")
    generate(pipe, PROMPT, seed=0, steps=STEPS, scheduler="EulerAncestral")
    again = generate(pipe, PROMPT, seed=0, steps=STEPS, scheduler="UniPC")[0]
    assert np.array_equal(px(first), px(again))
    assert first.record.scheduler_config == again.record.scheduler_config


def test_negative_prompt_is_used_and_recorded(pipe):
    plain = generate(pipe, PROMPT, seed=0, steps=STEPS)[0]
    neg = generate(pipe, PROMPT, negative_prompt="green", seed=0, steps=STEPS)[0]
    assert not np.array_equal(px(plain), px(neg))
    assert neg.record.negative_prompt == "green"
    assert "Negative prompt: green" in neg.record.a1111_parameters()


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_img2img_and_inpaint_apply_the_adapters(pipe, lora_dir, init_and_mask, mode):
    init, mask = init_and_mask
    kwargs = dict(seed=3, steps=4, init_image=init, strength=0.75)
    if mode == "inpaint":
        kwargs["mask_image"] = mask
    without = generate(pipe, PROMPT, **kwargs)[0]
    A.load_adapter(pipe, lora_dir)
    with_lora = generate(pipe, PROMPT, **kwargs)[0]
    assert with_lora.record.mode == without.record.mode == mode
    assert np.abs(px(with_lora) - px(without)).max() > 5
    A.set_scales(pipe, [0.0])
    assert np.array_equal(px(generate(pipe, PROMPT, **kwargs)[0]), px(without))


def test_img2img_does_not_change_later_text_to_image_results(pipe, init_and_mask):
    """Img2img's constructor rewrites DDIM's clip_sample on a shared scheduler; ours gets a copy."""
    before = generate(pipe, PROMPT, seed=1, steps=STEPS, scheduler="DDIM")[0]
    generate(pipe, PROMPT, seed=1, steps=STEPS, init_image=init_and_mask[0])
    after = generate(pipe, PROMPT, seed=1, steps=STEPS)[0]
    assert np.array_equal(px(before), px(after))


def test_mask_without_image_is_a_usage_error(pipe, init_and_mask):
    with pytest.raises(UsageError) as e:
        generate(pipe, PROMPT, mask_image=init_and_mask[1])
    assert "--init-image" in one_line(e)


def test_png_carries_a1111_parameters_and_json_record(pipe, tiny_sd, lora_dir, tmp_path):
    loaded = A.load_adapter(pipe, lora_dir, scale=0.7)
    g = generate(
        pipe, PROMPT, negative_prompt="blurry", seed=42, steps=STEPS, guidance=5.0, scheduler="Euler"
    )[0]
    path = g.save(tmp_path / "x.png")
    text = Image.open(path).text
    params = text["parameters"]
    first, second, third = params.splitlines()
    assert first == f"{PROMPT} <lora:{loaded.name}:0.7>"
    assert second == "Negative prompt: blurry"
    for field in ("Steps: 2", "Sampler: Euler", "CFG scale: 5", "Seed: 42", "Size: 32x32", "Lora hashes:"):
        assert field in third
    rec = json.loads(text["loracraft"])
    assert rec["prompt"] == PROMPT and rec["negative_prompt"] == "blurry"
    assert rec["seed"] == 42 and rec["steps"] == STEPS and rec["guidance"] == 5.0
    assert rec["scheduler"] == "Euler" and (rec["width"], rec["height"]) == (32, 32)
    assert rec["base"]["base"] == str(tiny_sd.resolve()) and rec["base"]["dtype"] == "float32"
    (adapter,) = rec["adapters"]
    assert (
        adapter["scale"] == 0.7 and adapter["sha256"] == loaded.sha256 and adapter["path"] == str(loaded.path)
    )
    assert read_record(path).seed == 42


def test_regenerate_is_pixel_identical_unfused_and_fused(pipe, lora_dir, lora_dir_b, tmp_path):
    A.load_adapters(pipe, [f"{lora_dir}:0.6", f"{lora_dir_b}:0.3"])
    g = generate(pipe, PROMPT, seed=9, steps=STEPS, scheduler="DPMSolverMultistep", num_images_per_prompt=2)[
        1
    ]
    path = g.save(tmp_path / "unfused.png")
    assert np.array_equal(px(regenerate(path)), px(g))
    A.fuse(pipe)
    f = generate(pipe, PROMPT, seed=9, steps=STEPS)[0]
    assert f.record.fused
    path = f.save(tmp_path / "fused.png")
    assert np.array_equal(px(regenerate(path)), px(f))


def test_regenerate_inpaint_from_files(pipe, lora_dir, init_and_mask, tmp_path):
    init, mask = init_and_mask
    A.load_adapter(pipe, lora_dir)
    g = generate(
        pipe, PROMPT, seed=4, steps=4, init_image=init, mask_image=mask, strength=0.9, scheduler="DDIM"
    )[0]
    path = g.save(tmp_path / "inpaint.png")
    again = regenerate(path)
    assert again.record.mode == "inpaint"
    assert np.array_equal(px(again), px(g))


def test_regenerate_refuses_a_changed_adapter(pipe, lora_dir, tmp_path):
    import shutil

    copy = tmp_path / "lora"
    shutil.copytree(lora_dir, copy)
    A.load_adapter(pipe, copy)
    path = generate(pipe, PROMPT, seed=1, steps=STEPS)[0].save(tmp_path / "x.png")
    (copy / "pytorch_lora_weights.safetensors").write_bytes(
        (lora_dir / "pytorch_lora_weights.safetensors").read_bytes() + b" "
    )
    with pytest.raises(AdapterError) as e:
        regenerate(path)
    assert "changed since the image was made" in one_line(e)


def test_read_record_refuses_foreign_pngs_and_grids(pipe, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(UsageError) as e:
        read_record(tmp_path / "plain.png")
    assert "no generation record" in one_line(e)
    imgs = generate(pipe, PROMPT, seed=0, steps=STEPS, num_images_per_prompt=2)
    grid = save_grid(imgs, 1, 2, tmp_path / "grid.png", cells=["a.png", "b.png"])
    assert Image.open(grid).size == (64, 32)
    with pytest.raises(UsageError) as e:
        read_record(grid)
    assert "grid" in one_line(e) and "a.png" in str(e.value)


def test_scale_sweep_zero_is_base_and_one_is_the_adapter(pipe, lora_dir):
    base = generate(pipe, PROMPT, seed=2, steps=STEPS)[0]
    A.load_adapter(pipe, lora_dir, scale=0.8)
    full = generate(pipe, PROMPT, seed=2, steps=STEPS)[0]
    rows = sweep_scales(pipe, [0, 1], prompt=PROMPT, seed=2, steps=STEPS)
    assert np.array_equal(px(rows[0][0]), px(base))
    assert np.array_equal(px(rows[1][0]), px(full))
    assert [a.scale for a in A.loaded_adapters(pipe)] == [0.8]  # restored
    fused_rows = sweep_scales(pipe, [1], prompt=PROMPT, seed=2, steps=STEPS, fuse=True)
    assert np.abs(px(fused_rows[0][0]) - px(full)).max() <= 2
    assert fused_rows[0][0].record.fused and not A.is_fused(pipe)


def test_adapters_attached_outside_loracraft_make_regeneration_refuse(pipe, lora_dir, tmp_path):
    pipe.load_lora_weights(
        str(lora_dir), weight_name="pytorch_lora_weights.safetensors", adapter_name="plain"
    )
    g = generate(pipe, PROMPT, seed=0, steps=STEPS)[0]
    assert [(a["name"], a["path"]) for a in g.record.adapters] == [("plain", None)]
    path = g.save(tmp_path / "x.png")
    with pytest.raises(AdapterError) as e:
        regenerate(path)
    assert "attached outside loracraft" in one_line(e)
