"""generate's A1111 prompt features: <lora:> tags, PATH:UNET:TE, block weights, clip skip, long prompts."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from loracraft.infer import adapters as A
from loracraft.infer.formats import LORA_WEIGHT_NAME
from loracraft.infer.generation import generate, read_record
from loracraft.infer.models import load_base
from loracraft.infer.testing import run_infer_cli as run

LONG = ", ".join(["a red circle on a blue background"] * 18)  # 143 tokens with the tiny tokenizer


def written(capsys) -> list[str]:
    return [line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if line.strip()]


def px(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def gen(capsys, tmp_path, base, *argv) -> str:
    rc, problems = run("generate", "--base", base, "--seed", 3, "--steps", 2, "--out", tmp_path / "o", *argv)
    assert rc == 0, problems
    return written(capsys)[0]


@pytest.fixture(scope="module")
def lora_folder(lora_dir, lora_dir_b, tmp_path_factory):
    """An A1111-style LoRA folder: a run folder mystyle/ and a single file other.safetensors in a sub-folder."""
    d = tmp_path_factory.mktemp("loras")
    shutil.copytree(lora_dir, d / "mystyle")
    (d / "sub").mkdir()
    shutil.copy(lora_dir_b / LORA_WEIGHT_NAME, d / "sub" / "other.safetensors")
    return d


def test_prompt_tag_equals_lora_option(tiny_sd, lora_folder, tmp_path, capsys):
    tagged = gen(
        capsys, tmp_path, tiny_sd, "--prompt", "a red circle <lora:mystyle:0.7>", "--lora-dir", lora_folder
    )
    plain = gen(
        capsys, tmp_path, tiny_sd, "--prompt", "a red circle", "--lora", f"{lora_folder / 'mystyle'}:0.7"
    )
    base = gen(capsys, tmp_path, tiny_sd, "--prompt", "a red circle")
    assert np.array_equal(px(tagged), px(plain)) and not np.array_equal(px(tagged), px(base))
    rec = read_record(tagged)
    assert rec.prompt == "a red circle" and rec.adapters[0]["name"] == "mystyle"
    assert rec.a1111_parameters().startswith("a red circle <lora:mystyle:0.7>\n")
    # a tag found in a sub-folder, with separate TE / UNet weights (A1111 order: TE first)
    split = gen(
        capsys, tmp_path, tiny_sd, "--prompt", "a red circle <lora:other:0.2:0.9>", "--lora-dir", lora_folder
    )
    by_option = gen(capsys, tmp_path, tiny_sd, "--prompt", "a red circle",
                    "--lora", f"{lora_folder / 'sub' / 'other.safetensors'}:0.9:0.2")  # fmt: skip
    assert np.array_equal(px(split), px(by_option))
    assert "<lora:other:0.2:0.9>" in read_record(split).a1111_parameters()


def test_unet_and_text_encoder_weights_match_diffusers_set_adapters(tiny_sd, lora_dir_b):
    ours = load_base(tiny_sd)
    A.load_adapters(ours, [f"{lora_dir_b}:0.7:0.3"])
    mine = np.asarray(generate(ours, "a red circle", seed=4, steps=2)[0].image)
    ref = load_base(tiny_sd)
    ref.load_lora_weights(str(lora_dir_b), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[{"unet": 0.7, "text_encoder": 0.3}])
    theirs = ref("a red circle", num_inference_steps=2, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(4)).images[0]  # fmt: skip
    assert np.array_equal(mine, np.asarray(theirs))


def test_block_weights_match_diffusers_block_scales(tiny_sd, lora_dir):
    blocks = {"down": 0.0, "mid": 1.0, "up": 0.5}
    ours = load_base(tiny_sd)
    A.load_adapter(ours, lora_dir, name="x", scale=0.8, blocks=blocks)
    ref = load_base(tiny_sd)
    ref.load_lora_weights(str(lora_dir), adapter_name="x")
    ref.set_adapters(["x"], adapter_weights=[{"unet": {k: 0.8 * v for k, v in blocks.items()}}])
    scaling = {
        n: m.scaling["x"] for n, m in ours.unet.named_modules() if hasattr(m, "scaling") and "x" in m.scaling
    }
    expected = {
        n: m.scaling["x"] for n, m in ref.unet.named_modules() if hasattr(m, "scaling") and "x" in m.scaling
    }
    assert scaling == expected and len(scaling) > 0
    assert {round(v, 6) for v in scaling.values()} == {0.0, 0.4, 0.2}  # 0.8 x block x alpha 4 / rank 8


def test_block_weights_on_the_command_line(tiny_sd, lora_dir, tmp_path, capsys):
    off = gen(capsys, tmp_path, tiny_sd, "--prompt", "a red circle", "--lora", lora_dir,
              "--lora-blocks", "down=0,mid=0,up=0")  # fmt: skip
    base = gen(capsys, tmp_path, tiny_sd, "--prompt", "a red circle")
    assert np.array_equal(px(off), px(base))  # every block at 0 = no adapter
    half = gen(
        capsys, tmp_path, tiny_sd, "--prompt", "a red circle", "--lora", lora_dir, "--lora-blocks", "up=0"
    )
    assert not np.array_equal(px(half), px(base))
    assert read_record(half).adapters[0]["blocks"] == {"up": 0.0}
    rc, _ = run("generate", "--from-png", half, "--out", tmp_path / "again")
    assert rc == 0 and np.array_equal(px(written(capsys)[0]), px(half))


def test_clip_skip_and_long_prompts(tiny_sd, tmp_path, capsys):
    plain = gen(capsys, tmp_path, tiny_sd, "--prompt", "a red circle")
    skip = gen(capsys, tmp_path, tiny_sd, "--prompt", "a red circle", "--clip-skip", 2)
    assert not np.array_equal(px(plain), px(skip))
    assert "Clip skip: 2" in read_record(skip).a1111_parameters()
    rc, _ = run("generate", "--from-png", skip, "--out", tmp_path / "again")
    assert rc == 0 and np.array_equal(px(written(capsys)[0]), px(skip))

    pipe = load_base(tiny_sd)
    head = pipe.tokenizer.decode(pipe.tokenizer(LONG, add_special_tokens=False).input_ids[:75])
    long = gen(capsys, tmp_path, tiny_sd, "--prompt", LONG)
    first = gen(capsys, tmp_path, tiny_sd, "--prompt", head)
    assert not np.array_equal(px(long), px(first))  # the words past token 77 count


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "x <lora:mystyle:1>"], "no LoRA folder is given"),
        (
            ["--prompt", "x <lora:nothere:1>", "--lora-dir", "{dir}"],
            "LoRA 'nothere' named in the prompt is not in",
        ),
        (
            ["--prompt", "x <lora:mystyle:1>", "--prompt", "y", "--lora-dir", "{dir}"],
            "different <lora:> tags",
        ),
        (["--prompt", "x <lora:mystyle:abc>", "--lora-dir", "{dir}"], "cannot read weight 'abc'"),
        (["--prompt", "x", "--lora-blocks", "sideways=1"], "cannot read block weight 'sideways=1'"),
        (["--prompt", "x", "--clip-skip", "0"], "clip skip counts from 1"),
        (["--prompt", "x", "--lora", "{dir}/mystyle:0.5:inf"], "is not a finite number"),
    ],
)
def test_errors_are_one_line(tiny_sd, lora_folder, tmp_path, argv, needle):
    argv = [a.replace("{dir}", str(lora_folder)) for a in argv]
    rc, problems = run("generate", "--base", tiny_sd, *argv, "--out", tmp_path)
    assert rc == 2 and any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_block_weights_for_an_unknown_adapter(tiny_sd, lora_dir, tmp_path):
    rc, problems = run("generate", "--base", tiny_sd, "--prompt", "x", "--lora", lora_dir, "--lora-blocks",
                       "nope:up=0", "--steps", 1, "--out", tmp_path)  # fmt: skip
    assert rc == 2 and "no loaded adapter 'nope'" in problems[0]


def test_scale_sweep_zero_switches_off_a_separate_text_encoder_weight_too(tiny_sd, lora_dir_b):
    from loracraft.infer.generation import sweep_scales

    pipe = load_base(tiny_sd)
    base = np.asarray(generate(pipe, "a red circle", seed=4, steps=2)[0].image)
    A.load_adapters(pipe, [f"{lora_dir_b}:0.7:0.3"])
    (zero,), (half,) = sweep_scales(pipe, [0, 0.5], prompt="a red circle", seed=4, steps=2)
    assert np.array_equal(np.asarray(zero.image), base)
    assert half.record.adapters[0]["text_encoder_scale"] == 0.15
    assert A.loaded_adapters(pipe)[0].text_encoder_scale == 0.3  # restored after the sweep
