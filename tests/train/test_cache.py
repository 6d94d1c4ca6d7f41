"""Latent/text cache: same loss as uncached, exact invalidation, crash-safe filling; buckets."""

import collections
import random

import pytest
import torch
from PIL import Image

from loracraft.infer.testing import write_captioned_dataset
from loracraft.train import cache as cache_mod
from loracraft.train.data import (
    BucketedStream,
    assign_bucket,
    load_captioned_images,
    make_buckets,
    positions_for,
)


def _files(root):
    return {p.relative_to(root).as_posix() for p in root.rglob("*.safetensors")}


def test_cached_and_uncached_training_give_the_same_loss(tiny_sd, tiny_dataset, tmp_path, make_trainer):
    losses = {}
    for mode in ("true", "false"):
        trainer = make_trainer(
            tiny_sd, tiny_dataset, tmp_path / mode, **{"train.cache": mode, "data.random_flip": "true",
                                                       "data.caption_dropout": 0.3,
                                                       "train.cache_dir": str(tmp_path / "c")}
        )
        batches = [next(trainer.batches) for _ in range(3)]
        assert ("latent_mean" in batches[0]) == (mode == "true")
        with torch.no_grad():
            losses[mode] = torch.stack([trainer.compute_loss(b) for b in batches])
    torch.testing.assert_close(losses["true"], losses["false"], rtol=1e-4, atol=1e-5)


def _on_meta(module) -> bool:
    return all(t.is_meta for t in module.parameters())


@pytest.mark.parametrize(
    "over, freed",
    [
        ({"train.cache": "true"}, {"vae.encoder", "vae.decoder", "text_encoder"}),
        ({"train.cache": "true", "validation.prompts": "[a red circle]"}, {"vae.encoder"}),
        ({"train.cache": "false"}, set()),
    ],
    ids=["cached", "cached+validation", "uncached"],
)
def test_cached_encoders_are_released(tiny_sd, tiny_dataset, tmp_path, make_trainer, over, freed):
    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "run", **over, **{"train.cache_dir": str(tmp_path / "c")})
    c = trainer.c
    parts = {"vae.encoder": c.vae.encoder, "vae.decoder": c.vae.decoder, "text_encoder": c.text_encoder}
    assert {name for name, m in parts.items() if _on_meta(m)} == freed
    assert not any(t.is_meta for t in c.unet.parameters())
    with torch.no_grad():
        assert torch.isfinite(trainer.compute_loss(next(trainer.batches)))
    if "validation.prompts" in over:
        assert trainer.validate().is_file()  # decoder and text encoder still there for it


_RUNS = __import__("itertools").count()


def _build(tiny_sd, data, tmp_path, make_trainer, **over):
    # (not random.random(): the trainer's set_seed resets Python's RNG on every setup)
    trainer = make_trainer(tiny_sd, data, tmp_path / f"run{next(_RUNS)}",
                           **{"train.cache": "true", "train.cache_dir": str(tmp_path / "cache"), **over})
    return trainer


def test_cache_invalidates_exactly_the_changed_entries(tiny_sd, tmp_path, make_trainer):
    data = write_captioned_dataset(tmp_path / "d", n=4, layout="txt", seed=2)
    cache = tmp_path / "cache"
    _build(tiny_sd, data, tmp_path, make_trainer)
    lat0, txt0 = _files(cache / "latents"), _files(cache / "text")
    assert len(lat0) == 4 and len(txt0) == 4 + 1  # + the empty caption

    # an edited image: one new latent entry, nothing else
    Image.new("RGB", (32, 32), (1, 2, 3)).save(data / "0002.png")
    _build(tiny_sd, data, tmp_path, make_trainer)
    assert len(_files(cache / "latents") - lat0) == 1 and _files(cache / "text") == txt0

    # an edited caption: one new text entry
    lat1 = _files(cache / "latents")
    (data / "0001.txt").write_text("a green circle on a white background")
    _build(tiny_sd, data, tmp_path, make_trainer)
    assert len(_files(cache / "text") - txt0) == 1 and _files(cache / "latents") == lat1

    # a changed resolution: every latent entry is new
    _build(tiny_sd, data, tmp_path, make_trainer, **{"data.resolution": 16})
    assert len(_files(cache / "latents") - lat1) == 4


