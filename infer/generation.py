"""Generate images with a base + adapters; record everything needed to regenerate each one.

* One ``torch.Generator`` per image, seeded with that image's seed, and one pipeline call per
  image: image *i* is computed exactly as it would be alone, so ``--from-png`` reproduces it
  pixel for pixel.
* Sizes are checked against the multiple the model implies (VAE factor x UNet downsampling).
* Schedulers are chosen by name and always built from the base's own scheduler config
  (``from_config``), so switching back and forth never drifts.
* Text-to-image, img2img and inpainting share one set of components
  (``AutoPipelineFor*.from_pipe``), so loaded adapters apply to all three.
* PNGs carry the A1111 ``parameters`` text chunk (shown by common viewers and image sites) and
  a ``loracraft`` JSON chunk with the full record.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.io import atomic_path
from loracraft.infer.models import base_info, size_multiple, vae_scale_factor

__all__ = [
    "SCHEDULERS",
    "GenerationRecord",
    "GeneratedImage",
    "generate",
    "sweep_scales",
    "set_scheduler",
    "scheduler_name",
    "check_size",
    "make_grid",
    "save_png",
    "save_grid",
    "read_record",
    "regenerate",
]

#: Short names accepted by ``--scheduler`` -> diffusers classes (A1111 sampler names work too).
from loracraft.infer.schedulers import SCHEDULERS  # noqa: E402  (light module: the CLI parser reads it)

#: Largest accepted image side: 8192 px already needs ~4 GB of latents-side activations on SDXL;
#: a hostile record asking for 200000 px would try to allocate ~160 GB.
MAX_SIDE = 8192
#: Most denoising steps accepted (schedulers are trained on 1000 timesteps).
MAX_STEPS = 1000
PNG_PARAMETERS_KEY = "parameters"  # A1111 convention
PNG_RECORD_KEY = "loracraft"
RECORD_VERSION = 1
_SCHED_ATTR = "_loracraft_scheduler_config"
_SCHED_NAME = "_loracraft_scheduler_name"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
@dataclass
class GenerationRecord:
    """Everything that determines one image (the PNG's ``loracraft`` chunk)."""

    prompt: str
    negative_prompt: str | None
    seed: int
    steps: int
    guidance: float
    scheduler: str
    width: int
    height: int
    base: dict
    adapters: list[dict] = field(default_factory=list)
    fused: bool = False
    mode: str = "txt2img"
    strength: float | None = None
    init_image: dict | None = None
    mask_image: dict | None = None
    scheduler_config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    version: int = RECORD_VERSION
    clip_skip: int = 1
    #: "a1111" for a record read from an A1111 ``parameters`` text (prompt still holds its tags).
    source: str = "loracraft"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: dict) -> GenerationRecord:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def a1111_parameters(self) -> str:
        """The A1111 ``parameters`` text: prompt (with ``<lora:name:scale>`` tags), negative, settings."""
        tags = "".join(f" {_lora_tag(a)}" for a in self.adapters)
        lines = [self.prompt + tags]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields = [
            f"Steps: {self.steps}",
            f"Sampler: {_sampler_label(self.scheduler, self.scheduler_config)}",
            f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {Path(str(self.base.get('base', 'unknown'))).name}",
        ]
        if self.clip_skip != 1:
            fields.append(f"Clip skip: {self.clip_skip}")
        if self.strength is not None:
            fields.append(f"Denoising strength: {self.strength:g}")
        if self.adapters:
            hashes = ", ".join(f"{a['name']}: {str(a.get('sha256') or '')[:12]}" for a in self.adapters)
            fields.append(f'Lora hashes: "{hashes}"')
        fields.append(f"Version: loracraft {self.versions.get('loracraft', '')}".rstrip())
        lines.append(", ".join(fields))
        return "\n".join(lines)


def _lora_tag(a: dict) -> str:
    """A1111's tag for a recorded adapter: ``<lora:NAME:W>``, or ``<lora:NAME:TE:UNET>`` when they differ."""
    unet = a.get("scale") if a.get("scale") is not None else 1
    te = a.get("text_encoder_scale")
    if te is None or te == unet:
        return f"<lora:{a['name']}:{unet:g}>"
    return f"<lora:{a['name']}:{te:g}:{unet:g}>"


