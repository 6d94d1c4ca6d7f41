"""``loracraft generate`` and ``loracraft convert``.

The ``loracraft`` entry point (``loracraft.train.cli``) calls :func:`register` and turns the
:class:`~loracraft.infer.errors.LoracraftError` these commands raise into one-line messages
and exit codes, so nothing here prints errors or calls ``sys.exit``.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

from loracraft.infer.errors import UsageError

__all__ = ["register", "cmd_generate", "cmd_convert"]

_DEFAULTS = {"steps": 25, "guidance": 7.5, "num_images": 1, "strength": 0.75}
#: Options that describe a new image; ``--from-png`` takes all of them from the PNG instead.
_GENERATION_OPTIONS = (
    "lora",
    "lora_blocks",
    "clip_skip",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "num_images",
    "width",
    "height",
    "scheduler",
    "fuse",
    "scale_sweep",
    "init_image",
    "mask",
    "strength",
    "revision",
    "variant",
    "dtype",
)


def register(subparsers) -> None:
    """Add the ``generate`` and ``convert`` subcommands to an argparse subparsers object."""
    from loracraft.infer.schedulers import SCHEDULERS

    g = subparsers.add_parser(
        "generate",
        help="generate images with a base model and LoRA adapters",
        description="Generate images with a base model plus LoRA adapters (diffusers or kohya files). "
        "Each PNG records everything needed to regenerate it (--from-png).",
    )
    g.add_argument("--base", help="diffusers folder, hub id, or single-file .safetensors checkpoint")
    g.add_argument("--base-config", metavar="DIR", help="diffusers config folder for a single-file --base")
    g.add_argument("--revision", help="hub revision of --base (branch, tag or commit)")
    g.add_argument("--variant", help="weight variant of --base, e.g. fp16")
    g.add_argument("--dtype", help="float32 (default), float16 or bfloat16")
    g.add_argument("--device", default="cpu", help="torch device (default cpu)")
    g.add_argument(
        "--lora",
        action="append",
        metavar="PATH[:UNET[:TE]]",
        help="adapter file or folder, optionally with its weight (and a separate text-encoder weight); "
        "repeat to stack adapters",
    )
    g.add_argument(
        "--lora-dir",
        action="append",
        metavar="DIR",
        help="folder searched for <lora:NAME:W> tags in the prompt (NAME.safetensors or a run folder NAME/)",
    )
    g.add_argument(
        "--lora-blocks",
        action="append",
        metavar="[NAME:]down=W,mid=W,up=W",
        help="UNet block weights of one adapter, multiplying its weight (down.1=W: one block); "
        "NAME may be left out when one adapter is loaded",
    )
    g.add_argument(
        "--clip-skip",
        type=int,
        help="condition on the CLIP layer N from the end (1 = last, default; A1111 counting)",
    )
    g.add_argument(
        "--prompt",
        action="append",
        help="text prompt in A1111 syntax: (word:1.2), [word], BREAK, <lora:NAME:W>, any length; repeat for several",
    )
    g.add_argument("--negative-prompt", help="negative prompt (applies to every prompt)")
    g.add_argument("--seed", type=int, help="first seed; image i uses seed+i (default: random, recorded)")
    g.add_argument("--steps", type=int, help=f"denoising steps (default {_DEFAULTS['steps']})")
    g.add_argument(
        "--guidance", type=float, help=f"classifier-free guidance (default {_DEFAULTS['guidance']})"
    )
    g.add_argument("--num-images", type=int, help="images per prompt (default 1)")
    g.add_argument("--width", type=int, help="image width (a multiple the model implies; default native)")
    g.add_argument("--height", type=int, help="image height (default native)")
    g.add_argument(
        "--scheduler",
        metavar="NAME",
        help=f"one of {', '.join(SCHEDULERS)}, or an A1111 sampler name such as 'DPM++ 2M Karras' "
        "or 'Euler a' (any case; default: the model's)",
    )
    g.add_argument("--fuse", action="store_true", help="merge the adapters into the weights (faster)")
    g.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    g.add_argument(
        "--scale-sweep",
        metavar="S1,S2,...",
        help="generate at each LoRA scale multiplier (e.g. 0,0.5,1) and tile one grid across scales",
    )
    g.add_argument("--grid", action="store_true", help="also write all images tiled into one grid PNG")
    g.add_argument("--init-image", help="start image: img2img (with --mask: inpainting)")
    g.add_argument("--mask", help="inpainting mask for --init-image (white = repaint)")
    g.add_argument("--strength", type=float, help="how much of --init-image to change, (0, 1] (default 0.75)")
    g.add_argument(
        "--from-png",
        metavar="IMG",
        help="regenerate an image from the record in its PNG (loracraft's, or A1111's parameters with --base)",
    )
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin files (can run code)")
    g.add_argument("--attention-slicing", action="store_true", help="slice attention (less memory, slower)")
    g.set_defaults(func=cmd_generate)

    c = subparsers.add_parser(
        "convert",
        help="convert a LoRA between diffusers and kohya/A1111 formats",
        description="Convert a LoRA adapter between diffusers/PEFT and kohya/A1111 layouts, keeping alpha.",
    )
    c.add_argument(
        "input", metavar="IN", help="adapter file or folder (either format, detected from its keys)"
    )
    c.add_argument("output", metavar="OUT", help="output .safetensors file, or a folder")
    c.add_argument("--to", required=True, choices=["kohya", "diffusers"], help="target format")
    c.add_argument("--allow-pickle", action="store_true", help="allow a .ckpt/.pt/.bin input (can run code)")
    c.add_argument(
        "--base",
        metavar="MODEL",
        default=None,
        help="the base the adapter was trained on (diffusers folder or Hub id): its UNet layout numbers kohya's "
        "SDXL block names (needed for a non-standard SDXL-architecture base whose adapter does not record it)",
    )
    c.set_defaults(func=cmd_convert)


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------
def _parse_sweep(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise UsageError(f"cannot read scale sweep {text!r}, --scale-sweep, give numbers like 0,0.5,1")
    return values


def _validate_generate(args) -> list[str]:
    """Every problem with the command line, found before any weights load."""
    problems: list[str] = []
    if args.from_png:
        given = [
            f"--{o.replace('_', '-')}"
            for o in _GENERATION_OPTIONS
            if getattr(args, o, None) not in (None, False)
        ]
        if given:
            problems.append(
                f"--from-png takes every setting from the image, {', '.join(given)}, drop them "
                "(only --base/--base-config/--lora-dir/--out/--allow-pickle may be given)"
            )
        return problems
    if not args.base:
        problems.append("no base model, --base, pass a diffusers folder, hub id or .safetensors checkpoint")
    if not args.prompt:
        problems.append("no prompt, --prompt, pass the text to generate")
    if args.mask and not args.init_image:
        problems.append("a mask needs an image to inpaint, --mask, pass --init-image too")
    if (
        (args.fuse or args.scale_sweep)
        and not args.lora
        and "<lora:" not in " ".join(args.prompt or []).lower()
    ):
        flag = "--fuse" if args.fuse else "--scale-sweep"
        problems.append(f"{flag} needs an adapter, {flag}, pass --lora PATH")
    for flag, path in (("--init-image", args.init_image), ("--mask", args.mask)):
        if path and not Path(path).expanduser().is_file():
            problems.append(f"file not found, {flag} {path}, check the path")
    problems.extend(_check_adapter_options(args))
    if args.clip_skip is not None and args.clip_skip < 1:
        problems.append(f"clip skip counts from 1 (the last layer), --clip-skip {args.clip_skip}, use 1 or 2")
    if args.scheduler:
        from loracraft.infer.schedulers import resolve_scheduler

        try:
            resolve_scheduler(args.scheduler)
        except UsageError as e:
            problems.extend(e.problems)
    if args.scale_sweep:
        try:
            _parse_sweep(args.scale_sweep)
        except UsageError as e:
            problems.extend(e.problems)
    return problems


def _check_adapter_options(args) -> list[str]:
    """--lora paths, --lora-blocks spellings and the prompts' <lora:> tags, before any load."""
    from loracraft.infer.adapters import parse_block_weights, parse_lora_spec

    problems: list[str] = []
    for spec in args.lora or []:
        try:
            path = parse_lora_spec(spec)[0]
        except UsageError as e:
            problems.extend(e.problems)
            continue
        if not Path(path).expanduser().exists():
            problems.append(f"adapter file not found, --lora {path}, check the path")
    for spec in args.lora_blocks or []:
        try:
            parse_block_weights(spec)
        except UsageError as e:
            problems.extend(e.problems)
    try:
        _prompt_tags(args)
    except UsageError as e:
        problems.extend(e.problems)
    return problems


