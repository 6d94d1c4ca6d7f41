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
from pathlib import Path

import torch
from PIL import Image

from loracraft.infer.errors import AdapterError, UsageError
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

from loracraft.infer.records import (  # noqa: E402  (re-exported: records live in their own module)
    MAX_SIDE,
    MAX_STEPS,
    GeneratedImage,
    GenerationRecord,
    _adapters_from_tags,
    make_grid,
    read_record,
    save_grid,
    save_png,
)

#: Short names accepted by ``--scheduler`` -> diffusers classes (A1111 sampler names work too).
from loracraft.infer.schedulers import SCHEDULERS  # noqa: E402  (light module: the CLI parser reads it)

_SCHED_ATTR = "_loracraft_scheduler_config"
_SCHED_NAME = "_loracraft_scheduler_name"


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


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
        pipe.scheduler = _unclipped(cls.from_config(base_cfg, **overrides))
    setattr(pipe, _SCHED_NAME, (short, cls_name))
    return short


def _unclipped(scheduler):
    """The scheduler with ``clip_sample`` off, as diffusers' Stable Diffusion pipelines set it when
    they are built: a base config that does not name it (the toy base's PNDM config) would otherwise
    give DDIM its class default, clipping each predicted latent to [-1, 1], which breaks latent images.
    Swapping ``pipe.scheduler`` after the pipeline was built skips diffusers' own rewrite."""
    if getattr(scheduler.config, "clip_sample", False) is True:
        return type(scheduler).from_config(scheduler.config, clip_sample=False)
    return scheduler


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

    Each sweep value multiplies every loaded adapter's own weights, UNet and text encoder
    alike (1 = as loaded, 0 = base).

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
    original_te = {a.name: a.text_encoder_scale for a in loaded}
    seed = kwargs.pop("seed", None)
    prompts = kwargs.get("prompt")
    n_prompts = 1 if isinstance(prompts, str) else len(prompts or [])
    seeds = _seeds(seed, n_prompts * int(kwargs.get("num_images_per_prompt", 1)))
    rows: list[list[GeneratedImage]] = []
    try:
        for s in scales:
            for a in loaded:
                te = original_te[a.name]
                a.text_encoder_scale = None if te is None else te * float(s)
            A.set_scales(pipe, {n: v * float(s) for n, v in original.items()})
            if fuse:
                A.fuse(pipe)
            try:
                rows.append(generate(pipe, seed=seeds, **kwargs))
            finally:
                A.unfuse(pipe)
    finally:
        for a in loaded:
            a.text_encoder_scale = original_te[a.name]
        A.set_scales(pipe, original)
        if was_fused:
            A.fuse(pipe)
    return rows


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