@dataclass
class GeneratedImage:
    image: Image.Image
    record: GenerationRecord

    def save(self, path: str | Path) -> Path:
        return save_png(self.image, self.record, path)


def installed_versions(packages: Sequence[str] = ("loracraft", "diffusers", "torch")) -> dict[str, str]:
    """``{distribution: installed version}`` ("not installed" when absent): what a record or run manifest
    keeps so a later reproduction can say why its numbers differ."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# --------------------------------------------------------------------------------------------
# Schedulers and sizes
# --------------------------------------------------------------------------------------------
def _sampler_label(name: str, config: dict) -> str:
    """What A1111 would call the recorded scheduler (its ``Sampler:`` field), else our name."""
    from loracraft.infer.schedulers import a1111_name, resolve_scheduler

    try:
        cls = resolve_scheduler(name)[1]
    except UsageError:
        cls = name
    return a1111_name(cls, config or {}) or name


def _base_scheduler_config(pipe) -> dict:
    cfg = getattr(pipe, _SCHED_ATTR, None)
    if cfg is None:
        cfg = dict(pipe.scheduler.config)
        setattr(pipe, _SCHED_ATTR, cfg)
    return cfg


def scheduler_name(pipe) -> str:
    """Name of the pipeline's current scheduler: as set by :func:`set_scheduler`, else the
    :data:`SCHEDULERS` short name of its class (the class name for others)."""
    cls = type(pipe.scheduler).__name__
    named = getattr(pipe, _SCHED_NAME, None)
    if named and named[1] == cls:
        return named[0]
    for short, full in SCHEDULERS.items():
        if full == cls:
            return short
    return cls


def set_scheduler(pipe, name: str, config: dict | None = None) -> str:
    """Replace the scheduler by name, built from the base's original config (or ``config``).

    Args:
        name: a :data:`SCHEDULERS` short name, a diffusers class name or an A1111 sampler name
            ("DPM++ 2M Karras", "Euler a", ...; any case), see
            :data:`loracraft.infer.schedulers.A1111_SAMPLERS`.
        config: a full scheduler config (as recorded in a PNG); default the base's own.

    Returns:
        the canonical name (or the class name for schedulers outside the tables).
    """
    import diffusers

    from loracraft.infer.schedulers import resolve_scheduler

    try:
        short, cls_name, overrides = resolve_scheduler(name)
    except UsageError:
        # A record may name a scheduler the user set up outside loracraft; accept any diffusers one.
        if not (name.endswith("Scheduler") and isinstance(getattr(diffusers, name, None), type)):
            raise
        short = cls_name = name
        overrides = {}
    cls = getattr(diffusers, cls_name)
    base_cfg = _base_scheduler_config(pipe)
    # The base config goes in raw, as diffusers' own idiom does: keys it never set keep the new
    # class's defaults. A recorded config is explicit, so it rebuilds exactly what was used.
    if config is not None:
        pipe.scheduler = cls.from_config(_explicit_config(config))
    else:
        pipe.scheduler = cls.from_config(base_cfg, **overrides)
    setattr(pipe, _SCHED_NAME, (short, cls_name))
    return short


def check_size(pipe, width: int | None, height: int | None) -> tuple[int, int]:
    """Default or validate the image size: each side a positive multiple of :func:`size_multiple`."""
    m = size_multiple(pipe)
    default = int(pipe.unet.config.sample_size) * vae_scale_factor(pipe)
    w = default if width is None else int(width)
    h = default if height is None else int(height)
    big = [f"{label} {v}" for label, v in (("width", w), ("height", h)) if v > MAX_SIDE]
    if big:
        raise UsageError(
            f"{' and '.join(big)} above the {MAX_SIDE} px limit, --width/--height, use at most {MAX_SIDE}"
        )
    bad = [f"{label} {v}" for label, v in (("width", w), ("height", h)) if v <= 0 or v % m]
    if bad:

        def near(v):
            return max(m, round(v / m) * m)

        raise UsageError(
            f"{' and '.join(bad)} not a multiple of {m} (this model's VAE factor {vae_scale_factor(pipe)} x UNet "
            f"downsampling {m // vae_scale_factor(pipe)}), --width/--height, use e.g. {near(w)}x{near(h)}"
        )
    return w, h


# --------------------------------------------------------------------------------------------
# Images in, images out
# --------------------------------------------------------------------------------------------
def _pixels_sha256(img: Image.Image) -> str:
    h = hashlib.sha256(f"{img.mode}|{img.size}|".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def _load_image(src, mode: str, what: str) -> tuple[Image.Image, dict]:
    """Open ``src`` (path or PIL image) and describe it for the record."""
    if isinstance(src, Image.Image):
        img = src.convert(mode)
        return img, {"path": None, "sha256": _pixels_sha256(img)}
    path = Path(src).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} not found, {path}, check the path")
    try:
        with Image.open(path) as im:
            img = im.convert(mode)
    except OSError as e:
        raise UsageError(f"{what} is not a readable image ({e}), {path}, pass a PNG or JPEG") from e
    return img, {"path": str(path.resolve()), "sha256": _pixels_sha256(img)}


def make_grid(images: Sequence[Image.Image], rows: int, cols: int) -> Image.Image:
    """Tile ``rows x cols`` images (diffusers' ``make_image_grid``)."""
    from diffusers.utils import make_image_grid

    return make_image_grid(list(images), rows=rows, cols=cols)


def save_png(image: Image.Image, record: GenerationRecord, path: str | Path) -> Path:
    """Write a PNG with the A1111 ``parameters`` chunk and the ``loracraft`` JSON chunk, atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, record.a1111_parameters())
    info.add_text(PNG_RECORD_KEY, record.to_json())
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def save_grid(
    images: Sequence[GeneratedImage], rows: int, cols: int, path: str | Path, cells: Sequence[str] = ()
) -> Path:
    """Write a grid PNG; its ``loracraft`` chunk lists the cells' files (regenerate those, not the grid)."""
    from PIL.PngImagePlugin import PngInfo

    grid = make_grid([g.image for g in images], rows, cols)
    first = images[0].record
    info = PngInfo()
    info.add_text(PNG_PARAMETERS_KEY, first.a1111_parameters() + f"\nGrid: {rows}x{cols}")
    info.add_text(
        PNG_RECORD_KEY,
        json.dumps({"grid": {"rows": rows, "cols": cols, "cells": list(cells)}, "version": RECORD_VERSION}),
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)
    return path


def read_record(png: str | Path) -> GenerationRecord:
    """The :class:`GenerationRecord` a PNG carries: loracraft's own JSON chunk, else A1111's
    ``parameters`` text. Every field is checked (types and bounds) before anything is loaded."""
    path = Path(png).expanduser()
    if not path.is_file():
        raise UsageError(f"image not found, {path}, check the --from-png path")
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except OSError as e:
        raise UsageError(f"not a readable PNG ({e}), {path}, pass a PNG written by loracraft generate") from e
    raw = text.get(PNG_RECORD_KEY)
    if not raw:
        if text.get(PNG_PARAMETERS_KEY):
            return _check_record(_record_from_infotext(text[PNG_PARAMETERS_KEY], path), path)
        raise UsageError(
            f"PNG has no generation record (neither loracraft's nor A1111's parameters), {path}, "
            "pick an image written by loracraft generate or AUTOMATIC1111"
        )
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise UsageError(f"PNG's loracraft record is damaged ({e}), {path}, use the original file") from e
    if isinstance(data, dict) and "grid" in data:
        cells = data["grid"].get("cells") if isinstance(data["grid"], dict) else None
        hint = f"regenerate one of its cells, e.g. {cells[0]}" if cells else "regenerate one of its cells"
        raise UsageError(f"PNG is a grid, not a single image, {path}, {hint}")
    return _check_record(data, path)


def _record_from_infotext(text: str, path: Path) -> dict:
    """A1111's settings line as record fields (the prompt keeps its <lora:> tags)."""
    from loracraft.infer.prompts import parse_infotext
    from loracraft.infer.schedulers import resolve_scheduler

    prompt, negative, s = parse_infotext(text)
    missing = [k for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if k not in s]
    if missing:
        raise UsageError(
            f"A1111 parameters lack {', '.join(missing)}, {path}, only complete A1111 infotexts can be regenerated"
        )
    problems: list[str] = []

    def number(key: str, kind):
        try:
            return kind(s[key]) if kind is int else float(s[key])
        except ValueError:
            problems.append(f"A1111 field {key}: {s[key]!r} is not a number, {path}, fix or drop the field")
            return None

    w, _, h = s["Size"].partition("x")
    if not (w.isdigit() and h.isdigit()):
        problems.append(f"A1111 field Size: {s['Size']!r} is not WIDTHxHEIGHT, {path}, write e.g. 512x768")
    try:
        scheduler = resolve_scheduler(s["Sampler"], schedule_type=s.get("Schedule type"))[0]
    except UsageError as e:
        scheduler = None
        problems.append(f"A1111 sampler {s['Sampler']!r} is not supported ({e.problems[0].split(',')[0]}), {path}, "
                        "regenerate with loracraft generate --scheduler NAME instead")  # fmt: skip
    record = {
        "prompt": prompt, "negative_prompt": negative or None, "seed": number("Seed", int),
        "steps": number("Steps", int), "guidance": number("CFG scale", float), "scheduler": scheduler,
        "width": int(w) if w.isdigit() else None, "height": int(h) if h.isdigit() else None,
        "base": {"base": "unknown"}, "clip_skip": number("Clip skip", int) if "Clip skip" in s else 1,
        "source": "a1111",
    }  # fmt: skip
    if problems:
        raise UsageError(
            problems[0] if len(problems) == 1 else f"{len(problems)} problems", problems=problems
        )
    return record


_DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "fp32", "fp16", "bf16")


