"""The hand-written denoising loop equals the diffusers pipeline bit for bit; shapes; callbacks."""

from __future__ import annotations

import diffusers
import pytest
import torch

from loracraft.infer.denoise import denoise, encode_prompts
from loracraft.infer.models import load_base

LONG = ", ".join(["a red circle on a blue background"] * 18)  # 143 tokens with the tiny tokenizer


@pytest.fixture(scope="module", params=["tiny_sd", "tiny_sdxl"])
def pipe(request):
    return load_base(request.getfixturevalue(request.param))


def _gen(seed=5):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "scheduler", ["EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DDIMScheduler"]
)
@pytest.mark.parametrize("negative", [None, "blue"])
def test_equals_the_diffusers_pipeline_bit_for_bit(pipe, scheduler, negative):
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    ref = pipe("a red circle", negative_prompt=negative, num_inference_steps=3, guidance_scale=6.0,
               generator=_gen(), output_type="np").images  # fmt: skip
    ours = denoise(pipe, "a red circle", negative, steps=3, guidance=6.0, generator=_gen())
    assert ours.shape == ref.shape == (1, 32, 32, 3)
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(ref))


def test_shapes_of_the_conditioning_and_latents(pipe):
    sdxl = hasattr(pipe, "text_encoder_2")
    cond, uncond = encode_prompts(pipe, "a red circle", "blue")
    width = pipe.text_encoder.config.hidden_size + (pipe.text_encoder_2.config.hidden_size if sdxl else 0)
    assert cond.embeds.shape == uncond.embeds.shape == (1, 77, width)
    if sdxl:
        assert cond.pooled.shape == (1, pipe.text_encoder_2.config.projection_dim)
    long, short = encode_prompts(pipe, LONG, "blue")
    assert long.embeds.shape == short.embeds.shape == (1, 154, width)  # negative padded to the same windows

    seen = []
    f = 2 ** (len(pipe.vae.config.block_out_channels) - 1)  # the tiny VAE's factor is 2, not 8
    denoise(pipe, "x", steps=2, width=32, height=24, generator=_gen(),
            callback=lambda i, t, lat: seen.append((i, tuple(lat.shape))))  # fmt: skip
    assert seen == [(0, (1, 4, 24 // f, 32 // f)), (1, (1, 4, 24 // f, 32 // f))]


def test_callback_can_replace_the_latents(tiny_sd):
    pipe = load_base(tiny_sd)
    plain = denoise(pipe, "a red circle", steps=3, generator=_gen())
    same = denoise(pipe, "a red circle", steps=3, generator=_gen(), callback=lambda i, t, lat: None)
    zeroed = denoise(pipe, "a red circle", steps=3, generator=_gen(),
                     callback=lambda i, t, lat: lat * 0)  # fmt: skip
    assert torch.equal(torch.from_numpy(plain), torch.from_numpy(same))
    assert not torch.equal(torch.from_numpy(plain), torch.from_numpy(zeroed))
    with torch.no_grad():
        black = pipe.image_processor.postprocess(
            pipe.vae.decode(torch.zeros(1, 4, 16, 16)).sample, output_type="np"
        )
    assert torch.equal(torch.from_numpy(zeroed), torch.from_numpy(black))


def test_long_prompts_are_not_truncated(tiny_sd):
    pipe = load_base(tiny_sd)
    ids = pipe.tokenizer(LONG, add_special_tokens=False).input_ids
    assert 140 <= len(ids) <= 160
    comma = pipe.tokenizer.get_vocab()[",</w>"]
    cut = max(i for i in range(75) if ids[i] == comma) + 1  # a full window ends at its last comma
    assert 75 - cut <= 20
    head = pipe.tokenizer.decode(ids[:cut])
    cond_long, _ = encode_prompts(pipe, LONG)
    cond_head, _ = encode_prompts(pipe, head)
    assert torch.equal(cond_long.embeds[:, :77], cond_head.embeds)  # window 1 = the tokens up to that comma
    truncated = pipe(
        LONG, num_inference_steps=2, generator=_gen(), output_type="np"
    ).images  # diffusers cuts at 77
    full = denoise(pipe, LONG, steps=2, generator=_gen())
    assert not torch.equal(torch.from_numpy(full), torch.from_numpy(truncated))


def test_emphasis_and_clip_skip_change_the_conditioning(tiny_sd):
    pipe = load_base(tiny_sd)
    plain, _ = encode_prompts(pipe, "a red circle")
    weighted, _ = encode_prompts(pipe, "a (red:1.5) circle")
    skipped, _ = encode_prompts(pipe, "a red circle", clip_skip=2)
    assert not torch.equal(plain.embeds, weighted.embeds)
    torch.testing.assert_close(weighted.embeds.mean(), plain.embeds.mean())
    out = pipe.text_encoder(pipe.tokenizer("a red circle", padding="max_length", return_tensors="pt").input_ids,
                            output_hidden_states=True)  # fmt: skip
    torch.testing.assert_close(
        skipped.embeds,
        pipe.text_encoder.final_layer_norm(out.hidden_states[-2]),  # transformers 5 layout
    )
