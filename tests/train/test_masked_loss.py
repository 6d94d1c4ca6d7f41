"""Loss masks (data.masks): the loss formula against an independent computation, masks from alpha
and from a folder, masks following their image's crop and flip, errors, cache and exact resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from loracraft.infer.errors import ConfigError, DataError
from loracraft.train.config import build_config
from loracraft.train.data import Planner, SampleStream, TrainingExamples, collate
from loracraft.train.data.check import check_dataset, checked_images
from loracraft.train.data.masks import attach_masks
from loracraft.train.loss import diffusion_loss, mask_weights, prior_preservation_loss

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _striped(
    out: Path, n: int = 4, size: tuple[int, int] = (48, 32), alpha: bool = False, seed: int = 0
) -> Path:
    """``n`` images with random red/blue column stripes and their masks (white where red) in
    ``out/masks``; with ``alpha`` the blue columns are transparent instead. 48x32 at resolution 32:
    no resize, a random 16-pixel horizontal crop, so the crop offset and flip show in every sample."""
    rng = random.Random(seed)
    data, masks = out / "data", out / "masks"
    data.mkdir(parents=True)
    masks.mkdir()
    rows = []
    for k in range(n):
        on = np.array([rng.random() < 0.5 for _ in range(size[0])])
        rgb = np.where(on[None, :, None], np.array(RED), np.array(BLUE)).astype(np.uint8)
        rgb = np.broadcast_to(rgb, (size[1], size[0], 3)).copy()
        white = np.broadcast_to((on * 255).astype(np.uint8)[None, :], (size[1], size[0])).copy()
        name = f"{k:02d}.png"
        if alpha:
            Image.fromarray(np.dstack([rgb, white]), "RGBA").save(data / name)
        else:
            Image.fromarray(rgb).save(data / name)
        Image.fromarray(white, "L").save(masks / name)
        rows.append({"file_name": name, "text": f"a striped card {k}" + (" sks" if k % 2 else "")})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _examples(data: Path, masks: str, **data_cfg) -> TrainingExamples:
    from loracraft.train.config import build_config

    cfg = build_config(
        {"model": {"base": "x"}, "data": {"path": str(data), "resolution": 32, **data_cfg}}, []
    )
    images, _ = checked_images(check_dataset(data, masks=masks), "fail")
    attach_masks(images, masks)
    targets = [(32, 32)] * len(images)
    return TrainingExamples(Planner(images, SampleStream(images.repeats(), 0), cfg.data, 0, targets))


# ----------------------------------------------------------------------------- the loss formula
def _huber(pred, target, c):
    c = c.view(-1, 1, 1, 1)
    return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)


@pytest.mark.parametrize("loss_type", ["mse", "l1", "huber"])
@pytest.mark.parametrize("unmasked", [0.0, 0.25])
def test_masked_loss_is_the_mean_of_the_weighted_elementwise_loss(loss_type, unmasked):
    """kohya: loss * interpolate(mask, latent size, area), mean over every element (not the mask's
    area), then the per-sample weights (min-SNR), then the batch mean."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 4, 6, generator=g), torch.randn(3, 4, 4, 6, generator=g)
    mask = torch.rand(3, 1, 32, 48, generator=g)
    snr = torch.rand(3, generator=g) + 0.5
    c = torch.rand(3, generator=g) + 0.1
    elementwise = {
        "mse": F.mse_loss(pred, target, reduction="none"),
        "l1": F.l1_loss(pred, target, reduction="none"),
        "huber": _huber(pred, target, c),
    }[loss_type]
    pooled = F.avg_pool2d(mask, 8)  # 8x8 blocks: what area interpolation to latent size averages
    weight = unmasked + (1 - unmasked) * pooled
    expected = ((elementwise * weight).mean(dim=(1, 2, 3)) * snr).mean()
    got = diffusion_loss(
        pred,
        target,
        snr,
        loss_type,
        c if loss_type == "huber" else None,
        element_weights=mask_weights(mask, (4, 6), unmasked),
    )
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("loss_type", ["mse", "l1", "smooth_l1"])
@pytest.mark.parametrize("unmasked", [0.0, 0.3, 1.0])
def test_an_all_white_mask_gives_exactly_the_unmasked_loss(loss_type, unmasked):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    c = torch.full((2,), 0.1)
    w = mask_weights(torch.ones(2, 1, 32, 32), (4, 4), unmasked)
    assert torch.equal(w, torch.ones_like(w))
    assert torch.equal(
        diffusion_loss(pred, target, None, loss_type, c, element_weights=w),
        diffusion_loss(pred, target, None, loss_type, c),
    )


