"""Sample prompts: what the run generates at every ``validation.every`` steps (``samples/step-N.png``).

A prompt is a string or a mapping with its own negative prompt, seed, size, steps and guidance
(``validation.prompts``), and more can come from ``validation.prompt_file``: a ``.txt`` file in
kohya sd-scripts' line syntax, so prompt files written for kohya work unchanged, or a YAML list.

kohya's line syntax (sd-scripts ``train_util.line_to_prompt_dict``): the prompt, then options
each introduced by `` --``::

    a castle on a hill --n blurry, low quality --w 512 --h 768 --d 42 --l 7.5 --s 28

``--n`` negative prompt, ``--w``/``--h`` width/height, ``--d`` seed, ``--l`` guidance scale,
``--s`` steps. Blank lines and lines starting with ``#`` are skipped. kohya's sampler option
(``--ss``) and its ControlNet/other options are refused rather than ignored: the run's
inference scheduler is the base model's own.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from PIL import Image
from pydantic import ValidationError

from loracraft.infer.errors import ConfigError
from loracraft.train.config import SamplePromptCfg

#: Generated sizes are multiples of the VAE's factor (8 for SD1, SD2 and SDXL), as diffusers' pipelines require.
SIZE_MULTIPLE = 8

#: kohya option letter -> (our field, type). The option's value runs to the next `` --``.
KOHYA_OPTIONS = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance", float),
    "s": ("steps", int),
}


def _sample_prompt(fields: dict, where: str) -> SamplePromptCfg:
    try:
        return SamplePromptCfg(**fields)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "prompt"
        raise ConfigError(f"bad sample prompt {key}: {err['msg']}, {where}, fix that value") from None


def parse_prompt_line(line: str, where: str = "validation.prompt_file") -> SamplePromptCfg:
    """One kohya prompt line -> a sample prompt (see the module docstring for the syntax)."""
    prompt, *options = (" " + line.strip()).split(" --")
    fields: dict = {"prompt": prompt.strip()}
    for option in options:
        if not option.strip():
            continue
        m = re.fullmatch(r"(\w+)(?:\s+(.*))?", option.strip(), re.DOTALL)
        name, value = (m.group(1).lower(), (m.group(2) or "").strip()) if m else (option.strip(), "")
        if name not in KOHYA_OPTIONS:
            raise ConfigError(
                f"unsupported prompt option --{name}, {where}, use --n --w --h --d --l --s "
                "(the sampler is the base model's own)"
            )
        key, kind = KOHYA_OPTIONS[name]
        try:
            fields[key] = kind(value)
        except ValueError:
            raise ConfigError(f"--{name} needs a number, got {value!r}, {where}, e.g. --{name} 28") from None
    if not fields["prompt"]:
        raise ConfigError(f"empty prompt, {where}, put the prompt before its -- options")
    return _sample_prompt(fields, where)


def prompt_line(entry: str | dict | SamplePromptCfg) -> str:
    """A sample prompt written back as one kohya line (:func:`parse_prompt_line` reads it again):
    how the web UI shows prompts with their own settings in a one-line-per-prompt text box."""
    fields = _from_entry(entry, "validation.prompts").model_dump(exclude_none=True)
    options = [f"--{letter} {fields[key]}" for letter, (key, _) in KOHYA_OPTIONS.items() if key in fields]
    return " ".join([fields["prompt"], *options])


def prompt_entry(line: str, where: str) -> str | dict:
    """One kohya line as a ``validation.prompts`` entry: the plain string when it has no options."""
    fields = parse_prompt_line(line, where).model_dump(exclude_none=True)
    return fields["prompt"] if len(fields) == 1 else fields


def read_prompt_file(path: str | Path) -> list[SamplePromptCfg]:
    """``.txt``: one kohya line per prompt; ``.yaml``/``.yml``: a list of strings or mappings."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"prompt file not found, validation.prompt_file={path}, give an existing .txt or .yaml file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the prompt file, {path}, save it as UTF-8 text ({e})") from e
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            entries = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"prompt file is not valid YAML, {path}, fix the syntax ({e})".replace("\n", " ")
            ) from e
        if not isinstance(entries, list):
            raise ConfigError(
                f"prompt file must hold a YAML list, {path}, write '- a prompt' lines or mappings"
            )
        return [_from_entry(e, f"{path} item {i + 1}") for i, e in enumerate(entries)]
    lines = [
        (n, ln)
        for n, ln in enumerate(text.splitlines(), start=1)
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [parse_prompt_line(ln, f"{path} line {n}") for n, ln in lines]


def _from_entry(entry, where: str) -> SamplePromptCfg:
    if isinstance(entry, str):
        return _sample_prompt({"prompt": entry}, where)
    if isinstance(entry, SamplePromptCfg):
        return entry
    if isinstance(entry, dict):
        return _sample_prompt(entry, where)
    raise ConfigError(f"a sample prompt must be a string or a mapping, {where}, got {type(entry).__name__}")


def sample_prompts(validation) -> list[SamplePromptCfg]:
    """``validation.prompts`` then ``validation.prompt_file``'s, each with its own settings."""
    found = [_from_entry(p, f"validation.prompts item {i + 1}") for i, p in enumerate(validation.prompts)]
    if validation.prompt_file:
        found += read_prompt_file(validation.prompt_file)
    check_sizes(found, SIZE_MULTIPLE)
    return found


def check_sizes(prompts: list[SamplePromptCfg], multiple: int) -> None:
    """Sizes the pipeline cannot generate, refused before training starts."""
    for p in prompts:
        for key in ("width", "height"):
            value = getattr(p, key)
            if value is not None and value % multiple:
                raise ConfigError(
                    f"sample prompt {key}={value} is not a multiple of {multiple}, prompt {p.prompt!r}, "
                    f"use {max(multiple, value // multiple * multiple)}"
                )


def generate_samples(
    pipe, prompts: list[SamplePromptCfg], validation, resolution: int
) -> list[list[Image.Image]]:
    """``num_images`` images per prompt. Seeds: the prompt's own ``seed`` (+1 per image), else
    ``validation.seed`` numbered prompt-major across all prompts (seed, seed+1, ...)."""
    from loracraft.infer.generation import generate

    v, n, rows = validation, validation.num_images, []
    for k, p in enumerate(prompts):
        out = generate(
            pipe, p.prompt, negative_prompt=p.negative_prompt,
            seed=p.seed if p.seed is not None else v.seed + k * n,
            steps=p.steps or v.steps, guidance=p.guidance if p.guidance is not None else v.guidance,
            num_images_per_prompt=n, width=p.width or resolution, height=p.height or resolution,
        )  # fmt: skip
        rows.append([g.image for g in out])
    return rows


def sample_grid(rows: list[list[Image.Image]]) -> Image.Image:
    """One row per prompt; cells as large as the largest image (prompts may have their own size),
    each image at its cell's top left on black."""
    cw = max(im.width for row in rows for im in row)
    ch = max(im.height for row in rows for im in row)
    grid = Image.new("RGB", (cw * max(len(r) for r in rows), ch * len(rows)))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * cw, r * ch))
    return grid


__all__ = [
    "KOHYA_OPTIONS", "parse_prompt_line", "read_prompt_file", "sample_prompts", "check_sizes",
    "generate_samples", "sample_grid",
]  # fmt: skip
