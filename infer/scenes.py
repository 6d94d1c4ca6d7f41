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