def test_unmasked_weight_is_what_black_pixels_weigh():
    w = mask_weights(torch.zeros(1, 1, 16, 16), (2, 2), 0.2)
    torch.testing.assert_close(w, torch.full((1, 1, 2, 2), 0.2))


def test_prior_preservation_splits_the_masks_with_the_batch():
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(4, 4, 2, 2, generator=g), torch.randn(4, 4, 2, 2, generator=g)
    w = torch.rand(4, 1, 2, 2, generator=g)
    per = (F.mse_loss(pred, target, reduction="none") * w).mean(dim=(1, 2, 3))
    expected = per[:2].mean() + 0.5 * per[2:].mean()
    torch.testing.assert_close(prior_preservation_loss(pred, target, 2, 0.5, element_weights=w), expected)


# ----------------------------------------------------------------------------- masks follow their image
@pytest.mark.parametrize("source", ["alpha", "folder"])
def test_the_mask_is_cropped_and_flipped_with_its_image(tmp_path, source):
    """The pixels say where the mask must be white (red columns; with alpha the transparent columns
    are composited on white), whatever random crop and flip each position drew."""
    out = _striped(tmp_path, alpha=source == "alpha")
    masks = "alpha" if source == "alpha" else str(out / "masks")
    examples = _examples(out / "data", masks, random_flip=True)
    crops, flips = set(), set()
    for position in range(24):
        s = examples[position]
        red = (s["pixel_values"][0] > 0) & (s["pixel_values"][1] < 0)
        assert s["mask"].shape == (1, 32, 32)
        assert torch.equal(s["mask"][0], red.float()), position
        crops.add(s["crop"])
        flips.add(examples.planner.plan(position).flip)
    assert len(crops) > 3 and flips == {False, True}  # the test saw random crops and both flips


def test_the_cached_path_crops_the_mask_as_the_latent_was_encoded(tmp_path):
    """No latent lookup -> centred crops only; the cached path must give the same masks."""
    out = _striped(tmp_path)
    masks = str(out / "masks")
    pixel = _examples(out / "data", masks, random_flip=True, center_crop=True)
    cached = TrainingExamples(
        pixel.planner, latent_lookup=lambda i, flip: {"latent_mean": torch.zeros(4, 4, 4)}
    )
    for position in range(8):
        assert torch.equal(pixel[position]["mask"], cached[position]["mask"])


def test_rows_without_a_mask_train_whole_in_a_batch():
    batch = collate(
        [
            {"caption": "a", "position": 0, "mask": torch.zeros(1, 8, 8)},
            {"caption": "b", "position": 1},  # a DreamBooth class image
        ]
    )
    assert torch.equal(batch["mask"][1], torch.ones(1, 8, 8)) and torch.equal(
        batch["mask"][0], torch.zeros(1, 8, 8)
    )


# ----------------------------------------------------------------------------- errors and check-data
def test_a_missing_mask_is_a_finding_naming_image_and_mask(tmp_path):
    out = _striped(tmp_path)
    (out / "masks" / "01.png").unlink()
    report = check_dataset(out / "data", masks=str(out / "masks"))
    [f] = [f for f in report.errors]
    assert (f.file, f.problem) == ("01.png", "missing-mask")
    assert str(out / "masks" / "01.png") in f.what
    with pytest.raises(DataError, match="no mask for this image") as e:
        checked_images(report, "fail")
    assert "\n" not in str(e.value) and "01.png" in str(e.value)
    images, skipped = checked_images(report, "skip")  # data.on_error=skip trains without it
    assert len(images) == 3 and [s.file for s in skipped] == ["01.png"]


