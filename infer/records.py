"""What a generated PNG carries, and reading it back: loracraft's JSON record and A1111's text.

* A PNG holds two text chunks: ``parameters`` in AUTOMATIC1111's layout (shown by common viewers
  and image sites, with ``<lora:name:w>`` tags and the ``Sampler:`` name A1111 uses) and
  ``loracraft``, a JSON :class:`GenerationRecord` with everything that determines the image.
* :func:`read_record` accepts both. A record is untrusted input: each field is checked for type
  and bounds (size <= :data:`MAX_SIDE` px, steps <= :data:`MAX_STEPS`, a real device) before
  anything is loaded, and every problem is a one-line :class:`UsageError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from loracraft.infer.errors import UsageError
from loracraft.infer.io import atomic_path

__all__ = [
    "GenerationRecord",
    "GeneratedImage",
    "MAX_SIDE",
    "MAX_STEPS",
    "make_grid",
    "save_png",
    "save_grid",
    "read_record",
]

#: Largest accepted image side: 8192 px already needs ~4 GB of latents-side activations on SDXL;
#: a hostile record asking for 200000 px would try to allocate ~160 GB.
MAX_SIDE = 8192
#: Most denoising steps accepted (schedulers are trained on 1000 timesteps).
MAX_STEPS = 1000
PNG_PARAMETERS_KEY = "parameters"  # A1111 convention
PNG_RECORD_KEY = "loracraft"
RECORD_VERSION = 1


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


def _sampler_label(name: str, config: dict) -> str:
    """What A1111 would call the recorded scheduler (its ``Sampler:`` field), else our name."""
    from loracraft.infer.schedulers import a1111_name, resolve_scheduler

    try:
        cls = resolve_scheduler(name)[1]
    except UsageError:
        cls = name
    return a1111_name(cls, config or {}) or name


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
