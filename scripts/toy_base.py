"""Pre-train the "toy base": a small Stable-Diffusion-architecture model of the scene world.

There is no hub access where loracraft is developed and tested, so the demo needs a base
model we can build ourselves in well under an hour of CPU, that (a) follows its prompts
("a red circle on a blue background") and (b) has never seen the lcstyle look, so that a
style LoRA visibly teaches it something. Recipe and sizes (measured on a 2-core CPU):

1. ``vae``     AutoencoderKL (32, 64, 64), 32 px -> 8x8x4 latents, MSE + 1e-4 KL, trained on
               VARIED images (plain scenes, styled scenes, stripes, checkers, gradients,
               outlines) so that the style survives encode -> decode; its ``scaling_factor``
               is set from the measured latent std of plain scenes.
2. ``cache``   a frozen, random-initialised CLIPTextModel (the UNet learns to read it) and
               its hidden states for the closed caption vocabulary; VAE posteriors of a
               fixed pool of PLAIN scenes (the UNet never sees the style).
3. ``unet``    UNet2DConditionModel (64, 128, 128), cross-attention at 8x8 and 4x4, epsilon
               prediction, AdamW + warm-up + cosine, EMA 0.999, 10 % caption dropout (CFG).
4. ``export``  EMA weights as an fp16 diffusers pipeline folder + model card with the
               probe accuracy, VAE PSNRs and style scores.

Every phase is resumable: finished phases leave a marker in the work directory, the VAE
and UNet phases checkpoint periodically (atomic writes) and draw each step's randomness
from a generator keyed by (seed, phase, step), so an interrupted build continues exactly
where it stopped instead of starting over.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from loracraft.infer.io import atomic_path, write_json_atomic, write_text_atomic
from loracraft.infer.toyworld.scenes import (
    COLOURS,
    Scene,
    all_combinations,
    random_scene,
    render,
    render_styled,
    shape_polygon,
)

__all__ = ["ToyBaseConfig", "build_toy_base", "vae_psnr", "vae_round_trip", "make_vae", "make_unet", "make_text_encoder"]

PX = 32
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@dataclass
class ToyBaseConfig:
    """Sizes and step counts of the build. Defaults are sized for ~40 min on 2 shared cores."""

    seed: int = 0
    vae_steps: int = 900
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_pool: int = 6000
    kl_weight: float = 1e-4
    unet_steps: int = 1300
    unet_batch: int = 64
    unet_lr: float = 1e-3
    unet_warmup: int = 100
    # A second cosine cycle (a warm restart, Loshchilov & Hutter 2017, SGDR) after the first:
    # the first cycle's steps are unchanged by it, so a finished build can be extended.
    unet_restart_steps: int = 700
    unet_restart_lr: float = 5e-4
    unet_restart_warmup: int = 50
    unet_pool: int = 16384
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    checkpoint_every: int = 100
    # Measured on this base (90 prompts, seeds 0..89 / 1000..1089): guidance 3 with 50 steps
    # reads best; at 4+ colours oversaturate (full accuracy 68 % at 4, 46 % at 6).
    probe_guidance: float = 3.0
    probe_steps: int = 50
    probe_n: int = 180  # every caption twice, each image its own seed


# ----------------------------------------------------------------------------- models


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=PX,
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=PX // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


# ------------------------------------------------------------------------- VAE images


def _rand_colour(rng: random.Random) -> tuple[int, int, int]:
    if rng.random() < 0.6:
        return COLOURS[rng.choice(list(COLOURS))]
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _stripes(rng: random.Random, px: int, ss: int = 4) -> Image.Image:
    big = px * ss
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    period = rng.uniform(4, 20) * ss
    duty = rng.uniform(0.25, 0.6)
    phase = rng.uniform(0, period)
    mask = ((xx * math.cos(ang) + yy * math.sin(ang) + phase) % period) < duty * period
    arr = np.empty((big, big, 3), np.uint8)
    arr[:] = _rand_colour(rng)
    arr[mask] = _rand_colour(rng)
    return Image.fromarray(arr).resize((px, px), Image.LANCZOS)


def _checker(rng: random.Random, px: int) -> Image.Image:
    cell = rng.randint(3, 12)
    yy, xx = np.mgrid[0:px, 0:px]
    mask = ((xx // cell + yy // cell) % 2) == 0
    arr = np.empty((px, px, 3), np.uint8)
    arr[:] = _rand_colour(rng)
    arr[mask] = _rand_colour(rng)
    return Image.fromarray(arr)


def _gradient(rng: random.Random, px: int) -> Image.Image:
    a, b = np.array(_rand_colour(rng), np.float32), np.array(_rand_colour(rng), np.float32)
    yy, xx = np.mgrid[0:px, 0:px].astype(np.float32) / (px - 1)
    ang = rng.uniform(0, 2 * math.pi)
    t = (xx - 0.5) * math.cos(ang) + (yy - 0.5) * math.sin(ang) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))


def _outlined_shapes(rng: random.Random, px: int, ss: int = 4) -> Image.Image:
    big = px * ss
    bg = (
        _stripes(rng, px).resize((big, big))
        if rng.random() < 0.3
        else Image.new("RGB", (big, big), _rand_colour(rng))
    )
    draw = ImageDraw.Draw(bg)
    for _ in range(rng.randint(1, 3)):
        s = random_scene(rng)
        kind, coords = shape_polygon(s, big)
        width = rng.randint(0, 4) * ss
        fill = _rand_colour(rng)
        outline = _rand_colour(rng) if width else None
        if kind == "ellipse":
            draw.ellipse(coords, fill=fill, outline=outline, width=width)
        else:
            draw.polygon(coords, fill=fill, outline=outline, width=width)
    return bg.resize((px, px), Image.LANCZOS)


def vae_image(rng: random.Random, px: int = PX) -> Image.Image:
    """One training image for the VAE: a mixture of the looks it must reconstruct."""
    r = rng.random()
    if r < 0.40:
        return render(random_scene(rng), px)
    if r < 0.65:
        return render_styled(random_scene(rng), px)
    if r < 0.75:
        return _stripes(rng, px)
    if r < 0.80:
        return _checker(rng, px)
    if r < 0.85:
        return _gradient(rng, px)
    return _outlined_shapes(rng, px)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> float tensor (N, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(im.convert("RGB"), np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def vae_round_trip(vae, x: torch.Tensor) -> torch.Tensor:
    """Encode (posterior mean) -> decode: the image a pipeline would show for latents that match
    ``x`` exactly, so what the VAE alone does to it."""
    return vae.decode(vae.encode(x).latent_dist.mean).sample


@torch.no_grad()
def vae_psnr(vae, images: list[Image.Image], batch: int = 64) -> float:
    """Mean PSNR (dB, 8-bit scale) of encode (posterior mean) -> decode over ``images``."""
    vals = []
    for i in range(0, len(images), batch):
        x = to_tensor(images[i : i + batch]).to(vae.dtype)
        rec = vae_round_trip(vae, x)
        mse = ((to_uint8(rec).float() - to_uint8(x).float()) ** 2).mean(dim=(1, 2, 3))
        vals.append(10 * torch.log10(255.0**2 / mse.clamp_min(1e-3)))
    return float(torch.cat(vals).mean())


def eval_images(kind: str, n: int, seed: int) -> list[Image.Image]:
    """Fresh (never trained on) evaluation images: ``plain`` or ``styled`` scenes."""
    rng = random.Random(10_000 + seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return [(render if kind == "plain" else render_styled)(s, PX) for s in scenes]


# ----------------------------------------------------------------------------- helpers


def _gen(seed: int, phase: int, step: int) -> torch.Generator:
    """The generator of one step: results do not depend on where a run was resumed."""
    return torch.Generator().manual_seed(seed * 1_000_003 + phase * 100_003 + step)


def _save_torch(obj, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


class _Timer:
    """Wall time per phase, summed over resumed runs, stored in ``work/timings.json``."""

    def __init__(self, work: Path):
        self.path = work / "timings.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def add(self, phase: str, seconds: float) -> None:
        self.data[phase] = round(self.data.get(phase, 0.0) + seconds, 1)
        write_json_atomic(self.path, self.data)


def _log(msg: str) -> None:
    print(f"[toy-base {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ phases


def train_vae(cfg: ToyBaseConfig, work: Path, timer: _Timer) -> Path:
    """Phase 1: the VAE. Returns the folder of the trained VAE (diffusers format, fp32)."""
    out = work / "vae"
    if (out / "config.json").exists():
        return out
    torch.manual_seed(cfg.seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, cfg.vae_steps, 50))
    ckpt = work / "vae-ckpt.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
        _log(f"vae: resuming at step {start}")
    t0 = time.time()
    rng = random.Random(cfg.seed)
    pool = to_tensor([vae_image(rng) for _ in range(cfg.vae_pool)])
    _log(f"vae: pool of {len(pool)} images in {time.time() - t0:.1f}s")
    vae.train()
    t_last = time.time()
    for step in range(start, cfg.vae_steps):
        g = _gen(cfg.seed, 1, step)
        x = pool[torch.randint(len(pool), (cfg.vae_batch,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = post.kl().mean() / z[0].numel()  # per latent element
        loss = mse + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        done = step + 1
        if done % 50 == 0:
            _log(
                f"vae step {done}/{cfg.vae_steps} mse {mse.item():.5f} kl {kl.item():.3f} "
                f"({(time.time() - t_last) / 50:.2f}s/step)"
            )
            t_last = time.time()
        if done % cfg.checkpoint_every == 0 or done == cfg.vae_steps:
            _save_torch(
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": done,
                },
                ckpt,
            )
            timer.add("vae", time.time() - t0)
            t0 = time.time()
    vae.eval()
    # scaling_factor: latents * factor should have unit std on the UNet's training data.
    with torch.no_grad():
        lat = vae.encode(to_tensor(eval_images("plain", 512, cfg.seed + 1))).latent_dist.mean
    std = float(lat.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    stats = {
        "latent_std": std,
        "psnr_plain": vae_psnr(vae, eval_images("plain", 256, cfg.seed)),
        "psnr_styled": vae_psnr(vae, eval_images("styled", 256, cfg.seed)),
    }
    _log(f"vae done: {stats}")
    tmp = work / "vae.tmp"
    vae.save_pretrained(str(tmp))
    write_json_atomic(tmp / "stats.json", stats)
    tmp.rename(out)
    timer.add("vae", time.time() - t0)
    return out


def captions() -> list[str]:
    """The closed caption vocabulary of the base: every plain scene caption, then ""."""
    return [Scene(s, c, b).caption for s, c, b in all_combinations()] + [""]


def build_cache(cfg: ToyBaseConfig, work: Path, timer: _Timer) -> Path:
    """Phase 2: tokenizer + frozen text encoder, their hidden states, plain-scene latents."""
    from diffusers import AutoencoderKL

    from loracraft.infer.testing import build_tokenizer

    out = work / "cache.pt"
    if out.exists():
        return out
    t0 = time.time()
    tokenizer = build_tokenizer(work / "tokenizer")
    torch.manual_seed(cfg.seed + 2)
    text_encoder = make_text_encoder(tokenizer).eval()
    text_encoder.save_pretrained(str(work / "text_encoder"))
    caps = captions()
    ids = tokenizer(
        caps,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        text = text_encoder(ids)[0]
    vae = AutoencoderKL.from_pretrained(str(work / "vae")).eval()
    rng = random.Random(cfg.seed + 3)
    index = {c: i for i, c in enumerate(caps)}
    scenes = [random_scene(rng) for _ in range(cfg.unet_pool)]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            post = vae.encode(to_tensor([render(s, PX) for s in scenes[i : i + 256]])).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    cache = {
        "mean": torch.cat(means) * vae.config.scaling_factor,
        "std": torch.cat(stds) * vae.config.scaling_factor,
        "caption": torch.tensor([index[s.caption] for s in scenes]),
        "text": text,
        "captions": caps,
    }
    _save_torch(cache, out)
    timer.add("cache", time.time() - t0)
    _log(f"cache: {len(scenes)} latents, {len(caps)} captions in {time.time() - t0:.1f}s")
    return out


def _unet_lr_factor(cfg: ToyBaseConfig, step: int) -> float:
    """LR multiplier: warm-up + cosine over unet_steps, then a warm-up + cosine restart."""
    if step < cfg.unet_steps:
        return _cosine(step, cfg.unet_steps, cfg.unet_warmup)
    restart = _cosine(step - cfg.unet_steps, cfg.unet_restart_steps, cfg.unet_restart_warmup)
    return cfg.unet_restart_lr / cfg.unet_lr * restart


def train_unet(cfg: ToyBaseConfig, work: Path, timer: _Timer) -> Path:
    """Phase 3: the UNet on plain scenes, EMA weights. Returns the EMA UNet's folder."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    out = work / "unet-ema"
    if (out / "config.json").exists():
        return out
    cache = torch.load(work / "cache.pt", weights_only=True)
    noise_sched = DDPMScheduler(**SCHEDULE)
    torch.manual_seed(cfg.seed + 4)
    unet = make_unet()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    total = cfg.unet_steps + cfg.unet_restart_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _unet_lr_factor(cfg, s))
    # EMA warm-up (decay 1 - (1 + step)^-3/4, capped at ema_decay): with ~1300 steps a fixed
    # 0.999 would still average in the weights of the first few hundred steps.
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ckpt = work / "unet-ckpt.pt"
    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        unet.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        ema.load_state_dict(state["ema"])
        start = state["step"]
        _log(f"unet: resuming at step {start}")
    empty = len(cache["captions"]) - 1
    n = len(cache["mean"])
    unet.train()
    t0 = t_last = time.time()
    for step in range(start, total):
        g = _gen(cfg.seed, 3, step)
        idx = torch.randint(n, (cfg.unet_batch,), generator=g)
        mean, std = cache["mean"][idx], cache["std"][idx]
        latents = mean + std * torch.randn(mean.shape, generator=g)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=g)
        cap = cache["caption"][idx]
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, empty), cap)
        noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cache["text"][cap]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        done = step + 1
        if done % 50 == 0:
            _log(
                f"unet step {done}/{total} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({(time.time() - t_last) / 50:.2f}s/step)"
            )
            t_last = time.time()
        if done % cfg.checkpoint_every == 0 or done == total:
            _save_torch(
                {
                    "model": unet.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "ema": ema.state_dict(),
                    "step": done,
                },
                ckpt,
            )
            timer.add("unet", time.time() - t0)
            t0 = time.time()
    ema.copy_to(unet.parameters())
    tmp = work / "unet-ema.tmp"
    unet.save_pretrained(str(tmp))
    tmp.rename(out)
    timer.add("unet", time.time() - t0)
    return out


