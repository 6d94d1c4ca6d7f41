"""The lcstyle renderer, the style dataset, the style score and the colour/shape probe."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
from PIL import Image

from loracraft.infer.toyworld.probe import (
    ProbeResult,
    parse_caption,
    probe_accuracy,
    probe_image,
    probe_prompts,
)
from loracraft.infer.toyworld.scenes import (
    HELDOUT_PAIRS,
    STYLE_TRIGGER,
    random_scene,
    render,
    render_styled,
    split_combinations,
    write_style_dataset,
)
from loracraft.infer.toyworld.style_score import mean_style_score, style_score, style_statistic


def _scenes(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [random_scene(rng) for _ in range(n)]


@pytest.fixture(scope="module")
def scenes():
    return _scenes(80, seed=7)


@pytest.fixture(scope="module")
def plain(scenes):
    return [render(s) for s in scenes]


@pytest.fixture(scope="module")
def styled(scenes):
    return [render_styled(s) for s in scenes]


def _brightness(img: Image.Image, delta: int) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + delta, 0, 255).astype(np.uint8))


def _shift(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """Translate by (dx, dy) pixels, filling the uncovered border by edge replication."""
    a = np.asarray(img)
    h, w = a.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return Image.fromarray(a[ys][:, xs])


# ------------------------------------------------------------------------ renderer


def test_styled_keeps_size_and_differs_from_plain(scenes, plain, styled):
    assert styled[0].size == plain[0].size == (32, 32)
    assert render_styled(scenes[0], 64).size == (64, 64)
    diff = [
        np.abs(np.asarray(p, float) - np.asarray(s, float)).mean() for p, s in zip(plain, styled, strict=True)
    ]
    assert min(diff) > 10  # every styled image visibly differs from its plain twin


def test_styled_render_is_deterministic(scenes):
    assert render_styled(scenes[3]).tobytes() == render_styled(scenes[3]).tobytes()


def test_look_without_stripes_and_outline_is_the_plain_render(scenes):
    """duty 0 and outline 0 switch both parts of the look off: what is left is the plain scene."""
    for s in scenes[:10]:
        assert render_styled(s, duty=0.0, outline=0.0).tobytes() == render(s).tobytes()
        outlined = np.asarray(render_styled(s, duty=0.0), float)
        if s.background != "black":  # the dark outline is nearly black
            assert np.abs(outlined - np.asarray(render(s), float)).max() > 100  # the outline alone shows


# ------------------------------------------------------------------------- dataset


def test_split_has_no_shared_shape_colour_pairs():
    train, heldout = split_combinations()
    train_pairs = {(s, c) for s, c, _ in train}
    held_pairs = {(s, c) for s, c, _ in heldout}
    assert held_pairs == set(HELDOUT_PAIRS)
    assert not train_pairs & held_pairs
    assert len(train) + len(heldout) == 90


def test_write_style_dataset(tmp_path):
    out = write_style_dataset(tmp_path / "style", n_train=24, n_heldout=8, seed=3)
    pairs = {}
    for split, n in (("train", 24), ("heldout", 8)):
        rows = [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]
        assert len(rows) == n
        pairs[split] = set()
        for row in rows:
            assert (out / split / row["file_name"]).is_file()
            assert row["text"].endswith(" " + STYLE_TRIGGER)
            shape, colour, _ = parse_caption(row["text"])
            pairs[split].add((shape, colour))
        with Image.open(out / split / rows[0]["file_name"]) as im:
            assert im.size == (32, 32)
            assert style_score(im) > 0.9
    assert pairs["heldout"] <= set(HELDOUT_PAIRS)
    assert not pairs["train"] & pairs["heldout"]
    again = write_style_dataset(tmp_path / "again", n_train=24, n_heldout=8, seed=3)
    assert (again / "train" / "metadata.jsonl").read_bytes() == (
        out / "train" / "metadata.jsonl"
    ).read_bytes()
    assert (again / "train" / "0005.png").read_bytes() == (out / "train" / "0005.png").read_bytes()


# --------------------------------------------------------------------- style score


def test_style_score_separates_style_from_plain(plain, styled):
    s_style = np.array([style_score(im) for im in styled])
    s_plain = np.array([style_score(im) for im in plain])
    assert s_style.mean() > 0.95 and np.quantile(s_style, 0.05) > 0.8
    assert s_plain.mean() < 0.05 and s_plain.max() < 0.2
    assert mean_style_score(styled) == pytest.approx(s_style.mean())


@pytest.mark.parametrize("delta", [-40, 40])
def test_style_score_ignores_brightness(plain, styled, delta):
    for imgs in (plain[:40], styled[:40]):
        before = np.array([style_score(im) for im in imgs])
        after = np.array([style_score(_brightness(im, delta)) for im in imgs])
        assert np.abs(before - after).mean() < 0.03


@pytest.mark.parametrize("dx,dy", [(3, 0), (0, -4), (5, 5)])
def test_style_score_ignores_position(plain, styled, dx, dy):
    for imgs in (plain[:40], styled[:40]):
        before = np.array([style_score(im) for im in imgs])
        rolled = np.array([style_score(np.roll(np.asarray(im), (dy, dx), axis=(0, 1))) for im in imgs])
        shifted = np.array([style_score(_shift(im, dx, dy)) for im in imgs])
        assert np.abs(before - rolled).mean() < 0.05
        assert np.abs(before - shifted).mean() < 0.05
        assert np.abs(before - shifted).max() < 0.5  # no image flips class


def test_style_score_ignores_where_the_shape_is(scenes):
    rng = random.Random(1)
    for s in scenes[:30]:
        moved = dataclasses.replace(
            s, cx=rng.uniform(s.size / 2, 1 - s.size / 2), cy=rng.uniform(s.size / 2, 1 - s.size / 2)
        )
        assert style_score(render(moved)) < 0.1
        assert style_score(render_styled(moved)) > 0.8


def test_style_score_accepts_arrays_and_sizes(styled):
    img = styled[0]
    arr = np.asarray(img)
    assert style_score(arr) == pytest.approx(style_score(img))
    assert style_score(arr.transpose(2, 0, 1) / 255.0) == pytest.approx(style_score(img), abs=1e-5)
    assert style_score(img.resize((64, 64), Image.NEAREST)) > 0.9
    assert style_score(Image.new("RGB", (32, 32), (200, 30, 30))) < 0.05
    assert 0.0 < style_statistic(img) <= 1.0


# --------------------------------------------------------------------------- probe


def test_probe_reads_plain_renders(scenes, plain):
    acc = probe_accuracy(plain, [s.caption for s in scenes])
    assert acc["full"] >= 0.99 and acc["n"] == len(scenes)
    r = probe_image(plain[0])
    assert r == ProbeResult(scenes[0].shape, scenes[0].colour, scenes[0].background)


def test_probe_reads_styled_renders(scenes, styled):
    # Content must stay readable under the style, so a style LoRA's content drift is measurable.
    assert probe_accuracy(styled, [s.caption for s in scenes])["full"] >= 0.99


def test_probe_every_combination_centred():
    from loracraft.infer.toyworld.scenes import Scene, all_combinations

    scenes = [Scene(s, c, b) for s, c, b in all_combinations()]
    acc = probe_accuracy([render(s) for s in scenes], [(s.shape, s.colour, s.background) for s in scenes])
    assert acc["full"] == 1.0


def test_probe_flat_image_and_bad_caption():
    r = probe_image(Image.new("RGB", (32, 32), (40, 70, 220)))
    assert r == ProbeResult(None, None, "blue")
    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError):
        probe_accuracy([Image.new("RGB", (32, 32))], [])


def test_probe_prompts():
    prompts = probe_prompts()
    assert len(prompts) == 90 and len(set(prompts)) == 90
    assert probe_prompts(100)[90] == prompts[0]
    assert probe_prompts(2, suffix=" " + STYLE_TRIGGER)[0].endswith(STYLE_TRIGGER)
    assert parse_caption(probe_prompts(2, suffix=" in lcstyle style")[1]) == parse_caption(prompts[1])