def _prompt_tags(args) -> tuple[list[str], list[tuple[str, float, float | None, str]]]:
    """Prompts without their <lora:> tags, and the tagged adapters as (path, unet, te, name)."""
    from loracraft.infer.prompts import extract_lora_tags, find_lora

    cleaned, tag_sets = [], []
    for prompt in args.prompt or []:
        text, tags = extract_lora_tags(prompt)
        cleaned.append(text)
        tag_sets.append(tags)
    if any(tags != tag_sets[0] for tags in tag_sets):
        raise UsageError(
            "the prompts carry different <lora:> tags, --prompt, run prompts with different adapters separately"
        )
    specs = []
    for tag in tag_sets[0] if tag_sets else []:
        path = find_lora(tag.name, args.lora_dir or [])
        specs.append((str(path), tag.unet, tag.text_encoder, tag.name))
    return cleaned, specs


def _load_adapters(pipe, args) -> None:
    """--lora adapters, then the prompts' <lora:> tags, then --lora-blocks; one set_scales."""
    from loracraft.infer import adapters as A

    A.load_adapters(pipe, args.lora or [], allow_pickle=args.allow_pickle)
    taken = {a.name for a in A.loaded_adapters(pipe)}
    for path, unet, te, name in _prompt_tags(args)[1]:
        A.load_adapter(
            pipe, path, name=name if name not in taken else None, scale=unet, text_encoder_scale=te,
            allow_pickle=args.allow_pickle, activate=False,
        )  # fmt: skip
    loaded = {a.name: a for a in A.loaded_adapters(pipe)}
    for spec in args.lora_blocks or []:
        name, weights = A.parse_block_weights(spec)
        if name is None and len(loaded) == 1:
            name = next(iter(loaded))
        if name not in loaded:
            raise UsageError(
                f"no loaded adapter {name!r} for block weights, --lora-blocks {spec}, "
                f"start it with one of: {', '.join(loaded) or 'none loaded'}"
            )
        loaded[name].blocks = weights
    A.set_scales(pipe)


