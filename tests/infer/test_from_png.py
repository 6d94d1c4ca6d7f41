"""--from-png: A1111 infotexts and hostile records, in-process through the `loracraft` entry point."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from loracraft.infer.generation import read_record
from loracraft.train.cli import main


def png(path, **chunks) -> str:
    info = PngInfo()
    for key, text in chunks.items():
        info.add_text(key, text)
    Image.new("RGB", (32, 32)).save(path, pnginfo=info)
    return str(path)


def px(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def cli(capsys, *argv) -> tuple[int, list[str], list[str]]:
    rc = main(["generate", *map(str, argv)])
    cap = capsys.readouterr()
    return rc, cap.out.splitlines(), cap.err.splitlines()


GOOD = {"prompt": "a red circle", "negative_prompt": None, "seed": 1, "steps": 2, "guidance": 7.5,
        "scheduler": "Euler", "width": 32, "height": 32, "base": {"base": "BASE", "device": "cpu"}}  # fmt: skip

HOSTILE = [
    ("[1, 2]", "record is a JSON list, not an object"),
    ('"abc"', "record is a JSON str, not an object"),
    ("5", "record is a JSON int, not an object"),
    ("{", "record is damaged"),
    ("[" * 100000 + "]" * 100000, "record is"),
    ({"seed": "abc"}, "record field seed = 'abc' must be a whole number"),
    ({"seed": True}, "record field seed = True must be a whole number"),
    ({"base": {"base": "BASE", "device": "meta"}}, "base.device = 'meta' must be one of cpu, cuda"),
    ({"base": {"base": "BASE", "dtype": "int8"}}, "base.dtype = 'int8' must be float32"),
    ({"width": 200000}, "width = 200000 must be a whole number of pixels in [1, 8192]"),
    ({"height": -32}, "height = -32 must be a whole number of pixels in [1, 8192]"),
    ({"steps": 10**9}, "steps = 1000000000 must be a whole number in [1, 1000]"),
    ({"guidance": float("nan")}, "guidance = nan must be a number in [0, 100]"),
    ({"adapters": "x"}, "adapters = 'x' must be a list of objects"),
    ({"adapters": [{"name": "a", "path": "p", "scale": "big"}]}, "adapters[0] = 'a' needs a text name and numeric scales"),
    ({"clip_skip": 0}, "clip_skip = 0 must be a whole number in [1, 24]"),
    ({"prompt": None}, "prompt = None must be text"),
    ({"grid": 3}, "PNG is a grid"),
    ({"steps": None, "width": "wide"}, "steps = None"),
]  # fmt: skip


@pytest.mark.parametrize("record, needle", HOSTILE)
def test_hostile_loracraft_records_give_one_line_errors(tiny_sd, tmp_path, capsys, record, needle):
    if isinstance(record, dict):
        record = json.dumps({**GOOD, "base": {**GOOD["base"], "base": str(tiny_sd)}, **record})
    path = png(tmp_path / "x.png", loracraft=record)
    rc, out, err = cli(capsys, "--from-png", path, "--out", tmp_path / "o")
    assert rc == 2 and out == []
    assert any(needle in line for line in err), err
    assert all(line.startswith("loracraft: error: ") for line in err) and not (tmp_path / "o").exists()


A1111_BASE = "Steps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 32x32"
A1111_HOSTILE = [
    ("a cat\nSteps: abc, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 32x32", "A1111 field Steps: 'abc' is not a number"),
    ("a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 200000x200000", "width = 200000 must be"),
    ("a cat\nSteps: 2, Sampler: DPM fast, CFG scale: 7, Seed: 1, Size: 32x32", "A1111 sampler 'DPM fast' is not supported"),
    ("a cat\nSteps: 2, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: big", "Size: 'big' is not WIDTHxHEIGHT"),
    ("a cat", "A1111 parameters lack Steps, Sampler, CFG scale, Seed, Size"),
    (f"a cat <lora:missing:1>\n{A1111_BASE}", "LoRA 'missing' named in the prompt is not in"),
    (f"a cat\n{A1111_BASE}, Clip skip: 99", "clip_skip = 99 must be"),
]  # fmt: skip


@pytest.mark.parametrize("text, needle", A1111_HOSTILE)
def test_hostile_a1111_parameters_give_one_line_errors(tiny_sd, lora_dir, tmp_path, capsys, text, needle):
    path = png(tmp_path / "a.png", parameters=text)
    rc, out, err = cli(
        capsys, "--from-png", path, "--base", tiny_sd, "--lora-dir", lora_dir, "--out", tmp_path / "o"
    )
    assert rc == 2 and out == [] and any(needle in line for line in err), err
    assert all(line.startswith("loracraft: error: ") for line in err)


def test_sizes_above_the_bound_are_refused_on_the_command_line(tiny_sd, tmp_path, capsys):
    rc, _, err = cli(capsys, "--base", tiny_sd, "--prompt", "x", "--width", 200000, "--out", tmp_path)
    assert rc == 2 and "width 200000 above the 8192 px limit" in err[0]
    rc, _, err = cli(capsys, "--base", tiny_sd, "--prompt", "x", "--steps", 5000, "--out", tmp_path)
    assert rc == 2 and "steps must be between 1 and 1000" in err[0]


def test_a1111_png_regenerates_with_its_settings_and_tags(tiny_sd, lora_dir, tmp_path, capsys):
    loras = tmp_path / "loras"
    shutil.copytree(lora_dir, loras / "mystyle")
    text = (
        "a red (circle:1.2) <lora:mystyle:0.7>\nNegative prompt: blue\n"
        "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6, Seed: 9, Size: 32x24, "
        'Model hash: 0123abcd, Lora hashes: "mystyle: 0123", Clip skip: 2, Version: v1.10.1'
    )
    path = png(tmp_path / "a1111.png", parameters=text)
    rc, out, err = cli(
        capsys, "--from-png", path, "--base", tiny_sd, "--lora-dir", loras, "--out", tmp_path / "o"
    )
    assert rc == 0, err
    rc, direct, err = cli(capsys, "--base", tiny_sd, "--prompt", "a red (circle:1.2)", "--negative-prompt", "blue",
                          "--lora", f"{loras / 'mystyle'}:0.7", "--steps", 2, "--scheduler", "DPM++ 2M Karras",
                          "--guidance", 6, "--seed", 9, "--width", 32, "--height", 24, "--clip-skip", 2,
                          "--out", tmp_path / "d")  # fmt: skip
    assert rc == 0, err
    assert np.array_equal(px(out[0]), px(direct[0]))
    rec = read_record(out[0])
    assert (rec.scheduler, rec.clip_skip, rec.prompt, rec.source) == (
        "DPM++ 2M Karras",
        2,
        "a red (circle:1.2)",
        "loracraft",
    )
    assert rec.a1111_parameters().startswith("a red (circle:1.2) <lora:mystyle:0.7>\nNegative prompt: blue\n")


def test_a1111_png_needs_a_base(tmp_path, capsys):
    path = png(tmp_path / "a.png", parameters=f"a cat\n{A1111_BASE}")
    rc, _, err = cli(capsys, "--from-png", path, "--out", tmp_path / "o")
    assert rc == 2 and "does not record its base model" in err[0] and "--base" in err[0]
