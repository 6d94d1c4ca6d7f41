"""A deterministic colour/shape probe: does an image show what its caption says?

Reads a 32 px (or any size) image of the procedural-scene world (:mod:`loracraft.infer.toyworld.scenes`)
back into (shape, colour, background) with plain pixel statistics - no learned model - so
that "the base follows its prompts" and "a LoRA kept the content" are numbers, not opinions:

- background: the palette colour most of the border pixels are closest to;
- shape colour: the most frequent palette colour among the clearly non-background pixels;
- shape: the largest connected blob closer to the shape colour than to the background is
  compared (IoU) with a circle, a square and a triangle drawn into the blob's bounding box.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from loracraft.infer.toyworld.scenes import COLOURS, SHAPES, STYLE_OUTLINE_COLOUR, stripe_colour

__all__ = ["ProbeResult", "parse_caption", "probe_image", "probe_accuracy", "probe_pipeline", "probe_prompts"]

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _NAMES], dtype=np.float32)
#: Colours of the lcstyle look (outline, stripes) that are never a scene colour: a pixel
#: nearest to one of them does not vote, so the probe also reads styled images.
_DISTRACTORS = np.array([STYLE_OUTLINE_COLOUR] + [stripe_colour(c) for c in _NAMES], dtype=np.float32)
#: A pixel farther than this (RGB euclidean, 0-255) from every palette colour is an edge,
#: stripe or outline pixel and does not vote for the shape colour.
_MAX_COLOUR_DIST = 80.0
_CAPTION = re.compile(r"\ba (\w+) (\w+) on a (\w+) background\b")


@dataclass(frozen=True)
class ProbeResult:
    """What the probe read from an image; ``None`` where nothing could be read."""

    shape: str | None
    colour: str | None
    background: str | None

    def matches(self, expected: tuple[str, str, str]) -> tuple[bool, bool, bool]:
        """(shape ok, colour ok, background ok) against an expected (shape, colour, background)."""
        return (self.shape == expected[0], self.colour == expected[1], self.background == expected[2])


def parse_caption(caption: str) -> tuple[str, str, str]:
    """``"a red circle on a blue background[ ...]"`` -> ``("circle", "red", "blue")``."""
    m = _CAPTION.search(caption)
    if m is None or m.group(2) not in SHAPES or m.group(1) not in COLOURS or m.group(3) not in COLOURS:
        raise ValueError(f"not a scene caption: {caption!r}")
    return m.group(2), m.group(1), m.group(3)


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:  # CHW -> HWC
        arr = arr.transpose(1, 2, 0)
    if arr.max() <= 1.0 + 1e-6:  # floats in [0, 1]
        arr = arr * 255.0
    return arr


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _template(shape: str, box: tuple[int, int, int, int], h: int, w: int, ss: int = 4) -> np.ndarray:
    """A shape filling the pixel bounding box (x0, y0, x1, y1 inclusive), anti-aliased, in [0, 1]."""
    x0, y0, x1, y1 = (v * ss for v in box)
    x1, y1 = x1 + ss, y1 + ss
    img = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(img)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=255)
    return np.asarray(img.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def probe_image(image) -> ProbeResult:
    """Read (shape, colour, background) from an image (PIL, HWC/CHW array, uint8 or [0, 1])."""
    arr = _to_array(image)
    h, w = arr.shape[:2]
    dist = np.linalg.norm(arr[:, :, None, :] - _PALETTE[None, None], axis=-1)  # H, W, 6
    nearest = dist.argmin(-1)
    d_distractor = np.linalg.norm(arr[:, :, None, :] - _DISTRACTORS[None, None], axis=-1).min(-1)
    real = dist.min(-1) <= d_distractor
    ring = np.zeros_like(real)
    ring[[0, -1], :] = ring[:, [0, -1]] = True
    border = nearest[ring & real] if (ring & real).any() else nearest[ring]
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    votes = nearest[(nearest != bg) & real & (dist.min(-1) < _MAX_COLOUR_DIST)]
    from scipy import ndimage

    if votes.size == 0:
        return ProbeResult(None, None, _NAMES[bg])
    fg = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    # The blob of pixels nearest to the shape colour (not to a style colour), grown by the
    # anti-aliased rim (an edge pixel between two scene colours can look like a stripe).
    core = _largest_component(dist[:, :, fg] < np.minimum(dist[:, :, bg], d_distractor))
    mask = ndimage.binary_dilation(core) & (dist[:, :, fg] < dist[:, :, bg])
    # Soft occupancy: 1 at the shape colour, 0 at the background, linear in between.
    d_fg, d_bg = dist[:, :, fg], dist[:, :, bg]
    soft = np.clip(d_bg / (d_fg + d_bg + 1e-6), 0, 1) * mask
    soft = np.clip((soft - 0.5) * 2 + 0.5, 0, 1) * mask
    # Anti-aliased edges make the bounding box uncertain by a pixel: try the box of every
    # pixel leaning to the shape colour and the box of the mostly covered pixels.
    boxes = set()
    for m in (mask, soft > 0.75):
        ys, xs = np.nonzero(m if m.any() else mask)
        boxes.add((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())))

    def iou(shape: str) -> float:
        best = 0.0
        for box in boxes:
            t = _template(shape, box, h, w)
            best = max(best, float(np.minimum(t, soft).sum() / (np.maximum(t, soft).sum() + 1e-6)))
        return best

    shape = max(SHAPES, key=iou)
    return ProbeResult(shape, _NAMES[fg], _NAMES[bg])


def probe_accuracy(images: Sequence, expected: Sequence) -> dict[str, float]:
    """Accuracy of :func:`probe_image` against captions or (shape, colour, background) triples.

    Returns the fractions ``shape``, ``colour``, ``background`` and ``full`` (all three right).
    """
    if len(images) != len(expected):
        raise ValueError(f"{len(images)} images but {len(expected)} expected labels")
    hits = np.zeros((len(images), 3), dtype=bool)
    for i, (img, exp) in enumerate(zip(images, expected, strict=True)):
        triple = parse_caption(exp) if isinstance(exp, str) else tuple(exp)
        hits[i] = probe_image(img).matches(triple)
    n = max(len(images), 1)
    return {
        "shape": float(hits[:, 0].sum() / n),
        "colour": float(hits[:, 1].sum() / n),
        "background": float(hits[:, 2].sum() / n),
        "full": float(hits.all(1).sum() / n),
        "n": len(images),
    }


def probe_prompts(n: int | None = None, suffix: str = "") -> list[str]:
    """The probe's prompt list: every scene caption (90) in a fixed order, cycled to ``n``."""
    from loracraft.infer.toyworld.scenes import all_combinations

    caps = [f"a {c} {s} on a {b} background{suffix}" for s, c, b in all_combinations()]
    n = len(caps) if n is None else n
    return [caps[i % len(caps)] for i in range(n)]


def probe_pipeline(
    pipe,
    prompts: Sequence[str] | None = None,
    seed: int = 0,
    guidance: float = 4.0,
    steps: int = 25,
    batch_size: int = 30,
    px: int | None = None,
) -> tuple[dict[str, float], list[Image.Image]]:
    """Generate one image per prompt (prompt i uses seed ``seed + i``) and probe them.

    Returns (accuracy dict as :func:`probe_accuracy`, images). Deterministic for a given
    pipeline, seed and settings.
    """
    import torch

    prompts = list(prompts) if prompts is not None else probe_prompts()
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        kwargs = {} if px is None else {"height": px, "width": px}
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, **kwargs).images
        images.extend(out)
    return probe_accuracy(images, prompts), images
