"""Evaluation figures on hand-made cases, where the right answer is known."""

import numpy as np
import pytest
from PIL import Image

from loracraft.infer.toyworld.scenes import Scene, render, render_styled
from loracraft.infer.toyworld.style_score import mean_style_score
from loracraft.train.commands.evaluate import drift_figures, mean_abs_px, style_progress


def _img(v):
    return Image.fromarray(np.full((8, 8, 3), v, dtype=np.uint8))


def test_identical_images_have_zero_drift():
    a = [_img(10), _img(200)]
    d = drift_figures(a, [_img(20), _img(220)], a, a)
    assert d["plain_prompts_mean_abs_px"] == 0 and d["ratio"] == 0
    assert d["trigger_prompts_mean_abs_px"] == pytest.approx(15.0)


def test_drift_ratio_by_hand():
    d = drift_figures([_img(0)], [_img(100)], [_img(0)], [_img(5)])
    assert d["ratio"] == pytest.approx(0.05)
    assert mean_abs_px([_img(3)], [_img(7)]) == 4


def test_style_progress_by_hand():
    assert style_progress(0.1, 0.1, 0.9) == 0
    assert style_progress(0.1, 0.9, 0.9) == 1
    assert style_progress(0.0, 0.4, 0.8) == pytest.approx(0.5)


def test_style_set_scores_one_and_plain_scores_zero():
    scenes = [Scene("circle", "red", "blue", 0.4, 0.5), Scene("square", "yellow", "black", 0.6, 0.4, 0.5)]
    assert mean_style_score(render_styled(s) for s in scenes) > 0.95
    assert mean_style_score(render(s) for s in scenes) < 0.05
