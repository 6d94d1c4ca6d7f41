"""SDXL training: two text encoders, size micro-conditioning, cache, and adapters plain diffusers loads."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loracraft.infer.formats import convert_lora_file, read_lora, read_safetensors
from loracraft.train.data import (
    Planner,
    SampleStream,
    TrainingExamples,
    assign_bucket,
    load_captioned_images,
    make_buckets,
    size_conditioning,
)

TE = {"lora.text_encoder": "{rank: 4, alpha: 8}", "train.text_encoder_lr": 1e-2, "train.max_steps": 3}
PROMPT = "a red square on blue"


@pytest.fixture(scope="module")
def sdxl_data(tmp_path_factory):
    from loracraft.infer.testing import write_captioned_dataset

    return write_captioned_dataset(tmp_path_factory.mktemp("sdxl-data"), n=4, px=32, seed=3)


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, sdxl_data, tmp_path_factory, make_trainer):
    """Three steps of UNet + both text-encoder LoRAs on the tiny SDXL (UNet rank 8 / alpha 4)."""
    trainer = make_trainer(tiny_sdxl, sdxl_data, tmp_path_factory.mktemp("sdxl") / "run", **TE)
    base = _text_outputs(trainer.c)
    for _ in range(3):
        trainer.optimizer_step()
    return trainer, base, trainer.cleanup()


def _ids(tok):
    return tok([PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


@torch.no_grad()
def _text_outputs(owner) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_encoder last hidden state, text_encoder_2 pooled projection) of PROMPT."""
    te1 = owner.text_encoder(_ids(owner.tokenizer))[0]
    te2 = owner.text_encoder_2(_ids(owner.tokenizer_2)).text_embeds
    return te1.clone(), te2.clone()


def _image(pipe, seed=0) -> np.ndarray:
    out = pipe(PROMPT, num_inference_steps=2, width=32, height=32, generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.images[0]).astype(np.int16)


def _assert_unet_matches(trainer, pipe) -> None:
    """The UNet diffusers loaded the adapter into acts like the trainer's, on one fixed probe
    with SDXL conditioning (prompt embeds, pooled embeds, size/crop time ids)."""
    torch.manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        text = trainer._encode_text([PROMPT])
        kwargs = trainer.conditioning.unet_kwargs(text, torch.tensor([[32, 32, 0, 0, 32, 32]]))
        ours = trainer.accelerator.unwrap_model(trainer.unet)(x, t, **kwargs).sample
        torch.testing.assert_close(pipe.unet(x, t, **kwargs).sample, ours, rtol=1e-4, atol=1e-5)


def test_sdxl_trains_and_plain_diffusers_loads_the_adapter_with_both_text_encoders(sdxl_run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    trainer, (te1_before, te2_before), out = sdxl_run
    assert trainer.c.family == "sdxl" and "text_lookup" not in trainer.sources  # the encoders train
    keys = load_file(str(out))
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(prefix) for k in keys), prefix
    header = read_safetensors(out)[1]
    assert header["loracraft.model_family"] == "sdxl" and header["ss_base_model_version"] == "sdxl_base_v1-0"

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    pipe.load_lora_weights(str(out.parent))  # plain diffusers, folder form
    assert np.abs(_image(pipe) - before).max() > 2  # the adapter changes the image (same seed)

    # What plain diffusers loaded acts exactly like the model the trainer holds (alpha included).
    ours = SimpleNamespace(
        tokenizer=trainer.c.tokenizer, tokenizer_2=trainer.c.tokenizer_2,
        text_encoder=trainer.c.text_encoder, text_encoder_2=trainer.c.text_encoder_2,
    )
    theirs_te1, theirs_te2 = _text_outputs(pipe)
    ours_te1, ours_te2 = _text_outputs(ours)
    torch.testing.assert_close(theirs_te1, ours_te1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(theirs_te2, ours_te2, rtol=1e-4, atol=1e-5)
    assert (ours_te1 - te1_before).abs().max() > 1e-4 and (ours_te2 - te2_before).abs().max() > 1e-4
    _assert_unet_matches(trainer, pipe)


def test_sdxl_prompt_embeds_are_penultimate_states_concatenated_and_pooled_from_encoder_2(sdxl_run):
    trainer, _, _ = sdxl_run
    c = trainer.c
    with torch.no_grad():
        text = trainer._encode_text([PROMPT])
        h1 = c.text_encoder(_ids(c.tokenizer), output_hidden_states=True).hidden_states[-2]
        o2 = c.text_encoder_2(_ids(c.tokenizer_2), output_hidden_states=True)
    assert text["text_embeds"].shape == (1, 77, 32 + 48)  # te1 width + te2 width
    torch.testing.assert_close(text["text_embeds"], torch.cat([h1, o2.hidden_states[-2]], dim=-1))
    torch.testing.assert_close(text["pooled_text_embeds"], o2.text_embeds)  # projection_dim 40


def test_size_conditioning_matches_hand_computed_values():
    # 48x32 image, 32x32 target: resized to cover -> 48x32, crop 5 px from the left.
    assert size_conditioning((48, 32), (32, 32), (0, 5), flip=False).tolist() == [32, 48, 0, 5, 32, 32]
    # Mirrored: the 5 px cut on the left of the original is cut on the right of what the model sees;
    # the left offset in the mirrored image is 48 - 32 - 5 = 11.
    assert size_conditioning((48, 32), (32, 32), (0, 5), flip=True).tolist() == [32, 48, 0, 11, 32, 32]
    # No crop given (the cached path): the centred crop. 100x50 -> 64x32 target -> resized 64x32.
    assert size_conditioning((100, 50), (64, 32), None, flip=False).tolist() == [50, 100, 0, 0, 32, 64]
    # 40x60 to a 32x32 target: resized to 32x48, centred crop top (48 - 32) // 2 = 8.
    assert size_conditioning((40, 60), (32, 32), None, flip=False).tolist() == [60, 40, 8, 0, 32, 32]


def _one_image_dataset(tmp_path, size):
    Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "img.png")
    (tmp_path / "img.txt").write_text("a red square", encoding="utf-8")
    return load_captioned_images(str(tmp_path))