def test_changed_vae_invalidates_latents_only(tiny_sd, tmp_path, make_trainer):
    import shutil

    from diffusers import AutoencoderKL

    data = write_captioned_dataset(tmp_path / "d", n=2, seed=3)
    cache = tmp_path / "cache"
    _build(tiny_sd, data, tmp_path, make_trainer)
    lat0, txt0 = _files(cache / "latents"), _files(cache / "text")
    other = tmp_path / "other-vae-model"
    shutil.copytree(tiny_sd, other)
    vae = AutoencoderKL.from_pretrained(other / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    vae.save_pretrained(other / "vae")
    _build(other, data, tmp_path, make_trainer)
    assert len(_files(cache / "latents") - lat0) == 2 and _files(cache / "text") == txt0


def test_killed_while_caching_then_rerun_completes(tiny_sd, tmp_path, make_trainer, monkeypatch):
    data = write_captioned_dataset(tmp_path / "d", n=5, seed=4)
    real_put = cache_mod.TensorCache.put
    calls = collections.Counter()

    def dying_put(self, key, tensors):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")  # the process dies in the middle of filling
        return real_put(self, key, tensors)

    monkeypatch.setattr(cache_mod.TensorCache, "put", dying_put)
    with pytest.raises(KeyboardInterrupt):
        _build(tiny_sd, data, tmp_path, make_trainer)
    partial = _files(tmp_path / "cache" / "latents")
    assert len(partial) == 2 and not list((tmp_path / "cache").rglob("*.tmp"))
    monkeypatch.setattr(cache_mod.TensorCache, "put", real_put)
    trainer = _build(tiny_sd, data, tmp_path, make_trainer)
    assert len(_files(tmp_path / "cache" / "latents")) == 5
    # every entry, old or new, equals a from-scratch build
    fresh = _build(tiny_sd, data, tmp_path / "fresh", make_trainer, **{"train.cache_dir": str(tmp_path / "c2")})
    for i in range(5):
        a = trainer.sources["latent_lookup"](i, False)
        b = fresh.sources["latent_lookup"](i, False)
        torch.testing.assert_close(a["latent_mean"], b["latent_mean"])


def test_random_crops_turn_latent_caching_off(tiny_sd, tmp_path, make_trainer):
    data = tmp_path / "wide"
    data.mkdir()
    Image.new("RGB", (64, 32), (200, 10, 10)).save(data / "a.png")
    (data / "a.txt").write_text("a wide image")
    trainer = _build(tiny_sd, data, tmp_path, make_trainer, **{"train.cache": "auto", "train.batch_size": 1})
    assert "latent_lookup" not in trainer.sources and "text_lookup" in trainer.sources
    from loracraft.infer.errors import ConfigError

    with pytest.raises(ConfigError, match="random crops"):
        _build(tiny_sd, data, tmp_path, make_trainer, **{"train.batch_size": 1})


# ----------------------------------------------------------------------------- buckets
def test_bucket_sizes_respect_area_step_and_ratio():
    buckets = make_buckets(256, 32)
    assert (256, 256) in buckets
    for w, h in buckets:
        assert w % 32 == 0 and h % 32 == 0 and w * h <= 256 * 256 and max(w, h) / min(w, h) <= 2.0
    assert assign_bucket((1000, 500), buckets)[0] > assign_bucket((1000, 500), buckets)[1]
    assert assign_bucket((300, 300), buckets) == (256, 256)


def test_bucketed_batches_are_homogeneous_complete_and_deterministic(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "mixed"
    root.mkdir()
    for i in range(23):
        w, h = rng.choice([(256, 256), (384, 192), (192, 384), (320, 224), (160, 320)])
        Image.new("RGB", (w, h), (i * 10, 0, 0)).save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"image {i}")
    images = load_captioned_images(str(root))
    buckets = make_buckets(256, 32)
    targets = [assign_bucket(images.size(i), buckets) for i in range(len(images))]
    assert len(set(targets)) >= 3
    stream = BucketedStream(images.repeats(), seed=5, buckets=targets, global_batch=4)
    epoch = [stream.item_at(p) for p in range(stream.epoch_length)]
    assert set(epoch) == set(range(len(images)))  # every image, each in exactly one bucket
    for m in range(stream.epoch_length // 4):
        batch = [stream.item_at(p) for p in positions_for(m, 2, 2, 0) + positions_for(m, 2, 2, 1)]
        assert len({targets[i] for i in batch}) == 1
    again = BucketedStream(images.repeats(), seed=5, buckets=targets, global_batch=4)
    assert epoch == [again.item_at(p) for p in range(again.epoch_length)]
    other = BucketedStream(images.repeats(), seed=6, buckets=targets, global_batch=4)
    assert epoch != [other.item_at(p) for p in range(other.epoch_length)]


def test_bucketed_training_runs(tiny_sd, tmp_path, make_trainer):
    root = tmp_path / "b"
    root.mkdir()
    for i, (w, h) in enumerate([(32, 32), (48, 24), (24, 48), (32, 32)]):
        Image.new("RGB", (w, h), (i * 40, 100, 0)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"a picture {i}")
    trainer = make_trainer(tiny_sd, root, tmp_path / "run", **{"data.buckets": "true", "data.bucket_step": 8,
                                                               "train.max_steps": 3, "train.batch_size": 1})
    shapes = {tuple(next(trainer.batches)["latent_mean"].shape[-2:]) for _ in range(8)}
    assert len(shapes) >= 2
    trainer.train()