def assemble(work: Path, dtype: torch.dtype = torch.float32):
    """The StableDiffusionPipeline made of the work directory's finished parts."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(work / "vae"), torch_dtype=dtype),
        text_encoder=CLIPTextModel.from_pretrained(str(work / "text_encoder"), dtype=dtype),
        tokenizer=CLIPTokenizer.from_pretrained(str(work / "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(str(work / "unet-ema"), torch_dtype=dtype),
        scheduler=PNDMScheduler(skip_prk_steps=True, steps_offset=1, prediction_type="epsilon", **SCHEDULE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export(cfg: ToyBaseConfig, work: Path, out: Path, timer: _Timer, command: str) -> Path:
    """Phase 4: fp16 pipeline folder + model card with the measured quality figures."""
    import shutil

    from diffusers import StableDiffusionPipeline

    from loracraft.infer.generation import make_grid
    from loracraft.infer.toyworld.probe import probe_pipeline, probe_prompts
    from loracraft.infer.toyworld.style_score import style_score

    if (work / "result.json").exists() and (out / "build.json").exists():
        return out
    t0 = time.time()
    pipe = assemble(work).to(torch.float16)
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    # transformers 5 loads with dtype="auto" by default, i.e. the dtype in config.json: say
    # float32 so a plain from_pretrained(dir) gives an all-fp32 pipeline (the diffusers
    # parts upcast anyway); a mixed fp16/fp32 pipeline fails in its first matmul.
    te_cfg = staging / "text_encoder" / "config.json"
    te = json.loads(te_cfg.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in te:
            te[key] = "float32"
    te_cfg.write_text(json.dumps(te, indent=2, sort_keys=True) + "\n")
    # Evaluate what users get: the stored fp16 weights, loaded and upcast to fp32.
    pipe = StableDiffusionPipeline.from_pretrained(str(staging), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    acc, images = probe_pipeline(
        pipe, probe_prompts(cfg.probe_n), seed=cfg.seed, guidance=cfg.probe_guidance, steps=cfg.probe_steps
    )
    rows = min(len(images), 90) // 15  # the 90 captions, 15 a row
    make_grid(images[: rows * 15], rows=rows, cols=15).save(work / "probe-grid.png")
    gen_scores = [style_score(im) for im in images]
    vae_stats = json.loads((work / "vae" / "stats.json").read_text())
    style_imgs = eval_images("styled", 256, cfg.seed)
    plain_imgs = eval_images("plain", 256, cfg.seed)
    result = {
        "probe": acc,
        "vae": vae_stats,
        "style_score": {
            "styled_renders": float(np.mean([style_score(im) for im in style_imgs])),
            "plain_renders": float(np.mean([style_score(im) for im in plain_imgs])),
            "base_generations": float(np.mean(gen_scores)),
            "base_generations_max": float(np.max(gen_scores)),
        },
    }
    timer.add("export", time.time() - t0)
    result["timings_s"] = timer.data
    write_json_atomic(staging / "build.json", {"config": asdict(cfg), **result})
    write_text_atomic(staging / "README.md", model_card(cfg, result, command))
    for f in staging.rglob("*"):  # atomic writes create 0600 files; package data must be readable
        f.chmod(0o755 if f.is_dir() else 0o644)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    write_json_atomic(work / "result.json", result)
    return out


def model_card(cfg: ToyBaseConfig, r: dict, command: str) -> str:
    t = r["timings_s"]
    total = sum(t.values())
    p, v, s = r["probe"], r["vae"], r["style_score"]
    return f"""# loracraft toy base

