"""model.clip_skip and data.max_token_length: captions encoded as diffusers' pipelines
(clip_skip) and loracraft generate (clip skip, long prompts) encode prompts, the text cache
keyed by both, too large a clip skip refused in one line."""

import pytest
import torch

from loracraft.infer.errors import ConfigError
from loracraft.train.conditioning import conditioning_for

CAPTIONS = ["a red cube on a table", "lcstyle, two blue spheres"]


@pytest.fixture(scope="module")
def sd_pipe(tiny_sd):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


@pytest.fixture
def diffusers_layer_norm_path(sd_pipe):
    """diffusers' SD encode_prompt(clip_skip=) reads ``text_encoder.text_model.final_layer_norm``,
    a path transformers 5 no longer has (the layers sit on the encoder itself): point it there,
    outside torch's module registry so nothing else sees a cycle."""
    te = sd_pipe.text_encoder
    if hasattr(te, "text_model"):
        yield
        return
    te.__dict__["text_model"] = te
    yield
    del te.__dict__["text_model"]


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sd_clip_skip_equals_diffusers_encode_prompt(sd_pipe, clip_skip, diffusers_layer_norm_path):
    # A1111 counting (1 = last layer) is diffusers' clip_skip + 1
    with torch.no_grad():
        expected, _ = sd_pipe.encode_prompt(CAPTIONS, "cpu", 1, False, clip_skip=clip_skip - 1 or None)
        got = conditioning_for("sd", clip_skip).encode_prompt([sd_pipe.tokenizer], [sd_pipe.text_encoder], CAPTIONS, "cpu")
    torch.testing.assert_close(got["text_embeds"], expected, rtol=0, atol=0)
    if clip_skip > 1:  # and it is not the plain last layer
        with torch.no_grad():
            plain = conditioning_for("sd").encode_prompt([sd_pipe.tokenizer], [sd_pipe.text_encoder], CAPTIONS, "cpu")
        assert not torch.allclose(plain["text_embeds"], got["text_embeds"])