def _next_index(out: Path) -> int:
    """A1111-style numbering: continue after the highest ``NNNNN-`` file, never overwrite."""
    best = -1
    if out.is_dir():
        for p in out.iterdir():
            m = re.match(r"^(\d{5})-", p.name)
            if m:
                best = max(best, int(m.group(1)))
    return best + 1


def _scale_tag(s: float) -> str:
    return f"{s:g}".replace("-", "m")


def cmd_generate(args: argparse.Namespace) -> int:
    """Run ``loracraft generate``; prints the path of every file written."""
    from loracraft.infer import adapters as A
    from loracraft.infer.generation import generate, regenerate, save_grid, sweep_scales
    from loracraft.infer.models import load_base
    from loracraft.infer.prompts import extract_lora_tags

    problems = _validate_generate(args)
    if problems:
        raise UsageError(
            problems[0] if len(problems) == 1 else f"{len(problems)} problems", problems=problems
        )
    out = Path(args.out).expanduser()
    index = _next_index(out)

    if args.from_png:
        image = regenerate(
            args.from_png,
            base=args.base,
            base_config=args.base_config,
            allow_pickle=args.allow_pickle,
            lora_dirs=args.lora_dir or [],
        )
        path = image.save(out / f"{index:05d}-{image.record.seed}.png")
        print(path)
        return 0

    pipe = load_base(
        args.base,
        revision=args.revision,
        variant=args.variant,
        torch_dtype=args.dtype,
        device=args.device,
        config=args.base_config,
        allow_pickle=args.allow_pickle,
        attention_slicing=args.attention_slicing,
    )
    _load_adapters(pipe, args)
    kwargs = dict(
        prompt=_prompt_tags(args)[0],
        negative_prompt=extract_lora_tags(args.negative_prompt)[0] if args.negative_prompt else None,
        steps=args.steps if args.steps is not None else _DEFAULTS["steps"],
        guidance=args.guidance if args.guidance is not None else _DEFAULTS["guidance"],
        num_images_per_prompt=args.num_images if args.num_images is not None else _DEFAULTS["num_images"],
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        init_image=args.init_image,
        mask_image=args.mask,
        strength=args.strength if args.strength is not None else _DEFAULTS["strength"],
        clip_skip=args.clip_skip or 1,
    )
    if args.scale_sweep:
        scales = _parse_sweep(args.scale_sweep)
        rows = sweep_scales(pipe, scales, fuse=args.fuse, seed=args.seed, **kwargs)
        cells, names = [], []
        for j in range(len(rows[0])):  # one grid row per image, one column per scale
            for i, s in enumerate(scales):
                img = rows[i][j]
                path = img.save(out / f"{index:05d}-{img.record.seed}-x{_scale_tag(s)}.png")
                index += 1
                cells.append(img)
                names.append(path.name)
                print(path)
        print(save_grid(cells, len(rows[0]), len(scales), out / f"{index:05d}-grid.png", cells=names))
        return 0

    if args.fuse:
        A.fuse(pipe)
    images = generate(pipe, seed=args.seed, **kwargs)
    names = []
    for img in images:
        path = img.save(out / f"{index:05d}-{img.record.seed}.png")
        index += 1
        names.append(path.name)
        print(path)
    if args.grid:
        cols = kwargs["num_images_per_prompt"]
        print(save_grid(images, len(images) // cols, cols, out / f"{index:05d}-grid.png", cells=names))
    return 0


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace) -> int:
    """Run ``loracraft convert IN OUT --to FORMAT``; prints the written file and its shape."""
    from loracraft.infer.formats import convert_lora_file, read_lora

    path = convert_lora_file(args.input, args.output, args.to, allow_pickle=args.allow_pickle, base=args.base)
    adapter = read_lora(path)
    ranks = sorted({m.rank for _, _, m in adapter.items()})
    alphas = sorted({m.alpha for _, _, m in adapter.items()})
    dora = any(m.magnitude is not None for _, _, m in adapter.items())
    print(
        f"{path} ({args.to}, {adapter.num_modules} modules, rank {'/'.join(map(str, ranks))}, "
        f"alpha {'/'.join(f'{a:g}' for a in alphas)}{', DoRA' if dora else ''})"
    )
    if dora and args.to == "kohya":
        print(
            "note: DoRA is stored as output-axis dora_scale (LyCORIS wd_on_output); LyCORIS applies it exactly, "
            "ComfyUI approximately, A1111 not correctly (it decomposes along the input axis)"
        )
    return 0