def test_a_mask_of_another_size_is_an_error(tmp_path):
    out = _striped(tmp_path)
    Image.new("L", (32, 32), 255).save(out / "masks" / "02.png")
    [f] = check_dataset(out / "data", masks=str(out / "masks")).errors
    assert (f.file, f.problem) == ("02.png", "bad-mask") and "32x32" in f.what and "48x32" in f.what


def test_an_image_without_alpha_is_an_error_and_alpha_warnings_go(tmp_path):
    out = _striped(tmp_path, alpha=True)
    Image.open(out / "data" / "03.png").convert("RGB").save(out / "data" / "03.png")
    assert any(f.problem == "alpha-channel" for f in check_dataset(out / "data").warnings)
    report = check_dataset(out / "data", masks="alpha")
    assert not any(f.problem == "alpha-channel" for f in report.findings)
    [f] = report.errors
    assert (f.file, f.problem) == ("03.png", "no-alpha")
    with pytest.raises(
        DataError,
        match=r"has no alpha channel \(mode RGB\), .*03\.png, save it with a transparent background",
    ):
        checked_images(report, "fail")


def test_a_mask_folder_that_is_missing_or_inside_the_dataset_is_refused(tmp_path):
    out = _striped(tmp_path)
    with pytest.raises(ConfigError, match="mask folder not found"):
        check_dataset(out / "data", masks=str(tmp_path / "nowhere"))
    (out / "data" / "masks").mkdir()
    with pytest.raises(ConfigError, match="inside the dataset folder"):
        check_dataset(out / "data", masks=str(out / "data" / "masks"))


def test_check_data_cli_reports_missing_masks(tmp_path, capsys):
    import argparse

    from loracraft.train.commands.check_data import register

    out = _striped(tmp_path)
    (out / "masks" / "00.png").unlink()
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["check-data", str(out / "data"), "--masks", str(out / "masks")])
    with pytest.raises(DataError):
        args.func(args)
    assert "00.png: no mask for this image" in capsys.readouterr().out


def test_config_keys_are_checked_and_documented():
    from loracraft.train.config import build_config, config_help

    base = {"model": {"base": "x"}, "data": {"path": "y"}}
    for bad in ("data.unmasked_weight=1.5", "data.masks="):
        with pytest.raises(ConfigError):
            build_config(base, [bad])
    text = config_help()
    assert "data.masks" in text and "unmasked_weight" in text and "not divided by the mask's area" in text


# ----------------------------------------------------------------------------- training
def test_training_with_masks_cache_black_masks_and_exact_resume(tiny_sd, tmp_path, make_trainer, resume_split):
    """Cached and uncached batches give the same masked loss; all-black masks leave nothing to learn;
    4 steps straight == 2 steps + resume + 2 with random crops, flips and masks."""
    out = _striped(tmp_path / "set", n=4)
    data, masks = out / "data", str(out / "masks")
    square = {"data.masks": masks, "data.center_crop": "true", "data.random_flip": "true"}
    losses = {}
    for mode in ("true", "false"):
        trainer = make_trainer(tiny_sd, data, tmp_path / f"cache-{mode}", **square, **{"train.cache": mode})
        batches = [next(trainer.batches) for _ in range(2)]
        assert ("latent_mean" in batches[0]) == (mode == "true") and "mask" in batches[0]
        with torch.no_grad():
            losses[mode] = torch.stack([trainer.compute_loss(b) for b in batches])
            if mode == "false":
                unmasked = trainer.compute_loss({k: v for k, v in batches[0].items() if k != "mask"})
                black = trainer.compute_loss({**batches[0], "mask": torch.zeros_like(batches[0]["mask"])})
    torch.testing.assert_close(losses["true"], losses["false"], rtol=1e-4, atol=1e-6)
    assert black.item() == 0.0 and unmasked.item() != losses["false"][0].item()

    over = {
        "data.masks": masks,
        "data.random_flip": "true",
        "data.unmasked_weight": 0.1,
        "train.cache": "false",
        "train.max_steps": 4,
        "checkpoint.every": 2,
        "train.snr_gamma": 5,
    }
    a, c = resume_split(tiny_sd, data, tmp_path, **over)
    assert any(p.abs().max() > 0 for n, p in a.trainables.items() if "lora_B" in n)
    for n, p in a.trainables.items():
        assert torch.equal(p, c.trainables[n]), n