def test_sdxl_clip_skip_equals_diffusers_encode_prompt(sdxl_pipe):
    p = sdxl_pipe
    with torch.no_grad():
        embeds, _, pooled, _ = p.encode_prompt(CAPTIONS, device="cpu", do_classifier_free_guidance=False, clip_skip=1)
        got = conditioning_for("sdxl", 2).encode_prompt(
            [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2], CAPTIONS, "cpu"
        )
    torch.testing.assert_close(got["text_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(got["pooled_text_embeds"], pooled, rtol=0, atol=0)


def test_clip_skip_past_the_first_layer_is_a_config_error(sd_pipe):
    layers = sd_pipe.text_encoder.config.num_hidden_layers
    with pytest.raises(ConfigError) as e, torch.no_grad():
        conditioning_for("sd", layers + 1).encode_prompt([sd_pipe.tokenizer], [sd_pipe.text_encoder], CAPTIONS, "cpu")
    assert f"model.clip_skip={layers + 1} skips every layer" in str(e.value) and f"use at most {layers}" in str(e.value)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_training_encodes_captions_as_loracraft_generate_encodes_prompts(family, sd_pipe, sdxl_pipe):
    """Same CLIP layer, same 75-token windows: what the adapter trains on is what it sees at generation."""
    from loracraft.infer.denoise import encode_prompts

    pipe = sd_pipe if family == "sd" else sdxl_pipe
    caption = " ".join(["a"] * 70) + " the red style, on the background with a photo"  # two windows
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    with torch.no_grad():
        got = conditioning_for(family, 2, 150).encode_prompt(tokenizers, encoders, [caption], "cpu")
        cond, _ = encode_prompts(pipe, caption, clip_skip=2)
    # float32 rounding only: training encodes a caption's windows as one batch, generate one by one
    torch.testing.assert_close(got["text_embeds"], cond.embeds)
    if family == "sdxl":
        torch.testing.assert_close(got["pooled_text_embeds"], cond.pooled)


def test_clip_skip_keys_the_text_cache(tiny_sd, tiny_dataset, sd_pipe, tmp_path, make_trainer):
    """Cached embeddings of one clip_skip are never read for another: each equals its own encoding."""
    over = {"train.cache_dir": str(tmp_path / "cache"), "train.max_steps": 1}
    for i, clip_skip in enumerate((1, 2, 1)):  # plain entries first, then clip skip 2's, then plain again
        extra = {"model.clip_skip": clip_skip} if clip_skip > 1 else {}
        trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / f"run{i}", **over, **extra)
        batch = next(trainer.batches)
        assert "text_embeds" in batch  # from the cache
        with torch.no_grad():
            expected = conditioning_for("sd", clip_skip).encode_prompt(
                [sd_pipe.tokenizer], [sd_pipe.text_encoder], batch["captions"], "cpu"
            )["text_embeds"]
        torch.testing.assert_close(batch["text_embeds"], expected.to(batch["text_embeds"].dtype))


def _encode(pipe, captions, **kw):
    with torch.no_grad():
        return conditioning_for("sd", **kw).encode_prompt([pipe.tokenizer], [pipe.text_encoder], captions, "cpu")


def test_long_captions_are_encoded_in_75_token_windows(sd_pipe):
    """data.max_token_length=225: window k holds tokens 75k..75k+74 between BOS and EOS, each
    encoded as the tokenizer would encode that text alone (A1111's long prompts)."""
    first, second = " ".join(["a"] * 75), "red cube on the table"  # "a" is one token: 75 tokens exactly
    assert len(sd_pipe.tokenizer(first, add_special_tokens=False).input_ids) == 75
    got = _encode(sd_pipe, [f"{first} {second}", "blue sphere"], max_token_length=225)["text_embeds"]
    assert got.shape[1] == 3 * 77
    alone = _encode(sd_pipe, [first, second, "", "blue sphere"])["text_embeds"]
    torch.testing.assert_close(got[0, :77], alone[0])  # window 1: exactly today's truncated encoding
    torch.testing.assert_close(got[0, 77:154], alone[1])  # window 2: the rest, as if it were the caption
    torch.testing.assert_close(got[0, 154:], alone[2])  # window 3: nothing left: an empty caption's encoding
    torch.testing.assert_close(got[1, :77], alone[3])
    torch.testing.assert_close(_encode(sd_pipe, ["blue sphere"], max_token_length=75)["text_embeds"], alone[3:])


def test_long_captions_train_with_the_text_cache(tiny_sd, tiny_dataset, sd_pipe, tmp_path, make_trainer):
    trainer = make_trainer(tiny_sd, tiny_dataset, tmp_path / "r", **{"data.max_token_length": 150,
                                                                    "train.cache_dir": str(tmp_path / "cache")})
    batch = next(trainer.batches)
    assert batch["text_embeds"].shape[1] == 2 * 77  # cached per max_token_length
    expected = _encode(sd_pipe, batch["captions"], max_token_length=150)["text_embeds"]
    torch.testing.assert_close(batch["text_embeds"], expected.to(batch["text_embeds"].dtype))
    assert torch.isfinite(trainer.compute_loss(batch))


def test_sdxl_long_captions_keep_the_first_windows_pooled_embedding(sdxl_pipe):
    p = sdxl_pipe
    caption = " ".join(["a"] * 80) + " red cube"
    with torch.no_grad():
        long = conditioning_for("sdxl", 1, 150).encode_prompt(
            [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2], [caption, "blue"], "cpu"
        )
        short = conditioning_for("sdxl").encode_prompt(
            [p.tokenizer, p.tokenizer_2], [p.text_encoder, p.text_encoder_2], [caption, "blue"], "cpu"
        )
    assert long["text_embeds"].shape[1] == 2 * 77
    torch.testing.assert_close(long["text_embeds"][:, :77], short["text_embeds"])
    torch.testing.assert_close(long["pooled_text_embeds"], short["pooled_text_embeds"])