def _check_record(data, path: Path) -> GenerationRecord:
    """Refuse a record whose fields have the wrong type or absurd values, naming each."""
    if not isinstance(data, dict):
        raise UsageError(
            f"PNG's loracraft record is a JSON {type(data).__name__}, not an object, {path}, "
            "use an image written by loracraft generate"
        )
    problems: list[str] = []

    def bad(field: str, value, rule: str) -> None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        problems.append(f"record field {field} = {shown} {rule}, {path}, regenerate from an unedited PNG")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return (is_int(v) or isinstance(v, float)) and math.isfinite(v)

    req = {"prompt", "seed", "steps", "guidance", "scheduler", "width", "height", "base"}
    for key in sorted(req - set(data)):
        bad(key, None, "is missing")
    checks = [
        ("prompt", lambda v: isinstance(v, str), "must be text"),
        ("negative_prompt", lambda v: v is None or isinstance(v, str), "must be text or null"),
        ("seed", lambda v: is_int(v) and 0 <= v < 2**64, "must be a whole number in [0, 2^64)"),
        ("steps", lambda v: is_int(v) and 1 <= v <= MAX_STEPS, f"must be a whole number in [1, {MAX_STEPS}]"),
        ("guidance", lambda v: is_num(v) and 0 <= v <= 100, "must be a number in [0, 100]"),
        ("width", lambda v: is_int(v) and 1 <= v <= MAX_SIDE, f"must be a whole number of pixels in [1, {MAX_SIDE}]"),
        ("height", lambda v: is_int(v) and 1 <= v <= MAX_SIDE, f"must be a whole number of pixels in [1, {MAX_SIDE}]"),
        ("scheduler", lambda v: isinstance(v, str), "must be a scheduler name"),
        ("base", lambda v: isinstance(v, dict), "must be an object"),
        ("adapters", lambda v: isinstance(v, list) and all(isinstance(a, dict) for a in v), "must be a list of objects"),
        ("strength", lambda v: v is None or (is_num(v) and 0 < v <= 1), "must be a number in (0, 1] or null"),
        ("clip_skip", lambda v: is_int(v) and 1 <= v <= 24, "must be a whole number in [1, 24]"),
        ("mode", lambda v: v in ("txt2img", "img2img", "inpaint"), "must be txt2img, img2img or inpaint"),
        ("fused", lambda v: isinstance(v, bool), "must be true or false"),
        ("scheduler_config", lambda v: isinstance(v, dict), "must be an object"),
        ("init_image", lambda v: v is None or isinstance(v, dict), "must be an object or null"),
        ("mask_image", lambda v: v is None or isinstance(v, dict), "must be an object or null"),
    ]  # fmt: skip
    for key, ok, rule in checks:
        if key in data and not ok(data[key]):
            bad(key, data[key], rule)
    base = data.get("base") if isinstance(data.get("base"), dict) else {}
    device, dtype = base.get("device"), base.get("dtype")
    if device is not None and not (isinstance(device, str) and device.split(":")[0] in _DEVICE_TYPES):
        bad("base.device", device, f"must be one of {', '.join(_DEVICE_TYPES)} (optionally :N)")
    if dtype is not None and str(dtype).removeprefix("torch.") not in _DTYPE_NAMES:
        bad("base.dtype", dtype, "must be float32, float16 or bfloat16")
    for i, a in enumerate(data.get("adapters") or []):
        if not isinstance(a, dict):
            continue
        te, blocks = a.get("text_encoder_scale"), a.get("blocks")
        if (
            not isinstance(a.get("name"), str)
            or not (a.get("scale") is None or is_num(a.get("scale")))
            or not (te is None or is_num(te))
            or not (blocks is None or (isinstance(blocks, dict) and all(map(is_num, blocks.values()))))
        ):
            bad(f"adapters[{i}]", a.get("name"), "needs a text name and numeric scales")
    if problems:
        raise UsageError(
            problems[0] if len(problems) == 1 else f"{len(problems)} problems", problems=problems
        )
    return GenerationRecord.from_dict(data)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def _as_list(x, n: int, what: str) -> list:
    if x is None or isinstance(x, str):
        return [x] * n
    x = list(x)
    if len(x) != n:
        raise UsageError(
            f"{len(x)} {what} for {n} prompts, --{what.replace('_', '-')}, give one or one per prompt"
        )
    return x


