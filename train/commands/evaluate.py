"""``loracraft eval RUN_DIR``: did the LoRA learn the style, and what else did it change?

Three figures, all against the base on the same seeds (written to ``RUN_DIR/eval.json``):

(a) held-out denoising loss: the diffusion loss on held-out style images (shape/colour
    combinations never trained on), with noise and timesteps fixed per image, for the base
    and the adapter; reported as the relative reduction.
(b) style score (``loracraft.infer.toyworld.style_score``) of generations for held-out *trigger*
    prompts: base, LoRA, and the style set itself; ``progress`` = how far the LoRA moved from
    the base towards the style set (1 = all the way).
(c) drift on *non-trigger* prompts: mean absolute pixel difference base vs LoRA, as a fraction
    of the same difference on trigger prompts (a good style LoRA changes little without its
    trigger).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from loracraft.infer.errors import UsageError
from loracraft.infer.io import write_json_atomic

TRIGGER = " in lcstyle style"


def heldout_loss(pipe, images, resolution: int, seed: int = 1234) -> float:
    """Mean diffusion loss over the held-out images with per-image fixed noise and timesteps."""
    import torch
    from diffusers import DDPMScheduler

    from loracraft.infer.models import model_family
    from loracraft.train.conditioning import conditioning_for
    from loracraft.train.data import load_pixels, size_conditioning
    from loracraft.train.loss import diffusion_loss, sample_noise_and_timesteps, training_target

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    cond = conditioning_for(model_family(pipe))  # the trainer's own text/size conditioning (SD1 or SDXL)
    tokenizers = [pipe.tokenizer, getattr(pipe, "tokenizer_2", None)]
    encoders = [pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    n_enc = 2 if cond.family == "sdxl" else 1
    losses = []
    with torch.no_grad():
        for i in range(len(images)):
            target_size = (resolution, resolution)
            pixels, crop = load_pixels(images, i, target_size, True, False)
            latents = pipe.vae.encode(pixels[None]).latent_dist.mean * pipe.vae.config.scaling_factor
            noise, t = sample_noise_and_timesteps(tuple(latents.shape[1:]), [i], seed, sched.config.num_train_timesteps)
            text = cond.encode_prompt(tokenizers[:n_enc], encoders[:n_enc], [images.caption(i)], latents.device)
            size = size_conditioning(images.size(i), target_size, crop, False)[None]
            pred = pipe.unet(sched.add_noise(latents, noise, t), t, **cond.unet_kwargs(text, size)).sample
            target = training_target(sched, latents, noise, t, sched.config.prediction_type)
            losses.append(float(diffusion_loss(pred, target)))
    return float(np.mean(losses))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(getattr(g, "image", g), dtype=np.float64) for g in images])


def mean_abs_px(a, b) -> float:
    """Mean absolute pixel difference (0-255 scale) between two equally long image lists."""
    return float(np.abs(_pixels(a) - _pixels(b)).mean())


def drift_figures(base_trigger, lora_trigger, base_plain, lora_plain) -> dict:
    """How much the adapter changes images without its trigger, relative to with it."""
    trigger_shift, plain_shift = mean_abs_px(lora_trigger, base_trigger), mean_abs_px(lora_plain, base_plain)
    return {
        "plain_prompts_mean_abs_px": plain_shift, "trigger_prompts_mean_abs_px": trigger_shift,
        "ratio": plain_shift / trigger_shift if trigger_shift else float("nan"),
    }


def style_progress(base: float, lora: float, style_set: float) -> float:
    """Fraction of the way from the base's style score to the style set's (1 = all the way)."""
    return (lora - base) / (style_set - base) if style_set != base else float("nan")


def evaluate(run_dir: str | Path, heldout: str | Path | None = None, n_prompts: int = 8, seed: int = 0) -> dict:
    from loracraft.infer.adapters import load_adapter, set_scales
    from loracraft.infer.generation import generate
    from loracraft.infer.models import load_base
    from loracraft.infer.names import run_adapter_file
    from loracraft.infer.toyworld.style_score import mean_style_score
    from loracraft.train.data import load_captioned_images

    run_dir = Path(run_dir)
    manifest_path = run_dir / "run.json"
    if not run_adapter_file(run_dir).is_file() or not manifest_path.is_file():
        raise UsageError(f"no finished run in {run_dir}, train it first (loracraft train / loracraft demo)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    cfg = manifest["config"]
    heldout = Path(heldout) if heldout else Path(cfg["data"]["path"]).parent / "heldout"
    if not heldout.is_dir():
        raise UsageError(f"held-out split not found, {heldout}, pass --heldout DIR")
    images = load_captioned_images(str(heldout))
    res, v = cfg["data"]["resolution"], cfg["validation"]

    pipe = load_base(cfg["model"]["base"], revision=cfg["model"].get("revision"), variant=cfg["model"].get("variant"))
    adapter = load_adapter(pipe, run_adapter_file(run_dir))
    captions = sorted({images.caption(i) for i in range(len(images))})[:n_prompts]
    plain = [c.replace(TRIGGER, "") for c in captions]
    gen = dict(seed=seed, steps=v["steps"], guidance=v["guidance"], width=res, height=res)

    def run_at(scale: float) -> dict:
        set_scales(pipe, {adapter.name: scale})
        return {
            "loss": heldout_loss(pipe, images, res),
            "trigger": generate(pipe, captions, **gen),
            "plain": generate(pipe, plain, **gen),
        }

    base, lora = run_at(0.0), run_at(1.0)
    set_scales(pipe, {adapter.name: 1.0})
    style_set = mean_style_score(images.image(i) for i in range(len(images)))
    s_base = mean_style_score(g.image for g in base["trigger"])
    s_lora = mean_style_score(g.image for g in lora["trigger"])
    result = {
        "heldout_loss": {
            "base": base["loss"], "lora": lora["loss"],
            "relative_reduction": (base["loss"] - lora["loss"]) / base["loss"],
        },
        "style_score": {
            "base": s_base, "lora": s_lora, "style_set": style_set,
            "progress": style_progress(s_base, s_lora, style_set),
        },
        "drift": drift_figures(base["trigger"], lora["trigger"], base["plain"], lora["plain"]),
        "prompts": captions, "heldout": str(heldout), "seed": seed,
    }
    write_json_atomic(run_dir / "eval.json", result)
    return result


def format_eval(r: dict) -> str:
    h, s, d = r["heldout_loss"], r["style_score"], r["drift"]
    return "\n".join([
        f"held-out denoising loss: base {h['base']:.4f} -> LoRA {h['lora']:.4f} "
        f"({h['relative_reduction']:+.1%} reduction; goal >= 20%)",
        f"style score on held-out trigger prompts: base {s['base']:.3f}, LoRA {s['lora']:.3f}, "
        f"style set {s['style_set']:.3f} -> {s['progress']:.0%} of the way (goal >= 80%)",
        f"drift on non-trigger prompts: {d['plain_prompts_mean_abs_px']:.2f} px vs "
        f"{d['trigger_prompts_mean_abs_px']:.2f} px with trigger = {d['ratio']:.1%} (goal < 10%)",
    ])


def cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate(args.run_dir, args.heldout, seed=args.seed)
    print(format_eval(result))
    print(f"written to {Path(args.run_dir) / 'eval.json'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="measure a style LoRA against its base on a held-out split",
                       description="Held-out loss, style score and non-trigger drift; writes RUN_DIR/eval.json.")
    p.add_argument("run_dir")
    p.add_argument("--heldout", help="held-out imagefolder (default: <data.path>/../heldout)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_eval)
