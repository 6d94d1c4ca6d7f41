"""`loracraft generate` / `loracraft convert`: files written, --from-png, sweeps, grids, exit codes."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from loracraft.infer.formats import LORA_WEIGHT_NAME, read_lora, read_safetensors
from loracraft.infer.testing import run_infer_cli as run


def written(capsys) -> list[str]:
    return [line.split(" ")[0] for line in capsys.readouterr().out.splitlines() if line.strip()]


def px(path_or_image) -> np.ndarray:
    img = path_or_image if isinstance(path_or_image, Image.Image) else Image.open(path_or_image)
    return np.asarray(img.convert("RGB")).astype(np.int16)


def test_generate_then_from_png_is_pixel_identical(tiny_sd, lora_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _ = run(
        "generate", "--base", tiny_sd, "--lora", f"{lora_dir}:0.8", "--prompt", "a red circle",
        "--negative-prompt", "blue", "--seed", 11, "--steps", 2, "--num-images", 2, "--scheduler", "EulerAncestral",
        "--out", out, "--grid",
    )  # fmt: skip
    assert rc == 0
    files = written(capsys)
    assert [re.sub(r"^.*/", "", f) for f in files] == ["00000-11.png", "00001-12.png", "00002-grid.png"]
    assert Image.open(files[2]).size == (64, 32)
    rc, _ = run("generate", "--from-png", files[1], "--out", out)
    assert rc == 0
    (again,) = written(capsys)
    assert again.endswith("00003-12.png")  # numbering continues, nothing overwritten
    assert np.array_equal(px(again), px(files[1]))


def test_from_png_of_fused_and_img2img_images(tiny_sd, lora_dir, tmp_path, capsys):
    init = tmp_path / "init.png"
    Image.fromarray((np.random.RandomState(1).rand(32, 32, 3) * 255).astype("uint8")).save(init)
    out = tmp_path / "out"
    rc, _ = run("generate", "--base", tiny_sd, "--lora", lora_dir, "--fuse", "--prompt", "a red circle",
                "--seed", 3, "--steps", 4, "--init-image", init, "--strength", 0.6, "--out", out)  # fmt: skip
    assert rc == 0
    (first,) = written(capsys)
    assert run("generate", "--from-png", first, "--out", out)[0] == 0
    (again,) = written(capsys)
    assert np.array_equal(px(again), px(first))


def test_scale_sweep_writes_cells_and_one_grid(tiny_sd, lora_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, _ = run("generate", "--base", tiny_sd, "--lora", lora_dir, "--prompt", "a red circle", "--seed", 5,
                "--steps", 2, "--scale-sweep", "0,0.5,1", "--out", out)  # fmt: skip
    assert rc == 0
    files = written(capsys)
    assert len(files) == 4 and files[-1].endswith("-grid.png")
    assert [f.rsplit("-", 1)[-1] for f in files[:3]] == ["x0.png", "x0.5.png", "x1.png"]
    assert Image.open(files[-1]).size == (96, 32)
    rc, _ = run("generate", "--base", tiny_sd, "--prompt", "a red circle", "--seed", 5, "--steps", 2,
                "--out", tmp_path / "base")  # fmt: skip
    (base,) = written(capsys)
    assert np.array_equal(px(files[0]), px(base))  # scale 0 == no adapter
    assert not np.array_equal(px(files[2]), px(base))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--prompt", "x"], "no base model"),
        (["--base", "{base}"], "no prompt"),
        (["--base", "{base}", "--prompt", "x", "--lora", "/nope/lora.safetensors"], "adapter file not found"),
        (["--base", "{base}", "--prompt", "x", "--scheduler", "Heun9"], "unknown scheduler"),
        (["--base", "{base}", "--prompt", "x", "--scale-sweep", "a,b"], "cannot read scale sweep"),
        (["--base", "{base}", "--prompt", "x", "--fuse"], "--fuse needs an adapter"),
        (["--base", "{base}", "--prompt", "x", "--mask", "m.png"], "a mask needs an image"),
        (["--from-png", "x.png", "--prompt", "x", "--seed", "1"], "--from-png takes every setting"),
        (["--base", "{base}", "--prompt", "x", "--width", "30"], "not a multiple of 4"),
        (["--base", "/no/such/model", "--prompt", "x"], "base model not found"),
    ],
)
def test_usage_errors_exit_2_with_one_line_each(tiny_sd, tmp_path, argv, needle):
    argv = [a.replace("{base}", str(tiny_sd)) for a in argv]
    rc, problems = run("generate", *argv, "--out", tmp_path)
    assert rc == 2
    assert any(needle in p for p in problems), problems
    assert all("\n" not in p for p in problems)


def test_several_problems_are_reported_together(tmp_path):
    rc, problems = run("generate", "--fuse", "--scheduler", "nope", "--out", tmp_path)
    assert rc == 2 and len(problems) >= 4  # base, prompt, fuse, scheduler


def test_convert_both_ways(lora_dir, tmp_path, capsys):
    rc, _ = run("convert", lora_dir, tmp_path / "k.safetensors", "--to", "kohya")
    assert rc == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith("(kohya, 32 modules, rank 8, alpha 4)")
    rc, _ = run("convert", tmp_path / "k.safetensors", tmp_path / "d", "--to", "diffusers")
    assert rc == 0
    capsys.readouterr()
    t0, _ = read_safetensors(lora_dir / LORA_WEIGHT_NAME)
    t1, _ = read_safetensors(tmp_path / "d" / LORA_WEIGHT_NAME)
    assert sorted(t0) == sorted(t1)
    assert read_lora(tmp_path / "k.safetensors").source_format == "kohya"
    rc, problems = run(
        "convert", tmp_path / "missing.safetensors", tmp_path / "x.safetensors", "--to", "kohya"
    )
    assert rc == 2 and "not found" in problems[0]


def test_through_the_loracraft_entry_point(cli, tiny_sd, lora_dir, tmp_path):
    """The real `loracraft` command writes a PNG that another process regenerates pixel for pixel,
    and reports a bad path as one stderr line with exit code 2."""
    from loracraft.infer.generation import regenerate

    out = tmp_path / "e2e"
    one_thread = {"OMP_NUM_THREADS": "1"}  # see tests/infer/conftest.py
    proc = cli("generate", "--base", tiny_sd, "--lora", lora_dir, "--prompt", "a red circle", "--seed", 1,
               "--steps", 2, "--out", out, env=one_thread)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (png,) = proc.stdout.split()
    assert np.array_equal(px(regenerate(png).image), px(png))  # made there, remade here
    missing = tmp_path / "nope.safetensors"
    proc = cli("generate", "--base", tiny_sd, "--lora", missing, "--prompt", "x", env=one_thread)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"loracraft: error: adapter file not found, --lora {missing}, check the path"
    ]