def _seeds(seed, total: int) -> list[int]:
    if seed is None:
        import secrets

        seed = secrets.randbits(31)
    if isinstance(seed, int):
        return [seed + i for i in range(total)]
    seeds = [int(s) for s in seed]
    if len(seeds) != total:
        raise UsageError(f"{len(seeds)} seeds for {total} images, --seed, give one seed or one per image")
    return seeds


def _mode_pipe(pipe, mode: str):
    """The pipeline for ``mode`` sharing ``pipe``'s components (and so its adapters).

    The img2img/inpaint pipeline gets its own copy of the scheduler: their constructors rewrite
    a shared scheduler's config in place (e.g. DDIM ``clip_sample`` -> False), which would
    silently change later text-to-image results.
    """
    if mode == "txt2img":
        return pipe
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    auto = AutoPipelineForImage2Image if mode == "img2img" else AutoPipelineForInpainting
    scheduler = type(pipe.scheduler).from_config(_explicit_config(pipe.scheduler.config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the clip_sample rewrite announces itself
        sub = auto.from_pipe(pipe, scheduler=scheduler)
    sub.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {"disable": True}))
    return sub


def _explicit_config(config) -> dict:
    """A scheduler config with every value explicit, as JSON types.

    diffusers' ``from_config`` re-derives keys listed in ``_use_default_values`` from class
    defaults instead of taking the stored value, so those bookkeeping keys are dropped.
    """
    clean = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    return json.loads(json.dumps(clean, default=str))