def test_size_conditioning_comes_from_the_bucket_and_crop_bookkeeping(tmp_path):
    images = _one_image_dataset(tmp_path, (48, 32))
    # Buckets for 32 px at step 8 are (24, 40), (32, 32), (40, 24); a 3:2 image goes to (40, 24):
    # covered at 40x27 (scale 40/48), centred crop top (27 - 24) // 2 = 1.
    bucket = assign_bucket((48, 32), make_buckets(32, 8))
    assert bucket == (40, 24)
    cfg = SimpleNamespace(random_flip=False, caption_dropout=0.0, shuffle_tags=False, center_crop=False, buckets=True)
    sample = TrainingExamples(Planner(images, SampleStream([1], 0), cfg, 0, [bucket]))[0]
    assert sample["size_cond"].tolist() == [32, 48, 1, 0, 24, 40]
    assert tuple(sample["pixel_values"].shape) == (3, 24, 40)
    # Random crops and flips: the left offset is the one drawn, mirrored when the sample is flipped.
    cfg = SimpleNamespace(random_flip=True, caption_dropout=0.0, shuffle_tags=False, center_crop=False, buckets=False)
    examples = TrainingExamples(Planner(images, SampleStream([1], 0), cfg, 0, [(32, 32)]))
    seen = set()
    for position in range(12):
        s = examples[position]
        top, left = s["crop"]
        flip = examples.planner.plan(position).flip
        seen.add(flip)
        assert s["size_cond"].tolist() == [32, 48, top, 16 - left if flip else left, 32, 32]
    assert seen == {True, False}


