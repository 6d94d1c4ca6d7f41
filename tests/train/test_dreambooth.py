"""DreamBooth with prior preservation: the loss formula, class-image generation (resumable,
identical), paired batches, exact resume, and config errors."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from loracraft.infer.errors import ConfigError
from loracraft.train.config import build_config
from loracraft.train.dreambooth import caption_rule, class_position, generate_class_images
from loracraft.train.loss import diffusion_loss, prior_preservation_loss

INSTANCE, CLASS = "a photo of sks circle", "a photo of a circle"


def _bare_images(folder: Path, n: int, seed: int) -> Path:
    """Images without any caption (what DreamBooth users have)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    return _bare_images(tmp_path_factory.mktemp("db") / "instance", 3, seed=1)


def _db(**extra):
    over = {
        "dreambooth.instance_prompt": INSTANCE, "dreambooth.class_prompt": CLASS, "dreambooth.num_class_images": 3,
        "dreambooth.class_generation.steps": 2, "dreambooth.prior_loss_weight": 0.5, "data.center_crop": "true",
    }
    return {**over, **extra}


# ----------------------------------------------------------------------------- the formula
def test_prior_preservation_loss_equals_the_hand_computed_formula():
    pred = torch.zeros(4, 1, 1, 2)
    # per-sample MSE: instance 1 and 9, class 4 and 16
    target = torch.tensor([1.0, 3.0, 2.0, 4.0]).view(4, 1, 1, 1).expand(4, 1, 1, 2)
    # (1 + 9)/2 + 0.5 * (4 + 16)/2 = 5 + 5
    assert prior_preservation_loss(pred, target, 2, 0.5).item() == pytest.approx(10.0)
    # min-SNR weights per sample: (1*1 + 9*0.5)/2 + 0.5 * (4*2 + 16*0)/2 = 2.75 + 2
    w = torch.tensor([1.0, 0.5, 2.0, 0.0])
    assert prior_preservation_loss(pred, target, 2, 0.5, w).item() == pytest.approx(4.75)
    # uneven halves average separately: 1 + 2 * (9 + 4)/2
    assert prior_preservation_loss(pred[:3], target[:3], 1, 2.0).item() == pytest.approx(14.0)
    # diffusers train_dreambooth_lora.py: chunk in two, mean MSE of each, instance + weight * prior
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    p, pp = torch.chunk(pred, 2)
    t, tp = torch.chunk(target, 2)
    reference = F.mse_loss(p, t) + 0.7 * F.mse_loss(pp, tp)
    torch.testing.assert_close(prior_preservation_loss(pred, target, 2, 0.7), reference)
    with pytest.raises(ValueError, match="n_instance"):
        prior_preservation_loss(pred, target, 0, 1.0)


def test_captions_and_class_positions():
    cfg = build_config({"model": {"base": "x"}, "data": {"path": "y"}}, ["dreambooth.instance_prompt=sks dog",
                                                                      "dreambooth.prior_preservation=false"])
    assert caption_rule(cfg.dreambooth)("a dog on grass") == "sks dog"
    cfg.dreambooth.captions = "prepend"
    rule = caption_rule(cfg.dreambooth)
    assert (rule("on grass"), rule(None), rule("  ")) == ("sks dog, on grass", "sks dog", "sks dog")
    assert [class_position(p) for p in (0, 1, 7)] == [-1, -2, -8]