def _validate(steps, guidance, num_images_per_prompt, strength, mask_image, init_image) -> None:
    problems = []
    if not 1 <= int(steps) <= MAX_STEPS:
        problems.append(f"steps must be between 1 and {MAX_STEPS}, --steps {steps}, use e.g. 25")
    if not math.isfinite(float(guidance)) or float(guidance) < 0:
        problems.append(f"guidance must be a finite number >= 0, --guidance {guidance}, use e.g. 7.5")
    if int(num_images_per_prompt) < 1:
        problems.append(
            f"num_images_per_prompt must be at least 1, --num-images {num_images_per_prompt}, use 1 or more"
        )
    if init_image is not None and not (0.0 < float(strength) <= 1.0):
        problems.append(f"strength must be in (0, 1], --strength {strength}, use e.g. 0.75")
    if mask_image is not None and init_image is None:
        problems.append("a mask needs an image to inpaint, --mask, pass --init-image too")
    if problems:
        raise UsageError(
            problems[0] if len(problems) == 1 else f"{len(problems)} problems", problems=problems
        )


def _text_kwargs(pipe, prompt: str, negative: str | None, clip_skip: int) -> dict:
    """The pipeline's text inputs as embeddings, so A1111 syntax and long prompts reach it.

    For a plain prompt of up to 75 tokens these equal what the pipeline computes itself.
    """
    from loracraft.infer.denoise import encode_prompts, is_sdxl

    cond, uncond = encode_prompts(pipe, prompt, negative, clip_skip=clip_skip)
    kwargs = {"prompt_embeds": cond.embeds, "negative_prompt_embeds": uncond.embeds}
    if is_sdxl(pipe):
        kwargs.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=uncond.pooled)
    return kwargs


