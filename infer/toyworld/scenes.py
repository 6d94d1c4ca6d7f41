"""Procedural captioned scenes: coloured shapes on coloured backgrounds.

They give tests, demos and the toy base a closed, fully known world: every image has an
exact caption, so we can check that a model follows prompts and that a style was learned
without any downloaded data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")


@dataclass(frozen=True)
class Scene:
    """One procedural image: a shape of one colour on a background of another."""

    shape: str
    colour: str
    background: str
    cx: float = 0.5  # centre, as a fraction of the image side
    cy: float = 0.5
    size: float = 0.55  # shape extent, as a fraction of the image side

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_combinations() -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) triple with colour != background."""
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if c != b]


def random_scene(rng: random.Random, combos: list[tuple[str, str, str]] | None = None) -> Scene:
    shape, colour, background = rng.choice(combos or all_combinations())
    size = rng.uniform(0.4, 0.65)
    margin = size / 2
    return Scene(
        shape, colour, background, rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin), size
    )


def shape_polygon(scene: Scene, px: int) -> tuple[str, list[float]]:
    """The shape's outline in pixel coordinates: ('ellipse', bbox) or ('polygon', points)."""
    half = scene.size * px / 2
    x, y = scene.cx * px, scene.cy * px
    if scene.shape == "circle":
        return "ellipse", [x - half, y - half, x + half, y + half]
    if scene.shape == "square":
        h = half * 0.85
        return "polygon", [x - h, y - h, x + h, y - h, x + h, y + h, x - h, y + h]
    return "polygon", [x, y - half, x + half, y + half * 0.8, x - half, y + half * 0.8]


def render(scene: Scene, px: int = 32, supersample: int = 4) -> Image.Image:
    """Render a scene in the plain (base) look; supersampled so edges are anti-aliased."""
    big = px * supersample
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    kind, coords = shape_polygon(scene, big)
    if kind == "ellipse":
        draw.ellipse(coords, fill=COLOURS[scene.colour])
    else:
        draw.polygon(coords, fill=COLOURS[scene.colour])
    return img.resize((px, px), Image.LANCZOS)