def test_sdxl_cached_and_uncached_losses_match_and_reach_the_unet(tiny_sdxl, sdxl_data, tmp_path, make_trainer):
    from loracraft.train.cache import text_fingerprint

    losses, seen = {}, {}
    for cache in ("true", "false"):
        trainer = make_trainer(tiny_sdxl, sdxl_data, tmp_path / cache, **{"train.cache": cache})
        batch = next(trainer.batches)
        assert ("pooled_text_embeds" in batch) == ("latent_mean" in batch) == (cache == "true")

        def grab(_module, args, kwargs, cache=cache):
            seen[cache] = kwargs["added_cond_kwargs"]

        hook = trainer.accelerator.unwrap_model(trainer.unet).register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            losses[cache] = trainer.compute_loss(batch)
        hook.remove()
        assert seen[cache]["time_ids"].tolist() == batch["size_cond"].float().tolist() == [[32, 32, 0, 0, 32, 32]] * 2
        assert tuple(seen[cache]["text_embeds"].shape) == (2, 40)
    torch.testing.assert_close(losses["true"], losses["false"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["true"]["text_embeds"], seen["false"]["text_embeds"], rtol=1e-5, atol=1e-6)
    # SD1 and SDXL text entries can never collide: different kind, different key material.
    kind, fp = text_fingerprint(trainer.c)
    sd_kind, sd_fp = text_fingerprint(dataclasses.replace(trainer.c, text_encoder_2=None, tokenizer_2=None))
    assert (kind, sd_kind) == ("text-sdxl", "text") and fp != sd_fp and fp.startswith(sd_fp)


def test_sdxl_adapter_round_trips_through_kohya_with_te1_te2_names(sdxl_run, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    trainer, _, out = sdxl_run
    kohya = convert_lora_file(out, tmp_path / "style.safetensors", "kohya")
    tensors, header = read_safetensors(kohya)
    prefixes = {k.split(".")[0].split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"}, prefixes
    # UNet modules in kohya's own SDXL (SGM) layout, as sdxl_train_network.py names them
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert not any(k.startswith("lora_unet_down_blocks") for k in tensors)
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    back = convert_lora_file(kohya, tmp_path / "back", "diffusers")
    a, b, c = read_lora(out), read_lora(kohya), read_lora(back)
    assert a.tensors_sha256() == b.tensors_sha256() == c.tensors_sha256()
    assert {m.alpha for _, _, m in b.items()} == {4, 8}  # UNet alpha 4, text encoders alpha 8
    # plain diffusers reads the kohya file (SGM names, per-module alphas) as the same adapter
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)
    _assert_unet_matches(trainer, pipe)
    with torch.no_grad():
        theirs_te2 = pipe.text_encoder_2(_ids(pipe.tokenizer_2)).text_embeds
        torch.testing.assert_close(theirs_te2, trainer.c.text_encoder_2(_ids(trainer.c.tokenizer_2)).text_embeds,
                                   rtol=1e-4, atol=1e-5)


def test_sdxl_recipe_trains_tiny_model_with_buckets_cache_bf16_and_validation(tiny_sdxl, tmp_path):
    """configs/sdxl.yaml end to end on the tiny SDXL: buckets, latent + text cache, bf16, gradient
    checkpointing, grad accumulation, validation grid through the SDXL pipeline, the recipe's rank."""
    from importlib.resources import files

    from accelerate.state import AcceleratorState

    from loracraft.train.config import load_config
    from loracraft.train.trainer import LoraTrainer

    data = tmp_path / "data"
    data.mkdir()
    for i, size in enumerate([(48, 32), (48, 32), (32, 32), (32, 48)]):
        Image.new("RGB", size, (40 * i, 200, 30)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a green square", encoding="utf-8")
    cfg = load_config(files("loracraft.configs") / "sdxl.yaml", [
        f"model.base={tiny_sdxl}", f"data.path={data}", "data.resolution=32", "data.bucket_step=8",
        "train.max_steps=1", "train.warmup_steps=1", "train.grad_accum=2", "validation.prompts=[a green square]",
        "validation.every=1",
        "validation.steps=2", "validation.num_images=1", f"output.dir={tmp_path / 'run'}", "output.report=false",
        "output.report_to=[]",
    ])
    AcceleratorState._reset_state(reset_partial_state=True)
    trainer = LoraTrainer(cfg)
    trainer.setup()
    assert {"latent_lookup", "text_lookup"} <= set(trainer.sources)
    assert trainer.c.unet.dtype == torch.bfloat16 and trainer.c.vae.dtype == torch.float32
    trainer.train()
    out = trainer.cleanup()
    assert Image.open(tmp_path / "run" / "samples" / "step-000001.png").size == (32, 32)
    assert sorted(set(trainer.planner.targets)) == [(24, 40), (32, 32), (40, 24)]
    adapter = read_lora(out)
    assert list(adapter.modules) == ["unet"] and {m.rank for _, _, m in adapter.items()} == {32}


def test_heldout_loss_of_loracraft_eval_works_on_sdxl(tiny_sdxl, sdxl_data):
    """`loracraft eval`'s held-out loss conditions the UNet the way training does (SDXL: pooled + time ids)."""
    from loracraft.infer.models import load_base
    from loracraft.train.validation import heldout_loss

    images = load_captioned_images(str(sdxl_data))
    pipe = load_base(tiny_sdxl)
    loss = heldout_loss(pipe, images, 32)
    assert np.isfinite(loss) and loss > 0
    # the same figure again: noise and timesteps are fixed per image
    assert heldout_loss(pipe, images, 32) == loss


def test_an_sdxl_refiner_is_refused_by_train_and_generate_with_a_one_line_fix(tiny_sdxl, tmp_path):
    """The refiner has no first text encoder (model_index.json `text_encoder: [null, null]`)."""
    import json
    import shutil

    from loracraft.infer.errors import ModelError
    from loracraft.infer.models import load_base
    from loracraft.train.components import load_components

    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", text_encoder=[None, None], tokenizer=[None, None],
                 requires_aesthetics_score=True)
    (refiner / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    for load in (load_base, load_components):
        with pytest.raises(ModelError, match=r"^this is an SDXL refiner .*, use the SDXL base model") as e:
            load(str(refiner))
        assert str(refiner) in str(e.value) and "\n" not in str(e.value)
    assert load_components(str(tiny_sdxl)).text_encoder_2 is not None  # the base itself loads