A small Stable-Diffusion-1-architecture model (diffusers format, fp16 safetensors)
pre-trained from scratch on procedural 32x32 scenes - "a red circle on a blue background":
6 colours x 3 shapes x 5 other backgrounds = 90 captions. It exists so that loracraft's
demo and tests can train a LoRA without hub access: the base follows its prompts, and has
never seen the *lcstyle* look (diagonal stripes + thick dark outline,
`loracraft.infer.toyworld.scenes.render_styled`), so a style LoRA has something visible to learn.

Load with `StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)`
(weights are stored in fp16 to keep the wheel small; they upcast losslessly). Generate at
32x32 (the default: UNet sample size 8 x VAE factor 4).

## Build
```
{command}
```
Seed {cfg.seed}. Deterministic and resumable phase by phase (`toy_base`).
Wall time on 2 shared CPU cores: VAE {t.get("vae", 0) / 60:.1f} min, cache {t.get("cache", 0) / 60:.1f} min,
UNet {t.get("unet", 0) / 60:.1f} min, export+evaluation {t.get("export", 0) / 60:.1f} min; total {total / 60:.1f} min.

| part | architecture |
|---|---|
| VAE | AutoencoderKL (32, 64, 64), 1 layer/block, 4 latent channels, x4 downsample, scaling_factor {1 / v["latent_std"]:.4f} (latent std {v["latent_std"]:.3f}) |
| UNet | UNet2DConditionModel (64, 128, 128), 1 layer/block, cross-attention at 8x8 and 4x4, epsilon prediction |
| text encoder | CLIPTextModel, hidden 64, 2 layers, random initialisation, frozen |
| tokenizer | offline CLIP BPE (`loracraft.infer.testing.build_tokenizer`) |
| scheduler | PNDM, scaled_linear 0.00085-0.012, 1000 steps (trained with DDPM) |