def _adapter_records(pipe) -> tuple[list[dict], bool]:
    """Loaded adapters for the record, plus any attached behind loracraft's back (e.g. a plain
    ``pipe.load_lora_weights``): those are recorded without a file, so regeneration refuses
    instead of silently producing an image without them."""
    from loracraft.infer.adapters import is_fused, loaded_adapters

    records = [a.record() for a in loaded_adapters(pipe)]
    known = {r["name"] for r in records}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name in getattr(getattr(pipe, component, None), "peft_config", None) or {}:
            if name not in known:
                known.add(name)
                records.append(
                    {"name": name, "path": None, "scale": None, "sha256": None, "format": "unknown"}
                )
    return records, is_fused(pipe)


def generate(
    pipe,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] | None = None,
    seed: int | Sequence[int] | None = None,
    steps: int = 25,
    guidance: float = 7.5,
    num_images_per_prompt: int = 1,
    width: int | None = None,
    height: int | None = None,
    scheduler: str | None = None,
    init_image: str | Path | Image.Image | None = None,
    mask_image: str | Path | Image.Image | None = None,
    strength: float = 0.75,
    clip_skip: int = 1,
) -> list[GeneratedImage]:
    """Generate images with the pipeline's current adapters and scales.

    Args:
        pipe: a pipeline from :func:`loracraft.infer.load_base` (any diffusers SD pipeline works;
            records then lack the base path).
        prompt: one prompt or a list.
        negative_prompt: one for all prompts, or one per prompt.
        seed: first seed (image *i* gets ``seed + i``), or one seed per image; ``None`` draws a
            random one (recorded, so the image stays reproducible).
        steps: denoising steps (img2img runs ``int(steps * strength)`` of them).
        guidance: classifier-free guidance scale.
        num_images_per_prompt: images per prompt (order: prompt-major).
        width: image width; default the model's native size; must be a multiple of
            :func:`loracraft.infer.models.size_multiple`.
        height: as ``width``.
        scheduler: a :data:`SCHEDULERS` name; ``None`` keeps the pipeline's current one.
        init_image: start image -> img2img (or inpainting with ``mask_image``); resized to
            ``width x height`` when those are given.
        mask_image: white = repaint, black = keep.
        strength: how much of ``init_image`` to replace (0-1].
        clip_skip: CLIP layer to condition on, counted from the end (1 = last; A1111/kohya counting).

    Prompts use A1111 syntax (``(word:1.2)``, ``[word]``, ``BREAK``, any length), encoded by
    :func:`loracraft.infer.denoise.encode_prompts`; ``<lora:...>`` tags are resolved by the CLI.

    Returns:
        one :class:`GeneratedImage` per image, each with its own record.

    Raises:
        UsageError: bad sizes, counts, scheduler names, missing images.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise UsageError("no prompt given, --prompt, pass a text prompt")
    _validate(steps, guidance, num_images_per_prompt, strength, mask_image, init_image)
    negatives = _as_list(negative_prompt, len(prompts), "negative_prompt")
    total = len(prompts) * int(num_images_per_prompt)
    seeds = _seeds(seed, total)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    else:
        _base_scheduler_config(pipe)  # remember the original before anyone swaps it

    init = mask = None
    init_rec = mask_rec = None
    if init_image is not None:
        init, init_rec = _load_image(init_image, "RGB", "init image")
        if width is None and height is None:
            width, height = init.size
    w, h = check_size(pipe, width, height)
    if init is not None and init.size != (w, h):
        init = init.resize((w, h), Image.Resampling.LANCZOS)
    if mask_image is not None:
        mask, mask_rec = _load_image(mask_image, "L", "mask image")
        if mask.size != (w, h):
            mask = mask.resize((w, h), Image.Resampling.NEAREST)
    mode = "txt2img" if init is None else ("inpaint" if mask is not None else "img2img")
    run = _mode_pipe(pipe, mode)

    info = base_info(pipe)
    adapters, fused = _adapter_records(pipe)
    sched = scheduler_name(run)
    sched_cfg = _explicit_config(run.scheduler.config)
    versions = installed_versions()
    out: list[GeneratedImage] = []
    for i in range(total):
        p, n = prompts[i // num_images_per_prompt], negatives[i // num_images_per_prompt]
        gen = torch.Generator(device="cpu").manual_seed(seeds[i])
        kwargs = dict(
            **_text_kwargs(run, p, n, int(clip_skip)),
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            generator=gen,
            num_images_per_prompt=1,
        )
        if mode == "txt2img":
            kwargs.update(width=w, height=h)
        elif mode == "img2img":
            kwargs.update(image=init, strength=float(strength))
        else:
            kwargs.update(image=init, mask_image=mask, strength=float(strength), width=w, height=h)
        image = run(**kwargs).images[0]
        record = GenerationRecord(
            prompt=p,
            negative_prompt=n,
            seed=seeds[i],
            steps=int(steps),
            guidance=float(guidance),
            scheduler=sched,
            width=w,
            height=h,
            base=info.record() if info else {"base": "unknown"},
            adapters=adapters,
            fused=fused,
            mode=mode,
            strength=float(strength) if init is not None else None,
            init_image=init_rec,
            mask_image=mask_rec,
            scheduler_config=sched_cfg,
            versions=versions,
            clip_skip=int(clip_skip),
        )
        out.append(GeneratedImage(image, record))
    return out


def sweep_scales(
    pipe, scales: Sequence[float], *, fuse: bool = False, **kwargs
) -> list[list[GeneratedImage]]:
    """Generate the same images at several LoRA strengths.

    Each sweep value multiplies every loaded adapter's own scale (1 = as loaded, 0 = base).

    Returns:
        one list of images per scale, in the order of ``scales``.
    """
    from loracraft.infer import adapters as A

    loaded = A.loaded_adapters(pipe)
    if not loaded:
        raise UsageError("a scale sweep needs an adapter, --scale-sweep, pass --lora PATH")
    was_fused = A.is_fused(pipe)
    A.unfuse(pipe)
    original = {a.name: a.scale for a in loaded}
    seed = kwargs.pop("seed", None)
    prompts = kwargs.get("prompt")
    n_prompts = 1 if isinstance(prompts, str) else len(prompts or [])
    seeds = _seeds(seed, n_prompts * int(kwargs.get("num_images_per_prompt", 1)))
    rows: list[list[GeneratedImage]] = []
    try:
        for s in scales:
            A.set_scales(pipe, {n: v * float(s) for n, v in original.items()})
            if fuse:
                A.fuse(pipe)
            try:
                rows.append(generate(pipe, seed=seeds, **kwargs))
            finally:
                A.unfuse(pipe)
    finally:
        A.set_scales(pipe, original)
        if was_fused:
            A.fuse(pipe)
    return rows


def _adapters_from_tags(rec: GenerationRecord, lora_dirs: Sequence[str | Path]) -> GenerationRecord:
    """An A1111 record's ``<lora:...>`` tags -> adapter entries (found in ``lora_dirs``)."""
    from loracraft.infer.formats import file_sha256
    from loracraft.infer.prompts import extract_lora_tags, find_lora

    prompt, tags = extract_lora_tags(rec.prompt)
    negative = extract_lora_tags(rec.negative_prompt)[0] if rec.negative_prompt else None
    adapters = []
    for tag in tags:
        path = find_lora(tag.name, lora_dirs)
        adapters.append(
            {"name": tag.name, "path": str(path), "scale": tag.unet, "sha256": file_sha256(path),
             "text_encoder_scale": None if tag.text_encoder == tag.unet else tag.text_encoder}
        )  # fmt: skip
    return GenerationRecord.from_dict(
        {**asdict(rec), "prompt": prompt, "negative_prompt": negative, "adapters": adapters}
    )


