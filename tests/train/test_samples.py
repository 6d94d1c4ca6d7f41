"""Sample prompts: kohya's prompt-line syntax, YAML prompt files, per-prompt settings, samples at step 0."""

import numpy as np
import pytest
import torch

from loracraft.infer.errors import ConfigError


def test_kohya_line_syntax():
    """sd-scripts' documented example options: --n negative, --w/--h size, --d seed, --l scale, --s steps."""
    from loracraft.train.samples import parse_prompt_line

    p = parse_prompt_line("masterpiece, a girl, looking at viewer --n low quality, worst quality --w 512 --h 768 "
                          "--d 42 --l 7.5 --s 28")
    assert p.prompt == "masterpiece, a girl, looking at viewer"
    assert p.negative_prompt == "low quality, worst quality"
    assert (p.width, p.height, p.seed, p.guidance, p.steps) == (512, 768, 42, 7.5, 28)
    plain = parse_prompt_line("just a prompt")
    assert plain.prompt == "just a prompt" and plain.seed is None and plain.width is None


def test_prompt_files_txt_and_yaml(tmp_path):
    from loracraft.train.samples import read_prompt_file

    txt = tmp_path / "prompts.txt"
    txt.write_text("# kohya comment line\n\na cat --d 3\n  \na dog --s 10 --N ugly\n", encoding="utf-8")
    cats = read_prompt_file(txt)
    assert [(p.prompt, p.seed, p.steps, p.negative_prompt) for p in cats] == [
        ("a cat", 3, None, None), ("a dog", None, 10, "ugly")]
    yml = tmp_path / "prompts.yaml"
    yml.write_text("- a cat\n- {prompt: a dog, seed: 7, width: 64, guidance: 3}\n", encoding="utf-8")
    got = read_prompt_file(yml)
    assert got[0].prompt == "a cat" and (got[1].seed, got[1].width, got[1].guidance) == (7, 64, 3.0)


@pytest.mark.parametrize("line, message", [
    ("a cat --ss euler_a", "unsupported prompt option --ss"),
    ("a cat --w wide", "--w needs a number"),
    ("a cat --s 0", "bad sample prompt steps"),
    (" --w 64", "empty prompt"),
])
def test_bad_lines_are_one_line_errors(line, message):
    from loracraft.train.samples import parse_prompt_line

    with pytest.raises(ConfigError, match=message) as e:
        parse_prompt_line(line, "p.txt line 1")
    assert "\n" not in str(e.value) and "p.txt line 1" in str(e.value)


def test_sizes_must_be_multiples_of_8_and_the_file_must_exist(tmp_path):
    from loracraft.train.config import ValidationCfg
    from loracraft.train.samples import sample_prompts

    with pytest.raises(ConfigError, match="width=50 is not a multiple of 8"):
        sample_prompts(ValidationCfg(prompts=[{"prompt": "a", "width": 50}]))
    with pytest.raises(ConfigError, match="prompt file not found"):
        sample_prompts(ValidationCfg(prompt_file=str(tmp_path / "nope.txt")))


def test_at_start_writes_step_0_with_each_prompts_seed_and_size(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    """The second prompt's cell equals plain diffusers at that prompt's seed, size and steps (the
    adapter starts at zero, so at step 0 the base is the reference)."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square --d 5 --w 48 --h 32 --s 3 --l 4 --n blue\n", encoding="utf-8")
    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "run", **{
        "validation.prompts": "[a green circle]", "validation.prompt_file": str(prompts), "validation.at_start": "true",
        "validation.num_images": 1, "validation.steps": 2, "validation.every": 2, "train.max_steps": 2,
    })
    grid0 = tmp_path / "run" / "samples" / "step-000000.png"
    assert grid0.is_file()
    trainer.train()
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()
    grid = Image.open(grid0).convert("RGB")
    assert grid.size == (48, 64)  # cells as large as the largest image: 1 column x 2 prompts
    cell = np.asarray(grid.crop((0, 32, 48, 64)), dtype=np.float64)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red square", negative_prompt="blue", width=48, height=32, num_inference_steps=3, guidance_scale=4,
               generator=torch.Generator("cpu").manual_seed(5)).images[0]
    assert np.abs(cell - np.asarray(ref, dtype=np.float64)).mean() < 1.0


def test_prompts_with_settings_round_trip_through_one_kohya_line_each():
    """The web UI's prompt box holds one line per prompt: a mapping prompt must come back whole."""
    from loracraft.train.samples import prompt_entry, prompt_line
    from loracraft.train.ui.backend import read_fields, set_fields

    rich = {"prompt": "a cat, in lcstyle style", "negative_prompt": "blurry, dark", "seed": 42,
            "width": 48, "height": 64, "steps": 7, "guidance": 2.5}
    line = prompt_line(rich)
    assert line == "a cat, in lcstyle style --n blurry, dark --w 48 --h 64 --d 42 --l 2.5 --s 7"
    assert prompt_entry(line, "test") == rich
    assert prompt_line("a plain prompt") == "a plain prompt" and prompt_entry("a plain prompt", "t") == "a plain prompt"
    text = set_fields("validation:\n  every: 5\n", {"validation.prompts": f"{line}\n\na plain prompt\n"})
    assert read_fields(text)["validation.prompts"] == [rich, "a plain prompt"]
