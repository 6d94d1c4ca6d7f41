"""Evaluation figures on hand-made cases, where the right answer is known."""

import json
from pathlib import Path

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


# --- figures for any run: the trigger decides what can be computed --------------------------
def test_trigger_comes_from_the_flag_then_preserve_then_nothing():
    from loracraft.infer.errors import UsageError
    from loracraft.train.commands.evaluate import resolve_trigger

    cfg = {"preserve": {"trigger": "in mystyle style"}}
    assert resolve_trigger(cfg, None) == "in mystyle style"
    assert resolve_trigger(cfg, " sks ") == "sks"
    assert resolve_trigger({"preserve": None}, None) is None
    assert resolve_trigger({}, None) is None
    with pytest.raises(UsageError):
        resolve_trigger({}, "  ")


def test_prompt_pairs_add_and_strip_the_trigger():
    from loracraft.train.commands.evaluate import prompt_pairs, strip_trigger

    caps = ["a red circle in mystyle style", "a cat, in mystyle style", "a dog", "a dog in mystyle style"]
    trig, plain = prompt_pairs(caps, "in mystyle style", 8)
    assert plain == ["a cat", "a dog", "a red circle"]
    assert trig == ["a cat in mystyle style", "a dog in mystyle style", "a red circle in mystyle style"]
    assert strip_trigger("mystyle, a castle at night", "mystyle") == "a castle at night"
    assert prompt_pairs(caps, "in mystyle style", 2)[1] == ["a cat", "a dog"]


def test_toy_world_figures_apply_only_to_scene_captions_with_the_demo_trigger():
    from loracraft.train.commands.evaluate import TOY_TRIGGER, content_kept, is_toy_world

    scenes = ["a red circle on a blue background in lcstyle style", "a white square on a black background"]
    assert is_toy_world(scenes, TOY_TRIGGER)
    assert not is_toy_world(scenes, "in mystyle style")
    assert not is_toy_world(["a castle in lcstyle style"], TOY_TRIGGER)
    assert not is_toy_world([], TOY_TRIGGER)
    assert content_kept(0.72, 0.8) == pytest.approx(0.9)
    assert np.isnan(content_kept(0.5, 0.0))


@pytest.fixture()
def run_copy(cli_run, tmp_path):
    import shutil

    return Path(shutil.copytree(cli_run, tmp_path / "run"))


def test_eval_without_a_trigger_says_what_it_cannot_compute(run_copy, tiny_dataset):
    from loracraft.train.commands.evaluate import evaluate, format_eval

    r = evaluate(run_copy, heldout=tiny_dataset, n_prompts=2)
    assert r["trigger"] is None
    h = r["heldout_loss"]
    assert h["relative_reduction"] == pytest.approx((h["base"] - h["lora"]) / h["base"])
    assert "--trigger" in r["drift"]["not_computed"] and "not_computed" in r["toy_world"]
    text = format_eval(r)
    assert "drift without the trigger: not computed, no trigger" in text and "%" not in text.splitlines()[1]
    assert json.loads((run_copy / "eval.json").read_text())["drift"] == r["drift"]


def test_eval_with_a_trigger_computes_drift_from_that_trigger(run_copy, tiny_dataset, tiny_sd):
    from loracraft.infer.adapters import load_adapter, set_scales
    from loracraft.infer.generation import generate
    from loracraft.infer.models import load_base
    from loracraft.infer.names import run_adapter_file
    from loracraft.train.commands.evaluate import evaluate, mean_abs_px

    r = evaluate(run_copy, heldout=tiny_dataset, trigger="in mystyle style", n_prompts=2)
    assert all(p.endswith(" in mystyle style") for p in r["prompts"]) and len(r["prompts"]) == 2
    assert "toy world" in r["toy_world"]["not_computed"]
    # independently: base vs LoRA on the same prompts and seeds, with and without the trigger
    manifest = json.loads((run_copy / "run.json").read_text())
    v, res = manifest["config"]["validation"], manifest["config"]["data"]["resolution"]
    pipe = load_base(tiny_sd)
    adapter = load_adapter(pipe, run_adapter_file(run_copy))
    gen = dict(seed=0, steps=v["steps"], guidance=v["guidance"], width=res, height=res)
    plain = [p.replace(" in mystyle style", "") for p in r["prompts"]]
    images = {}
    for scale in (0.0, 1.0):
        set_scales(pipe, {adapter.name: scale})
        images[scale] = (generate(pipe, r["prompts"], **gen), generate(pipe, plain, **gen))
    assert r["drift"]["trigger_prompts_mean_abs_px"] == pytest.approx(mean_abs_px(images[0.0][0], images[1.0][0]))
    assert r["drift"]["plain_prompts_mean_abs_px"] == pytest.approx(mean_abs_px(images[0.0][1], images[1.0][1]))


def test_eval_refuses_a_run_json_that_is_not_loracrafts(run_copy):
    from loracraft.infer.errors import UsageError
    from loracraft.train.commands.evaluate import evaluate

    (run_copy / "run.json").write_text("[1, 2")
    with pytest.raises(UsageError, match="not JSON"):
        evaluate(run_copy)
    (run_copy / "run.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="no 'config'"):
        evaluate(run_copy)