# ----------------------------------------------------------------------------- config errors
def test_dreambooth_config_errors_name_the_key_and_the_fix(tiny_sd, tmp_path):
    from loracraft.train.trainer import LoraTrainer

    base = {"model": {"base": "x"}, "data": {"path": "y"}}
    cases = {
        ("dreambooth.instance_prompt=sks dog",): "dreambooth.prior_preservation=true needs dreambooth.class_prompt",
        ("dreambooth.class_prompt=a dog",): "required config key 'dreambooth.instance_prompt' is not set",
        ("dreambooth.instance_prompt=sks dog", "dreambooth.class_prompt=a dog", "data.buckets=true"): "set data.buckets=false",
        ("dreambooth.instance_prompt=sks dog", "dreambooth.prior_preservation=false", "dreambooth.class_data=z"):
            "dreambooth.class_data is set but dreambooth.prior_preservation=false",
        ("dreambooth.instance_prompt=sks dog", "dreambooth.class_prompt=a dog", "dreambooth.prior_loss_weight=0"):
            "bad value for 'dreambooth.prior_loss_weight'",
        ("dreambooth.instance_prompt=x", "dreambooth.class_prompt=y", "dreambooth.class_generation.step=2"):
            "did you mean 'dreambooth.class_generation.steps'",
    }
    for overrides, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            build_config(base, list(overrides))
        assert len(e.value.problems) == 1 and expected in e.value.problems[0], (overrides, e.value.problems)
        assert "\n" not in e.value.problems[0]
    from loracraft.train.config import config_help

    help_lines = config_help().splitlines()  # `loracraft train --help-config`
    assert any(line.startswith("dreambooth.class_generation.seed = 0  # ") for line in help_lines)
    assert any(line.startswith("dreambooth.instance_prompt = (required)") for line in help_lines)
    # file-system checks run before any weights load, together with the others
    data = _bare_images(tmp_path / "inst", 1, seed=0)
    cfg = build_config({"model": {"base": str(tiny_sd)}, "data": {"path": str(data)}},
                       [f"dreambooth.instance_prompt={INSTANCE}", f"dreambooth.class_prompt={CLASS}",
                        f"dreambooth.class_data={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"dreambooth.class_data folder not found, .*nope, point it at"):
        LoraTrainer(cfg)
    cfg.dreambooth.class_data = str(data)
    with pytest.raises(ConfigError, match="dreambooth.class_data and data.path overlap"):
        LoraTrainer(cfg)


# ----------------------------------------------------------------------------- class image generation
def test_interrupted_class_generation_resumes_to_the_identical_set(tiny_sd, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    G = importlib.import_module("loracraft.infer.generation")  # the module (the package attribute is the function)
    from loracraft.train.config import ClassGenerationCfg

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = ClassGenerationCfg(steps=2, guidance=3.0, seed=11)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert generate_class_images(pipe, whole, 3, CLASS, gen, 32, show_progress=False) == 3

    real_save, saved = G.save_png, []

    def killed_after_one(image, record, path):
        if saved:
            raise KeyboardInterrupt  # the process dies while generating image 1
        saved.append(path)
        return real_save(image, record, path)

    monkeypatch.setattr(G, "save_png", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(pipe, split, 3, CLASS, gen, 32, show_progress=False)
    assert sorted(p.name for p in split.iterdir()) == ["000000.png"]  # complete files only, no temp left
    monkeypatch.setattr(G, "save_png", real_save)
    assert generate_class_images(pipe, split, 3, CLASS, gen, 32, show_progress=False) == 2  # resumes at 1
    assert generate_class_images(pipe, split, 3, CLASS, gen, 32, show_progress=False) == 0
    pixels = [[np.asarray(Image.open(d / f"{k:06d}.png")) for k in range(3)] for d in (whole, split)]
    for a, b in zip(*pixels, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(pixels[0][0], pixels[0][1])  # seed + k: different images


# ----------------------------------------------------------------------------- training
def _halves(batch: dict, n: int) -> tuple[dict, dict]:
    def part(sl):
        return {k: (v[sl] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()}

    return part(slice(0, n)), part(slice(n, None))


def test_dreambooth_run_generates_class_images_trains_with_prior_loss_and_resumes_exactly(
    tiny_sd, instance_dir, tmp_path, make_trainer, monkeypatch, capsys
):
    monkeypatch.setenv("LORACRAFT_CACHE", str(tmp_path / "cache"))
    users = _bare_images(tmp_path / "class", 1, seed=9)
    before = sorted(p.name for p in users.iterdir())
    over = _db(**{"dreambooth.class_data": str(users), "train.max_steps": 4, "checkpoint.every": 2})
    a = make_trainer(tiny_sd, instance_dir, tmp_path / "a", **over)
    assert f"dreambooth: 3 class images (1 from {users}, 2 generated by the base: 2 now, 0 reused)" in capsys.readouterr().err
    # 1 user class image + 2 generated into the cache, never into the user's folder
    classes = a.dreambooth.class_images
    assert [it.path.parent for it in classes.items] == [users, *[Path(classes.root)] * 2]
    assert Path(classes.root).is_relative_to(tmp_path / "cache") and sorted(p.name for p in users.iterdir()) == before

    batch = next(a.batches)  # instance samples, then their class samples at keyed positions -1 - p
    assert batch["captions"] == [INSTANCE, INSTANCE, CLASS, CLASS]
    assert batch["positions"].tolist() == [0, 1, -1, -2]
    with torch.no_grad():
        total = a.compute_loss(batch)
        a.loss_fn = diffusion_loss
        inst, klass = (a.compute_loss(h) for h in _halves(batch, 2))
    torch.testing.assert_close(total, inst + 0.5 * klass)
    assert abs(klass.item()) > 0 and not torch.isclose(total, inst)

    a = make_trainer(tiny_sd, instance_dir, tmp_path / "a", **over)
    assert "2 generated by the base: 0 now, 2 reused" in capsys.readouterr().err  # the cache is reused
    a.train()
    a.cleanup()
    b = make_trainer(tiny_sd, instance_dir, tmp_path / "b", **{**over, "train.max_steps": 2})
    b.train()
    b.cleanup()
    c = make_trainer(tiny_sd, instance_dir, tmp_path / "b", **{
        **over, "checkpoint.allow_config_change": "true",
        "checkpoint.resume": str(tmp_path / "b/checkpoints/step-000002"),
    })
    assert c.step == 2
    c.train()
    for n, p in a.trainables.items():
        assert torch.equal(p, c.trainables[n]), n
    assert sorted(p.name for p in users.iterdir()) == before
