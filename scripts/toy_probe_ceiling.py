"""How much of the toy world's content probe a look keeps through the toy base's VAE.

Every image a pipeline makes is decoded by the VAE, so an adapter that drew the style set
exactly would still be read through it. This script renders the same random scenes plain and
in the lcstyle look, encodes and decodes both with the toy base's VAE, and prints the probe's
accuracy on each and their ratio: an estimate of the best "content kept" (``loracraft eval``)
an adapter can reach with that look, before any training. ``--look`` varies the look's geometry.

    python scripts/toy_probe_ceiling.py [--scenes 300] [--look PERIOD,DUTY,OUTLINE_PX ...]
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch
from toy_base import to_tensor, to_uint8, vae_round_trip  # scripts/, beside this file

import loracraft.infer.toyworld.scenes as scenes
from loracraft.infer.toyworld import toy_base_path
from loracraft.infer.toyworld.probe import probe_accuracy
from loracraft.infer.toyworld.style_score import mean_style_score


def through_vae(vae, images, batch: int = 64) -> list[np.ndarray]:
    """The images after the toy VAE's round trip, as uint8 HWC arrays."""
    out = []
    for i in range(0, len(images), batch):
        rec = to_uint8(vae_round_trip(vae, to_tensor(images[i : i + batch])))
        out += list(rec.permute(0, 2, 3, 1).numpy())
    return out


def look(spec: str) -> tuple[float, float, float]:
    """``PERIOD,DUTY,OUTLINE_PX`` -> floats (argparse reports a malformed one as an invalid --look)."""
    period, duty, outline_px = (float(v) for v in spec.split(","))
    if period <= 0 or not 0 <= duty <= 1 or outline_px < 0:
        raise ValueError(spec)
    return period, duty, outline_px


def scene_count(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 10_000:
        raise ValueError(text)
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=scene_count, default=300, help="random scenes to render (1-10000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--look", type=look, nargs="*", default=[],
                   help="extra looks to measure: stripe period and duty (fractions), outline in px at 32 px")
    a = p.parse_args()
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(toy_base_path() / "vae"), torch_dtype=torch.float32)
    rng = random.Random(a.seed)
    drawn = [scenes.random_scene(rng) for _ in range(a.scenes)]
    captions = [s.caption for s in drawn]
    plain = probe_accuracy(through_vae(vae, [scenes.render(s) for s in drawn]), captions)
    print(f"{a.scenes} scenes through the toy VAE; probe full (shape) accuracy")
    print(f"plain look:  {plain['full']:.3f} ({plain['shape']:.3f})")
    default = (scenes.STYLE_STRIPE_PERIOD, scenes.STYLE_STRIPE_DUTY, scenes.STYLE_OUTLINE * 32)
    for period, duty, outline_px in [default, *a.look]:
        styled = [scenes.render_styled(s, period=period, duty=duty, outline=outline_px / 32) for s in drawn]
        decoded = through_vae(vae, styled)
        acc = probe_accuracy(decoded, captions)
        name = "lcstyle:" if (period, duty, outline_px) == default else f"{period:g},{duty:g},{outline_px:g} px:"
        print(f"{name:<12} {acc['full']:.3f} ({acc['shape']:.3f}) = {acc['full'] / plain['full'] if plain['full'] else float('nan'):.2f}x the plain "
              f"look; style score {mean_style_score(decoded):.2f}")


if __name__ == "__main__":
    main()
