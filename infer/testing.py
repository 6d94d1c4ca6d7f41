"""Builders of small offline Stable Diffusion models and datasets for tests, demos and benchmarks.

No hub access exists where loracraft is tested, so every model the tests touch is built
here, from a fixed seed, in plain diffusers format: the same code paths users run against
`runwayml/stable-diffusion-v1-5` run against these folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loracraft.infer.toyworld.scenes import COLOURS, SHAPES, write_captioned_dataset

__all__ = [
    "build_tokenizer",
    "build_tiny_sd",
    "build_tiny_sdxl",
    "write_captioned_dataset",
    "append_to_captions",
    "TINY_SD_SHAPE",
    "TINY_SDXL_SHAPE",
]

#: Words that become single tokens; everything else falls back to byte-level characters.
BASE_WORDS = (
    ["a", "an", "the", "on", "in", "of", "and", "with", "background", "style", "lcstyle", "photo", "sks"]
    + list(COLOURS)
    + list(SHAPES)
)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable-unicode map (same table as openai/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def build_tokenizer(out_dir: str | Path, words: list[str] | tuple[str, ...] = BASE_WORDS):
    """Write a CLIP BPE tokenizer whose listed words are single tokens, and load it.

    transformers 5 ignores ``vocab_file=``/``merges_file=`` passed to the constructor (it
    silently builds a 3-token vocabulary), so the files are written to a folder and loaded
    with ``from_pretrained`` - the path every real model takes anyway.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[str] = []
    for word in dict.fromkeys(words):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            line = f"{parts[0]} {parts[1]}"
            if line not in merges:
                merges.append(line)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    (out / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer.from_pretrained(str(out), pad_token="<|endoftext|>", model_max_length=77)
    tok.save_pretrained(str(out))
    return tok


def kl_vae(channels: tuple[int, ...], layers: int, norm_groups: int, sample_size: int, **extra):
    """An SD-style KL autoencoder (4 latent channels) downsampling by 2 per extra block."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        layers_per_block=layers,
        norm_num_groups=norm_groups,
        sample_size=sample_size,
        **extra,
    )


def clip_config(tokenizer, hidden: int, layers: int, heads: int = 4, ffn_mult: int = 2, **extra):
    """A CLIP text-encoder config sized ``hidden`` x ``layers`` over the offline tokenizer's vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * ffn_mult,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def sd_noise_schedule() -> dict:
    """SD1.x/SDXL's training noise schedule (scaled_linear 0.00085-0.012, 1000 steps)."""
    return dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def save_sd_pipeline(out: Path, **components) -> Path:
    """Save an SD1-architecture pipeline (no safety checker) and check trainers can read its
    scheduler as a DDPMScheduler."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(out))
    DDPMScheduler.from_pretrained(str(out), subfolder="scheduler")
    return out


#: Shapes of the tiny test model. Resolution 32 px -> 16x16 latents (VAE factor 2),
#: UNet downsamples once, so sizes must be multiples of 4.
TINY_SD_SHAPE = dict(
    unet_channels=(32, 64),
    vae_channels=(32, 64),
    text_hidden=32,
    text_layers=2,
    cross_attention_dim=32,
    sample_size=32,
)


def build_tiny_sd(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Build a random-initialised SD1-architecture pipeline in diffusers format.

    Small enough that a 20-step LoRA run takes seconds on 2 CPU cores, yet every component
    (cross-attention UNet, KL VAE, CLIP text encoder, BPE tokenizer, scheduler) is the real
    diffusers/transformers class, so loading and LoRA code paths are exercised for real.
    """
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = Path(out_dir)
    s = TINY_SD_SHAPE
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=s["sample_size"] // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=s["unet_channels"],
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=s["cross_attention_dim"],
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = kl_vae(s["vae_channels"], 1, 16, s["sample_size"])
    tokenizer = build_tokenizer(out / "tokenizer")
    text_encoder = CLIPTextModel(clip_config(tokenizer, s["text_hidden"], s["text_layers"]))
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type, **sd_noise_schedule())
    return save_sd_pipeline(out, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


#: Shapes of the tiny SDXL model. The two text encoders have *different* widths (and the pooled
#: projection a third one) so a swapped concatenation or the wrong pooled tensor is a shape error,
#: not a silent mistake. Same 32 px / multiple-of-4 geometry as the SD1 model.
TINY_SDXL_SHAPE = dict(
    unet_channels=(32, 64),
    vae_channels=(32, 64),
    text_hidden=32,
    text_hidden_2=48,
    projection_dim=40,
    text_layers=3,
    addition_time_embed_dim=8,
    sample_size=32,
)


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0, layers_per_block: int = 2) -> Path:
    """Build a random-initialised SDXL-architecture pipeline in diffusers format.

    The layout follows ``stabilityai/stable-diffusion-xl-base-1.0`` in miniature (diffusers' own
    SDXL test components are the model): a ``DownBlock2D`` then cross-attention blocks with
    ``layers_per_block=2`` (so kohya's SGM block numbering ``input_blocks_4_1`` maps exactly as on
    the real model), linear ``proj_in``, ``addition_embed_type="text_time"`` micro-conditioning,
    ``CLIPTextModel`` + ``CLIPTextModelWithProjection`` whose penultimate hidden states are
    concatenated (``cross_attention_dim`` = sum of both widths), the pooled projection plus six
    size/crop numbers feeding ``add_embedding``, an ``AutoencoderKL`` with SDXL's scaling factor
    0.13025, and SDXL's ``EulerDiscreteScheduler`` settings. ``layers_per_block=1`` gives an
    SDXL-architecture UNet whose SGM block numbering differs from the real model's.
    """
    from diffusers import (
        DDPMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    out = Path(out_dir)
    s = TINY_SDXL_SHAPE
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=s["sample_size"] // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=s["unet_channels"],
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        cross_attention_dim=s["text_hidden"] + s["text_hidden_2"],
        addition_embed_type="text_time",
        addition_time_embed_dim=s["addition_time_embed_dim"],
        # pooled text_encoder_2 projection + (original size, crop top-left, target size), 2 numbers each
        projection_class_embeddings_input_dim=s["projection_dim"] + 6 * s["addition_time_embed_dim"],
        norm_num_groups=16,
    )
    vae = kl_vae(s["vae_channels"], 1, 16, s["sample_size"], scaling_factor=0.13025, force_upcast=True)
    tokenizer = build_tokenizer(out / "tokenizer")
    tokenizer_2 = build_tokenizer(out / "tokenizer_2")

    text_encoder = CLIPTextModel(clip_config(tokenizer, s["text_hidden"], s["text_layers"]))
    text_encoder_2 = CLIPTextModelWithProjection(
        clip_config(tokenizer, s["text_hidden_2"], s["text_layers"], projection_dim=s["projection_dim"])
    )
    scheduler = EulerDiscreteScheduler(
        **sd_noise_schedule(),
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(str(out))
    DDPMScheduler.from_pretrained(str(out), subfolder="scheduler")
    return out


def append_to_captions(data_dir: str | Path, text: str, rows) -> Path:
    """Append `` text`` to the captions of ``rows`` (indices) in ``data_dir/metadata.jsonl``, e.g. a
    trigger phrase on part of a dataset; a caption already holding it is left alone."""
    meta = Path(data_dir) / "metadata.jsonl"
    entries = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    for i in rows:
        if text not in entries[i]["text"]:
            entries[i]["text"] = f"{entries[i]['text']} {text}"
    meta.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    return Path(data_dir)


def run_infer_cli(*argv) -> tuple[int, list[str]]:
    """In-process ``loracraft generate|convert ...`` as the entry point runs them: parse, dispatch,
    and map a LoracraftError to ``(exit code, problems)``; success is ``(0, [])``."""
    import argparse

    from loracraft.infer.cli import register
    from loracraft.infer.errors import LoracraftError

    parser = argparse.ArgumentParser(prog="loracraft")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    try:
        return args.func(args), []
    except LoracraftError as e:
        return e.exit_code, e.problems