def test_a_missing_mask_stops_training_before_weights_load(tiny_sd, tmp_path, make_trainer):
    out = _striped(tmp_path / "set", n=4)
    (out / "masks" / "02.png").unlink()
    trainer = make_trainer(
        tiny_sd, out / "data", tmp_path / "r", setup=False, **{"data.masks": str(out / "masks")}
    )
    with pytest.raises(DataError, match=r"no mask for this image.*02\.png"):
        trainer.setup()
    assert trainer.c is None


def test_a_recipe_mask_folder_becomes_absolute_but_alpha_stays(tmp_path, monkeypatch):
    from loracraft.train.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpha").mkdir()  # a folder called alpha does not change what "alpha" means
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {base: x}\ndata: {path: d, masks: m}\n")
    assert load_config(recipe).data.masks == str(tmp_path / "m")
    assert load_config(recipe, ["data.masks=alpha"]).data.masks == "alpha"


def test_masks_apply_to_preserved_rows_too(tiny_sd, tmp_path, make_trainer):
    """preserve: rows without the trigger learn the base's prediction; their masks weigh that loss
    like any other row's (all black: nothing; all white: exactly the unmasked loss)."""
    out = _striped(tmp_path / "set", n=4)
    over = {"data.masks": str(out / "masks"), "preserve.trigger": "sks", "train.batch_size": 4}
    trainer = make_trainer(tiny_sd, out / "data", tmp_path / "r", **over)
    torch.manual_seed(0)
    for p in trainer.trainables.values():  # an adapter far from zero: preserved rows have a loss
        torch.nn.init.normal_(p, std=0.2)
    batch = next(trainer.batches)
    assert 0 < sum("sks" in c for c in batch["captions"]) < 4
    ones = torch.ones_like(batch["mask"])
    with torch.no_grad():
        unmasked = trainer.compute_loss({k: v for k, v in batch.items() if k != "mask"})
        assert trainer.compute_loss({**batch, "mask": ones}).item() == unmasked.item() > 0
        assert trainer.compute_loss({**batch, "mask": torch.zeros_like(ones)}).item() == 0.0
        assert 0 < trainer.compute_loss(batch).item() < unmasked.item()


def test_masked_loss_is_named_in_kohyas_metadata():
    from loracraft.train.config import build_config
    from loracraft.train.loss import kohya_metadata

    cfg = build_config({"model": {"base": "x"}, "data": {"path": "y", "masks": "alpha"}}, [])
    assert kohya_metadata(cfg) == {"ss_masked_loss": "True"}


def test_each_rank_gets_the_masks_one_process_would(tmp_path):
    """Masks follow the stream position, not the rank: the batches of 2 ranks x batch 1 hold the
    masks (and crops) of 1 process x batch 2, sample for sample."""
    from loracraft.train.data import make_batches

    out = _striped(tmp_path, n=4)
    examples = _examples(out / "data", str(out / "masks"), random_flip=True)
    one = iter(make_batches(examples, 0, 2))
    ranks = [iter(make_batches(examples, 0, 1, num_processes=2, rank=r)) for r in (0, 1)]
    for _ in range(6):
        whole, parts = next(one), [next(r) for r in ranks]
        assert torch.equal(whole["mask"], torch.cat([p["mask"] for p in parts]))
        assert torch.equal(whole["positions"], torch.cat([p["positions"] for p in parts]))


def test_masks_with_concepts_are_refused_when_the_config_loads(tiny_sd, tmp_path):
    out = _striped(tmp_path / "set", n=2)
    over = [f"model.base={tiny_sd}", "data.masks=alpha", f"data.concepts=[{{path: {out / 'data'}}}]"]
    with pytest.raises(ConfigError, match="data.masks applies to data.path only") as e:
        build_config({}, over)
    assert "data.masks=null" in str(e.value)