Training: VAE {cfg.vae_steps} steps, batch {cfg.vae_batch}, MSE + {cfg.kl_weight:g} KL, on a mixture of plain
scenes, styled scenes, stripes, checkers, gradients and outlined shapes. UNet {cfg.unet_steps} + {cfg.unet_restart_steps} steps,
batch {cfg.unet_batch}, AdamW {cfg.unet_lr:g} with {cfg.unet_warmup} warm-up steps and cosine decay, then a warm
restart at {cfg.unet_restart_lr:g} ({cfg.unet_restart_warmup} warm-up steps, cosine),
EMA {cfg.ema_decay}, {cfg.caption_dropout:.0%} caption dropout, on plain scenes only.

## Quality
- Probe (`loracraft.infer.toyworld.probe.probe_pipeline`): {cfg.probe_n} prompts (the 90 captions cycled), prompt i
  with seed {cfg.seed}+i, guidance {cfg.probe_guidance:g}, {cfg.probe_steps} PNDM steps, fp16 weights upcast to fp32:
  full-prompt accuracy **{p["full"]:.1%}** (shape {p["shape"]:.1%}, colour {p["colour"]:.1%},
  background {p["background"]:.1%}; chance ~1%). Use guidance 2.5-3 with this base: at 4 and above
  colours oversaturate (68 % full accuracy at 4, 46 % at 6, 25 steps).