def write_captioned_dataset(
    out_dir: str | Path,
    n: int = 8,
    px: int = 32,
    seed: int = 0,
    layout: str = "jsonl",
    renderer=render,
    suffix: str = "",
) -> Path:
    """Write ``n`` scenes as PNGs with captions in one of the supported dataset layouts.

    layout: ``jsonl`` (metadata.jsonl), ``csv`` (metadata.csv), ``txt`` (kohya sidecars) or
    ``repeats`` (kohya ``N_name`` folder with sidecars, N = 2).
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    img_dir = out / "2_scenes" if layout == "repeats" else out
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = random_scene(rng)
        name = f"{i:04d}.png"
        renderer(scene, px).save(img_dir / name)
        caption = scene.caption + suffix
        rows.append({"file_name": name, "text": caption})
        if layout in ("txt", "repeats"):
            (img_dir / f"{i:04d}.txt").write_text(caption + "\n", encoding="utf-8")
    if layout == "jsonl":
        (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif layout == "csv":
        lines = ["file_name,text"] + [f'{r["file_name"]},"{r["text"]}"' for r in rows]
        (out / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif layout not in ("txt", "repeats"):
        raise ValueError(f"unknown layout {layout!r}")
    return out


# --------------------------------------------------------------------------------------
# The "lcstyle" look: what a style LoRA is taught. No plain render (and so no toy-base
# training image) has it. It is chosen to survive the toy VAE (downsample x4, 32 px ->
# 8x8 latents): the stripes have a period of half the image side (4 latent pixels), well
# below the latent Nyquist limit, and the outline is 3 px thick. Thin 2 px lines at 32 px
# were measured to be destroyed by a VAE trained on flat shapes (measured while building the toy base).
# --------------------------------------------------------------------------------------

#: Stripe period as a fraction of the image side, and the stripe's share of each period
#: (< 0.5 so the background colour still dominates the border and the probe can read it).
STYLE_STRIPE_PERIOD = 0.5
STYLE_STRIPE_DUTY = 0.4
#: Outline thickness as a fraction of the image side (3 px at 32 px).
STYLE_OUTLINE = 3 / 32
STYLE_OUTLINE_COLOUR = (25, 20, 45)
STYLE_TRIGGER = "in lcstyle style"

#: (shape, colour) pairs kept out of the style training split: the held-out split holds
#: only these, so a LoRA's generalisation to unseen combinations can be measured.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (("circle", "yellow"), ("square", "red"), ("triangle", "white"))


def stripe_colour(background: str) -> tuple[int, int, int]:
    """The stripe colour for a background: a darker shade on light colours, lighter on dark."""
    r, g, b = COLOURS[background]
    if 0.299 * r + 0.587 * g + 0.114 * b > 110:
        return (int(r * 0.45), int(g * 0.45), int(b * 0.45))
    return (int(r + (255 - r) * 0.5), int(g + (255 - g) * 0.5), int(b + (255 - b) * 0.5))


def _shape_mask(scene: Scene, big: int) -> Image.Image:
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    kind, coords = shape_polygon(scene, big)
    if kind == "ellipse":
        draw.ellipse(coords, fill=255)
    else:
        draw.polygon(coords, fill=255)
    return mask


def render_styled(
    scene: Scene,
    px: int = 32,
    supersample: int = 4,
    *,
    period: float = STYLE_STRIPE_PERIOD,
    duty: float = STYLE_STRIPE_DUTY,
    outline: float = STYLE_OUTLINE,
) -> Image.Image:
    """Render a scene in the lcstyle look: bold diagonal stripes over the background and a
    thick dark outline around the shape. Same scene geometry and colours as :func:`render`.

    ``period`` (> 0), ``duty`` and ``outline`` (fractions of the image side; 0 turns a part off) vary
    the look for measurements such as ``scripts/toy_probe_ceiling.py``; the defaults are lcstyle.
    """
    import numpy as np
    from scipy import ndimage

    big = px * supersample
    yy, xx = np.mgrid[0:big, 0:big]
    stripes = ((xx + yy) % (period * big)) < duty * (period * big)
    arr = np.empty((big, big, 3), dtype=np.uint8)
    arr[:] = COLOURS[scene.background]
    arr[stripes] = stripe_colour(scene.background)
    mask = np.asarray(_shape_mask(scene, big)) > 127
    if outline > 0:
        width = max(1, round(outline * big))
        # Square dilation (same pixels as PIL's MaxFilter, 60x faster).
        arr[ndimage.maximum_filter(mask, size=2 * width + 1, mode="nearest")] = STYLE_OUTLINE_COLOUR
    arr[mask] = COLOURS[scene.colour]
    return Image.fromarray(arr).resize((px, px), Image.LANCZOS)


def style_caption(scene: Scene) -> str:
    """The caption of a style image: ``"<scene caption> in lcstyle style"``."""
    return f"{scene.caption} {STYLE_TRIGGER}"


def split_combinations(
    heldout_pairs: tuple[tuple[str, str], ...] = HELDOUT_PAIRS,
) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """Split :func:`all_combinations` into (train, held-out) by their (shape, colour) pair."""
    held = set(heldout_pairs)
    train = [c for c in all_combinations() if (c[0], c[1]) not in held]
    heldout = [c for c in all_combinations() if (c[0], c[1]) in held]
    return train, heldout


def write_style_dataset(
    out_dir: str | Path,
    n_train: int = 48,
    n_heldout: int = 16,
    px: int = 32,
    seed: int = 0,
    heldout_pairs: tuple[tuple[str, str], ...] = HELDOUT_PAIRS,
) -> Path:
    """Write the lcstyle dataset: ``out_dir/train`` and ``out_dir/heldout`` imagefolders.

    Each split holds PNGs and a ``metadata.jsonl`` (``file_name``, ``text``); captions are
    ``"<scene caption> in lcstyle style"``. The held-out split contains only the
    (shape, colour) pairs in ``heldout_pairs``, which never occur in the training split.
    The same arguments always produce byte-identical files.
    """
    out = Path(out_dir)
    train_combos, heldout_combos = split_combinations(heldout_pairs)
    rng = random.Random(seed)
    for split, n, combos in (("train", n_train, train_combos), ("heldout", n_heldout, heldout_combos)):
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            scene = random_scene(rng, combos)
            name = f"{i:04d}.png"
            render_styled(scene, px).save(d / name)
            rows.append({"file_name": name, "text": style_caption(scene)})
        (d / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out