def regenerate(
    png: str | Path,
    *,
    base: str | Path | None = None,
    base_config: str | Path | None = None,
    allow_pickle: bool = False,
    lora_dirs: Sequence[str | Path] = (),
) -> GeneratedImage:
    """Rebuild the pipeline a loracraft (or A1111) PNG records and generate its image again.

    An A1111 PNG gives the prompt, sampler, steps, CFG scale, seed, size and clip skip; its
    base model must be passed (``base``) and its ``<lora:...>`` tags are found in ``lora_dirs``.
    The image is then made with the same settings, not A1111's pixels (its noise comes from
    another random generator).

    Args:
        png: a single image written by loracraft (not a grid).
        base: use this base location instead of the recorded one (e.g. the model moved).
        base_config: likewise for a single-file base's config folder.
        allow_pickle: permit pickle-based base/adapter files named by the record.
        lora_dirs: folders holding the adapters an A1111 prompt's ``<lora:...>`` tags name.

    Raises:
        UsageError: no record; AdapterError: a recorded adapter is missing or has changed.
    """
    from loracraft.infer import adapters as A
    from loracraft.infer.formats import file_sha256
    from loracraft.infer.models import load_base

    rec = read_record(png)
    if rec.source == "a1111":
        rec = _adapters_from_tags(rec, lora_dirs)
    b = dict(rec.base)
    if base is None and b.get("base") in (None, "unknown"):
        raise UsageError(f"PNG does not record its base model, {png}, pass --base")
    for a in rec.adapters:
        if not a.get("path"):
            raise AdapterError(
                f"adapter {a.get('name')!r} was attached outside loracraft, so the PNG does not name its file, "
                f"{png}, load adapters with loracraft (load_adapter / --lora) to make images regenerable"
            )
        p = Path(a["path"])
        if not p.is_file():
            raise AdapterError(f"adapter {a.get('name')!r} recorded in the PNG is missing, {p}, restore it")
        if a.get("sha256") and file_sha256(p) != a["sha256"]:
            raise AdapterError(
                f"adapter {a.get('name')!r} changed since the image was made (sha256 differs), {p}, "
                "restore the original file"
            )
    for what, img, mode in (("init image", rec.init_image, "RGB"), ("mask image", rec.mask_image, "L")):
        if img is None:
            continue
        if not img.get("path"):
            raise UsageError(
                f"the {what} was passed in memory, not as a file, {png}, it cannot be regenerated"
            )
        _, now = _load_image(img["path"], mode, what)
        if now["sha256"] != img.get("sha256"):
            raise UsageError(
                f"the {what} changed since the image was made, {img['path']}, restore the original"
            )
    pipe = load_base(
        base if base is not None else b["base"],
        revision=b.get("revision"),
        variant=b.get("variant"),
        torch_dtype=b.get("dtype"),
        device=b.get("device") or "cpu",
        config=base_config if base_config is not None else b.get("config"),
        allow_pickle=allow_pickle,
    )
    for a in rec.adapters:
        A.load_adapter(
            pipe,
            a["path"],
            name=a["name"],
            scale=float(a["scale"]),
            allow_pickle=allow_pickle,
            activate=False,
            text_encoder_scale=a.get("text_encoder_scale"),
            blocks=a.get("blocks"),
        )
    if rec.adapters:
        A.set_scales(pipe)
        if rec.fused:
            A.fuse(pipe)
    set_scheduler(pipe, rec.scheduler, config=rec.scheduler_config or None)
    images = generate(
        pipe,
        rec.prompt,
        negative_prompt=rec.negative_prompt,
        seed=rec.seed,
        steps=rec.steps,
        guidance=rec.guidance,
        width=rec.width,
        height=rec.height,
        init_image=rec.init_image["path"] if rec.init_image else None,
        mask_image=rec.mask_image["path"] if rec.mask_image else None,
        strength=rec.strength if rec.strength is not None else 0.75,
        clip_skip=rec.clip_skip,
    )
    return images[0]