- VAE encode->decode PSNR on fresh images: plain scenes {v["psnr_plain"]:.1f} dB, lcstyle scenes
  {v["psnr_styled"]:.1f} dB.
- Style score (`loracraft.infer.toyworld.style_score.style_score`, 1 = lcstyle): lcstyle renders
  {s["styled_renders"]:.3f}, plain renders {s["plain_renders"]:.3f}, this base's generations
  {s["base_generations"]:.3f} (max {s["base_generations_max"]:.3f}).
"""


#: Which phase each setting belongs to; a phase's settings may change until it has started.
_PHASE_OF = {
    "seed": "vae",
    "kl_weight": "vae",
    "unet_pool": "cache",
    "ema_decay": "unet",
    "caption_dropout": "unet",
    "probe_": "export",
}
#: Files whose presence in the work directory means a phase has started.
_STARTED = {
    "vae": ("vae-ckpt.pt", "vae"),
    "cache": ("cache.pt",),
    "unet": ("unet-ckpt.pt", "unet-ema"),
    "export": ("result.json",),
}


def _phase_of(key: str) -> str | None:
    for prefix, phase in _PHASE_OF.items():
        if key.startswith(prefix):
            return phase
    return key.split("_")[0] if key.split("_")[0] in _STARTED else None


def _check_config(cfg: ToyBaseConfig, work: Path) -> None:
    """Refuse settings that differ from those a started phase in ``work`` was run with."""
    path = work / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        for key, value in asdict(cfg).items():
            phase = _phase_of(key)
            if phase is None or old.get(key) == value:
                continue
            if any((work / f).exists() for f in _STARTED[phase]):
                raise ValueError(
                    f"{work} holds a toy-base build whose {phase} phase ran with {key}={old.get(key)!r}, "
                    f"not {value!r}; use another --work or the same settings"
                )
    write_json_atomic(path, asdict(cfg))


def build_toy_base(
    out: str | Path,
    work: str | Path,
    cfg: ToyBaseConfig | None = None,
    command: str = "python scripts/build_toy_base.py --out infer/assets/toy-base --work /tmp/toybase-work",
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build (or finish building) the toy base into ``out``, keeping state in ``work``.

    Re-running with the same ``work`` continues an interrupted build; a different
    configuration in an existing ``work`` directory is refused.
    """
    cfg = cfg or ToyBaseConfig()
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    _check_config(cfg, work)
    torch.set_num_threads(2)
    timer = _Timer(work)
    _log(f"phase vae -> {train_vae(cfg, work, timer)}")
    _log(f"phase cache -> {build_cache(cfg, work, timer)}")
    _log(f"phase unet -> {train_unet(cfg, work, timer)}")
    result = export(cfg, work, out, timer, command)
    _log(f"phase export -> {result}: {json.loads((work / 'result.json').read_text())}")
    return result
