"""Training-speed benchmark: loracraft's step against the floor and the diffusers reference.

What is measured, in one run and on the same data, for each model:

====  ======================================================================================
(a)   the *floor*: bare UNet forward + backward + AdamW with the same peft LoRA, on latents
      and text embeddings computed once beforehand; same dtype, threads, attention
      implementation and compile setting as (b) (checked, see ``describe_unet``).
(b)   loracraft's real optimizer step (``LoraTrainer.optimizer_step``) with ``train.cache=true``.
(c)   the same with ``train.cache=false`` (VAE + text encoder every step).
(d)   ``ReferenceRunner``: our own re-implementation of the per-step work of diffusers'
      ``examples/text_to_image/train_text_to_image_lora.py`` - image decode + resize/crop/
      flip/to-tensor/normalize in a torch DataLoader over a ``datasets`` imagefolder, then
      VAE encode + text encode + UNet forward/backward + clip + AdamW every step.
====  ======================================================================================

How:

- every variant lives in its own process, forked from a *forkserver* that has imported the
  heavy libraries once (fast start, and a fork-safe parent that never ran a parallel op);
  peak RSS is that process's ``getrusage(RUSAGE_SELF).ru_maxrss`` (plus the peak RSS of its
  DataLoader workers, if it has any), so variants cannot contaminate each other's peak; the
  baseline every process starts from (the imports) is reported beside it;
- all variants of a model are set up first (one at a time), then driven in *rounds*: each
  round runs one timed window of ``window`` steps in every variant, in a rotated order, while
  the others sit idle on their pipe - so load from other work on the machine hits all of them
  alike; ``warmup`` steps per variant are run first and discarded; steps/s is the median
  over the windows; CPU time per step (load-insensitive) and the median of per-round ratios
  are reported as cross-checks of every speed ratio;
- the one-time caching cost is the trainer's own timing of its cache fill (``LoraTrainer.timings``),
  otherwise setup time of (b) minus setup time of (c).

Adding a measurement line (e.g. the 1-vs-2-process throughput): a variant is an entry
of ``VARIANTS`` (how to build its runner, and ``processes`` - samples/s is computed from
``batch_size * processes``), and ``ratios()`` is the one place that turns the per-variant
figures into the printed/JSON ratios; a multi-process variant needs its own ``Worker`` kind
(launched with torchrun, rank 0 answering on the pipe) next to ``ForkWorker``/``InlineWorker``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

# ----------------------------------------------------------------------------- models
#: SD1.5's topology, scaled down: UNet channels (320, 640, 1280, 1280) / 5 -> 34.5 M params (the
#: size of model the diffusers reference script was timed on), cross-attention in
#: the first three of 4 down blocks, 2 layers per block; VAE (128, 256, 512, 512) / 4 with 4
#: blocks (downsample x8: latents at 1/8 of the image side); CLIP text encoder 768 x 12 -> 128 x 4.
#: At 64 px and batch 4 its VAE encode costs ~40% of a UNet fwd+bwd here, as in those notes.
SD15_SMALL_SHAPE = dict(
    unet_channels=(64, 128, 256, 256),
    unet_layers=2,
    vae_channels=(32, 64, 128, 128),
    vae_layers=2,
    text_hidden=128,
    text_layers=4,
    text_heads=4,
    cross_attention_dim=128,
    attention_head_dim=8,  # diffusers' name for the number of heads in SD1.x configs
    sample_size=64,
)


#: SD1.5 itself (860 M UNet, 123 M text encoder), random-initialised: the GPU benchmark at 512 px.
SD15_SHAPE = dict(
    unet_channels=(320, 640, 1280, 1280),
    unet_layers=2,
    vae_channels=(128, 256, 512, 512),
    vae_layers=2,
    text_hidden=768,
    text_layers=12,
    text_heads=12,
    cross_attention_dim=768,
    attention_head_dim=8,
    sample_size=512,
)


def build_sd15_small(
    out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon", shape: dict | None = None
) -> Path:
    """Build a random-initialised, SD1.5-shaped, scaled-down pipeline in diffusers format
    (``shape=SD15_SHAPE``: full size).

    Same architecture classes and topology as ``runwayml/stable-diffusion-v1-5`` (4 down
    blocks, cross-attention in 3, VAE factor 8, CLIP text encoder), so the balance between
    UNet, VAE and text encoder - what decides the cache's gain - has realistic proportions.
    """
    from diffusers import PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from loracraft.infer.testing import (
        build_tokenizer,
        clip_config,
        kl_vae,
        save_sd_pipeline,
        sd_noise_schedule,
    )

    out = Path(out_dir)
    s = shape or SD15_SMALL_SHAPE
    torch.manual_seed(seed)
    vae_factor = 2 ** (len(s["vae_channels"]) - 1)
    unet = UNet2DConditionModel(
        sample_size=s["sample_size"] // vae_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=s["unet_channels"],
        layers_per_block=s["unet_layers"],
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=s["cross_attention_dim"],
        attention_head_dim=s["attention_head_dim"],
        norm_num_groups=32,
    )
    vae = kl_vae(s["vae_channels"], s["vae_layers"], 32, s["sample_size"])
    tokenizer = build_tokenizer(out / "tokenizer")
    text_encoder = CLIPTextModel(
        clip_config(tokenizer, s["text_hidden"], s["text_layers"], heads=s["text_heads"], ffn_mult=4)
    )
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1, prediction_type=prediction_type, **sd_noise_schedule())
    return save_sd_pipeline(out, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)


def _build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    from loracraft.infer.testing import build_tiny_sd

    return build_tiny_sd(out_dir, seed=seed)


@dataclass(frozen=True)
class BenchModel:
    """A model to benchmark on: how to build it, and the training resolution it is measured at."""

    name: str
    builder: Callable[..., Path]
    resolution: int
    image_px: int  # side of the dataset's images (larger than resolution: resize is real work)


MODELS: dict[str, BenchModel] = {
    "sd15-small": BenchModel("sd15-small", build_sd15_small, resolution=64, image_px=128),
    "tiny": BenchModel("tiny", _build_tiny, resolution=32, image_px=64),
    # GPU only (a CPU step takes minutes): not in the default list.
    "sd15": BenchModel("sd15", functools.partial(build_sd15_small, shape=SD15_SHAPE), resolution=512, image_px=576),
}
DEFAULT_MODELS = ["sd15-small", "tiny"]


#: Appended to every other caption of the bench dataset, so that (f) preserves half of each batch.
#: Captions are padded to the tokenizer's length, so the other variants' work is unchanged.
PRESERVE_TRIGGER = "in lcstyle style"


def mark_half_styled(data_dir: Path, n: int) -> Path:
    """Even rows of the ``n``-image dataset get the trigger; odd rows stay plain (preserved in (f))."""
    from loracraft.infer.testing import append_to_captions

    return append_to_captions(data_dir, PRESERVE_TRIGGER, range(0, n, 2))


# ----------------------------------------------------------------------------- what one model's run shares
@dataclass
class BenchSpec:
    """Everything a variant needs to set itself up; identical for every variant of one model."""

    model: str
    model_dir: str
    data_dir: str
    work_dir: str
    resolution: int
    batch_size: int = 4
    rank: int = 4
    lr: float = 1e-4
    seed: int = 0
    threads: int = 2
    device: str = "cpu"  # cuda: the floor moves there; loracraft and (d) use accelerate's device
    center_crop: bool = True
    random_flip: bool = True
    max_grad_norm: float = 1.0
    num_workers: int = 0  # DataLoader workers of (d); the reference script's default is 0
    overrides: list[str] = field(default_factory=list)  # extra loracraft overrides for (b) and (c)

    def loracraft_overrides(self, cache: bool, out_dir: str, extra: tuple[str, ...] = ()) -> list[str]:
        return [
            f"data.resolution={self.resolution}",
            f"data.center_crop={str(self.center_crop).lower()}",
            f"data.random_flip={str(self.random_flip).lower()}",
            f"train.batch_size={self.batch_size}",
            f"train.lr={self.lr}",
            f"train.seed={self.seed}",
            f"train.max_grad_norm={self.max_grad_norm}",
            "train.max_steps=1000000000",
            f"lora.rank={self.rank}",
            f"lora.alpha={self.rank}",
            "lora.targets=attn",
            "checkpoint.every=1000000000",
            "output.report_to=[]",
            f"output.dir={out_dir}",
            f"train.cache={str(cache).lower()}",
            f"train.cache_dir={Path(out_dir).parent / 'cache'}",  # fresh per variant: a cold cache
            *self.overrides,
            *extra,
        ]

    def loracraft_config(self, cache: bool, out_dir: str, extra: tuple[str, ...] = ()):
        from loracraft.train.config import build_config

        return build_config(
            {"model": {"base": self.model_dir}, "data": {"path": self.data_dir}},
            self.loracraft_overrides(cache, out_dir, extra),
            source="benchmark",
        )


@dataclass(frozen=True)
class StepSettings:
    """The settings the floor must share with loracraft's step for the ratio to be honest."""

    mixed_precision: str = "no"
    compile: bool = False
    channels_last: bool = False
    gradient_checkpointing: bool = False

    @classmethod
    def from_config(cls, cfg) -> StepSettings:
        t = cfg.train
        return cls(
            mixed_precision=t.mixed_precision,
            compile=bool(getattr(t, "compile", False)),
            channels_last=bool(getattr(t, "channels_last", False)),
            gradient_checkpointing=bool(t.gradient_checkpointing),
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        return {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.mixed_precision]

    def autocast(self, device_type: str = "cpu"):
        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.weight_dtype)


def describe_unet(unet: torch.nn.Module) -> dict:
    """What decides a step's speed, as seen on the live model (compared between (a) and (b))."""
    base = getattr(unet, "_orig_mod", unet)
    base = getattr(base, "module", base)
    conv = base.conv_in.weight
    return {
        "threads": torch.get_num_threads(),
        "unet_dtype": str(conv.dtype).removeprefix("torch."),
        "attention": sorted({type(p).__name__ for p in base.attn_processors.values()}),
        "compiled": hasattr(unet, "_orig_mod") or hasattr(getattr(unet, "module", None), "_orig_mod"),
        "channels_last": bool(
            conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        ),
        "gradient_checkpointing": bool(getattr(base, "is_gradient_checkpointing", False)),
        "train_mode": base.training,
    }


def lora_modules(unet: torch.nn.Module) -> list[str]:
    """Sorted ``name:shape`` of every trainable parameter, wrapper prefixes removed."""
    out = []
    for name, p in unet.named_parameters():
        if p.requires_grad:
            for prefix in ("_orig_mod.", "module."):
                name = name.replace(prefix, "")
            out.append(f"{name}:{tuple(p.shape)}")
    return sorted(out)


# ----------------------------------------------------------------------------- reference transforms
# The reference script composes torchvision transforms; these are the same operations with
# PIL/numpy (torchvision is not a dependency): Resize(shorter side, bilinear), CenterCrop or
# RandomCrop, RandomHorizontalFlip(p=0.5) or nothing, ToTensor, Normalize(0.5, 0.5).
def ref_resize(img, size: int):
    from PIL import Image

    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return img.resize((nw, nh), Image.BILINEAR)


def ref_crop(img, size: int, center: bool, rng: random.Random):
    w, h = img.size
    if center:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    else:
        top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return img.crop((left, top, left + size, top + size))


def ref_to_normalized_tensor(img) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0  # ToTensor: [0, 1], CHW
    arr = (arr - 0.5) / 0.5  # Normalize([0.5], [0.5]): [-1, 1]
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class _ReferenceTransform:
    """The per-row ``with_transform`` of the reference: RGB convert, image transforms, tokenize."""

    def __init__(self, tokenizer, resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.tokenizer, self.resolution = tokenizer, resolution
        self.center_crop, self.random_flip = center_crop, random_flip
        self.rng = random.Random(seed)

    def image(self, img) -> torch.Tensor:
        from PIL import ImageOps

        img = ref_crop(
            ref_resize(img.convert("RGB"), self.resolution), self.resolution, self.center_crop, self.rng
        )
        if self.random_flip and self.rng.random() < 0.5:
            img = ImageOps.mirror(img)
        return ref_to_normalized_tensor(img)

    def __call__(self, rows: dict) -> dict:
        ids = self.tokenizer(
            list(rows["text"]),
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"pixel_values": [self.image(im) for im in rows["image"]], "input_ids": list(ids)}


def _reference_collate(rows: list[dict]) -> dict:
    pixels = torch.stack([r["pixel_values"] for r in rows]).to(memory_format=torch.contiguous_format).float()
    return {"pixel_values": pixels, "input_ids": torch.stack([r["input_ids"] for r in rows])}


# ----------------------------------------------------------------------------- runners (one per variant)
class Runner:
    """One variant: ``setup()`` once (returns extra figures), then ``run(n)`` steps (returns the last loss)."""

    def __init__(self, spec: BenchSpec, work: Path):
        self.spec, self.work = spec, work

    def setup(self) -> dict:
        raise NotImplementedError

    def run(self, steps: int) -> float:
        raise NotImplementedError

    def describe(self) -> dict:
        unet = self.unet
        return {
            "settings": describe_unet(unet),
            "lora_modules": lora_modules(unet),
            "lora_params": sum(p.numel() for p in unet.parameters() if p.requires_grad),
            "unet_params": sum(p.numel() for p in unet.parameters()),
        }


def floor_inputs_path(spec: BenchSpec) -> Path:
    return Path(spec.work_dir) / "floor_inputs.safetensors"


def prepare_floor_inputs(spec: BenchSpec) -> Path:
    """Latents (posterior mean x scaling factor) and text embeddings of the whole dataset, once.

    Computed here, outside every measured process, so the floor's process never holds the
    VAE or the text encoder.
    """
    from datasets import load_dataset
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    out = floor_inputs_path(spec)
    if out.is_file():
        return out
    ds = load_dataset("imagefolder", data_dir=spec.data_dir, split="train")
    tok = CLIPTokenizer.from_pretrained(spec.model_dir, subfolder="tokenizer")
    device = torch.device(spec.device)
    vae = AutoencoderKL.from_pretrained(spec.model_dir, subfolder="vae").eval().to(device)
    te = CLIPTextModel.from_pretrained(spec.model_dir, subfolder="text_encoder").eval().to(device)
    transform = _ReferenceTransform(tok, spec.resolution, True, False, spec.seed)
    with torch.no_grad():
        pixels = torch.stack([transform.image(im) for im in ds["image"]])
        means = [vae.encode(chunk.to(device)).latent_dist.mean.cpu() for chunk in pixels.split(8)]
        latents = torch.cat(means) * vae.config.scaling_factor
        ids = tok(
            list(ds["text"]),
            max_length=tok.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        text = te(ids.to(device))[0].cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"latents": latents.contiguous(), "text": text.contiguous()}, str(out))
    return out


class FloorRunner(Runner):
    """(a) UNet forward + backward + AdamW with the same LoRA, on precomputed inputs only."""

    def setup(self) -> dict:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from peft import LoraConfig
        from safetensors.torch import load_file

        from loracraft.train.config import ATTN_TARGETS

        s = self.spec
        # The same settings loracraft resolves from the same overrides (dtype, compile, layout).
        self.settings = StepSettings.from_config(s.loracraft_config(True, str(self.work / "unused")))
        torch.manual_seed(s.seed)
        inputs = load_file(str(floor_inputs_path(s)))
        self.latents, self.text = inputs["latents"], inputs["text"]
        self.scheduler = DDPMScheduler.from_pretrained(s.model_dir, subfolder="scheduler")
        unet = UNet2DConditionModel.from_pretrained(s.model_dir, subfolder="unet")
        unet.requires_grad_(False)
        if self.settings.weight_dtype != torch.float32:
            unet.to(dtype=self.settings.weight_dtype)
        if self.settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.add_adapter(
            LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian", target_modules=ATTN_TARGETS)
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if self.settings.channels_last:
            unet.to(memory_format=torch.channels_last)
        unet.eval()  # as loracraft's frozen base (no dropout anywhere: the mode changes no work)
        self.unet = torch.compile(unet) if self.settings.compile else unet
        self.optimizer = torch.optim.AdamW(params, lr=s.lr)
        self.order: list[int] = []
        self.gen = random.Random(s.seed)
        self.device = device = torch.device(s.device)
        unet.to(device)
        self.latents = self.latents.to(device, self.settings.weight_dtype)
        self.text = self.text.to(device, self.settings.weight_dtype)
        return {}

    def _indices(self) -> list[int]:
        while len(self.order) < self.spec.batch_size:
            perm = list(range(len(self.latents)))
            self.gen.shuffle(perm)
            self.order += perm
        idx, self.order = self.order[: self.spec.batch_size], self.order[self.spec.batch_size :]
        return idx

    def run(self, steps: int) -> float:
        import torch.nn.functional as F

        for _ in range(steps):
            idx = self._indices()
            latents, text = self.latents[idx], self.text[idx]
            noise = torch.randn_like(latents)
            t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), device=self.device)
            noisy = self.scheduler.add_noise(latents, noise, t)
            with self.settings.autocast(self.device.type):
                pred = self.unet(noisy, t, text).sample
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # reading the loss waits for the device: the window is complete


class LoracraftRunner(Runner):
    """(b)/(c)/(f) loracraft's ``LoraTrainer``: real ``setup()``, real ``optimizer_step()``."""

    def __init__(self, spec: BenchSpec, work: Path, cache: bool, extra: tuple[str, ...] = ()):
        super().__init__(spec, work)
        self.cache, self.extra = cache, extra

    def setup(self) -> dict:
        from accelerate.state import AcceleratorState

        from loracraft.train.trainer import LoraTrainer

        cfg = self.spec.loracraft_config(self.cache, str(self.work / "run"), self.extra)
        AcceleratorState._reset_state(reset_partial_state=True)
        self.trainer = trainer = LoraTrainer(cfg)
        trainer.setup()
        self.unet = trainer.accelerator.unwrap_model(trainer.unet)
        self.described_unet = trainer.unet
        return dict(trainer.timings)  # the one-time cache fill, timed by the trainer itself

    def describe(self) -> dict:
        d = super().describe()
        d["settings"]["compiled"] = d["settings"]["compiled"] or hasattr(self.described_unet, "_orig_mod")
        d["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
        return d

    def run(self, steps: int) -> float:
        for _ in range(steps):
            loss = self.trainer.optimizer_step()
        return float(loss.detach())


class ReferenceRunner(Runner):
    """(d) the per-step work of diffusers' ``train_text_to_image_lora.py``, re-implemented.

    Same order of setup (freeze -> cast frozen parts -> add LoRA -> AdamW -> prepare) and the
    same per-step work: a shuffled DataLoader over a ``datasets`` imagefolder whose transform
    decodes, resizes, crops, flips, normalizes and tokenizes each row; VAE encode (sampled
    posterior) and text encode every step; epsilon/v target; mean MSE; gathered loss read to
    the host; backward; clip (of nothing, as there - see ``setup``); AdamW; LR scheduler;
    progress bar.
    """

    def setup(self) -> dict:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from datasets import load_dataset
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from tqdm.auto import tqdm
        from transformers import CLIPTextModel, CLIPTokenizer

        from loracraft.train.config import ATTN_TARGETS

        s = self.spec
        # The script's --mixed_precision, set like loracraft's (fp32 unless overridden).
        precision = StepSettings.from_config(s.loracraft_config(False, str(self.work / "unused")))
        self.acc = acc = Accelerator(gradient_accumulation_steps=1, mixed_precision=precision.mixed_precision)
        set_seed(s.seed)
        base = s.model_dir
        self.noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
        self.vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
        for m in (unet, self.vae, self.text_encoder):
            m.requires_grad_(False)
            m.to(acc.device)
            if precision.weight_dtype != torch.float32:  # the script casts all frozen parts
                m.to(dtype=precision.weight_dtype)
        unet.add_adapter(
            LoraConfig(r=s.rank, lora_alpha=s.rank, init_lora_weights="gaussian", target_modules=ATTN_TARGETS)
        )
        # As in the reference: a filter iterator, consumed by the optimizer - so the script's later
        # clip_grad_norm_(lora_layers) receives an exhausted iterator and clips nothing. Kept: it
        # is the per-step work the reference really does.
        self.lora_layers = filter(lambda p: p.requires_grad, unet.parameters())
        optimizer = torch.optim.AdamW(
            self.lora_layers, lr=s.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8
        )
        ds = load_dataset("imagefolder", data_dir=s.data_dir, split="train")
        ds = ds.with_transform(
            _ReferenceTransform(tokenizer, s.resolution, s.center_crop, s.random_flip, s.seed)
        )
        loader = torch.utils.data.DataLoader(
            ds,
            shuffle=True,
            collate_fn=_reference_collate,
            batch_size=s.batch_size,
            num_workers=s.num_workers,
        )
        lr_scheduler = get_scheduler(
            "constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=10**9
        )
        self.unet, self.optimizer, self.loader, self.lr_scheduler = acc.prepare(
            unet, optimizer, loader, lr_scheduler
        )
        self.weight_dtype = precision.weight_dtype  # a local in the script (ModelMixin.dtype is slow)
        self.unet.train()
        self.batches = iter(self.loader)
        self.bar = tqdm(total=10**9, desc="Steps", file=sys.stderr, disable=not acc.is_local_main_process)
        self.global_step = 0
        return {}

    def _next_batch(self) -> dict:
        try:
            return next(self.batches)
        except StopIteration:  # a new epoch, as the reference's `for epoch ...` loop starts one
            self.unet.train()
            self.batches = iter(self.loader)
            return next(self.batches)

    def run(self, steps: int) -> float:
        import torch.nn.functional as F

        acc, sched = self.acc, self.noise_scheduler
        for _ in range(steps):
            batch = self._next_batch()
            train_loss = 0.0
            with acc.accumulate(self.unet):
                pixels = batch["pixel_values"].to(dtype=self.weight_dtype)
                latents = self.vae.encode(pixels).latent_dist.sample()
                latents = latents * self.vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(
                    0, sched.config.num_train_timesteps, (bsz,), device=latents.device
                ).long()
                noisy = sched.add_noise(latents, noise, timesteps)
                text = self.text_encoder(batch["input_ids"], return_dict=False)[0]
                if sched.config.prediction_type == "v_prediction":
                    target = sched.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                pred = self.unet(noisy, timesteps, text, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                avg_loss = acc.gather(loss.repeat(self.spec.batch_size)).mean()
                train_loss += avg_loss.item()
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.lora_layers, self.spec.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad()
            if acc.sync_gradients:
                self.bar.update(1)
                self.global_step += 1
                acc.log({"train_loss": train_loss}, step=self.global_step)
            self.bar.set_postfix(step_loss=loss.detach().item(), lr=self.lr_scheduler.get_last_lr()[0])
        return float(loss.detach())

    def describe(self) -> dict:
        d = super().describe()
        d["settings"] = describe_unet(self.acc.unwrap_model(self.unet))
        return d


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    make: Callable[[BenchSpec, Path], Runner]
    processes: int = 1  # samples per step = batch_size * processes


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("a", "floor: UNet fwd+bwd+AdamW, precomputed inputs", FloorRunner),
        Variant("b", "loracraft, train.cache=true", lambda s, w: LoracraftRunner(s, w, cache=True)),
        Variant("c", "loracraft, train.cache=false", lambda s, w: LoracraftRunner(s, w, cache=False)),
        Variant("d", "diffusers reference script (re-implemented)", ReferenceRunner),
        # Issue 7: the same work split over 2 DDP processes (gloo on CPU), the cores shared between
        # them (threads per process = --threads / 2), so (e)/(b) in samples/s is the scaling figure.
        Variant("e", "loracraft, train.cache=true, 2 procs (torchrun)",
                lambda s, w: LoracraftRunner(s, w, cache=True), processes=2),
        # (b) plus `preserve`: half of every batch also runs the base (adapters off, no grad), so
        # (f)/(b) is the price of base-prediction regularisation.
        Variant("f", "loracraft, train.cache=true, preserve (1/2 rows)",
                lambda s, w: LoracraftRunner(s, w, cache=True, extra=(f"preserve.trigger={PRESERVE_TRIGGER}",))),
    )
}

#: What a plain ``BenchConfig()`` measures; ``quick()`` leaves out the multi-process variant.
DEFAULT_VARIANTS = ["a", "b", "c", "d", "e", "f"]


# ----------------------------------------------------------------------------- workers (process isolation)
#: Imported once by the forkserver so each variant's process starts in milliseconds.
_PRELOAD = [
    "torch",
    "numpy",
    "PIL.Image",
    "safetensors.torch",
    "datasets",
    "transformers",
    "peft",
    "accelerate",
    "diffusers",
    "diffusers.models.unets.unet_2d_condition",
    "diffusers.models.autoencoders.autoencoder_kl",
    "transformers.models.clip.modeling_clip",
    "loracraft.train.trainer",
    "bench.train",
]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _children_usage() -> tuple[float, float]:
    """(RSS MB, CPU s) summed over this process's live descendants, e.g. DataLoader workers.

    Neither ``ru_maxrss`` nor ``process_time`` sees them; a variant that moves work into
    worker processes must not look cheaper for it. Summed RSS counts pages shared with the
    parent once per process: a pessimistic figure for whoever uses workers. (psutil comes
    with accelerate.)
    """
    import psutil

    rss = cpu = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            rss += child.memory_info().rss
            t = child.cpu_times()
            cpu += t.user + t.system
        except psutil.Error:
            pass
    return rss / 2**20, cpu


class VariantServer:
    """Answers the commands of one variant: setup / run N steps / quit (timed inside the process)."""

    def __init__(self, variant: str, spec: BenchSpec, fresh: bool = True):
        self.variant, self.spec = variant, spec
        self.fresh = fresh  # False in the ranks of a multi-process variant: the launcher cleans once
        self.runner: Runner | None = None
        self.children_rss_mb = 0.0  # peak, sampled after setup and after every window

    def _cpu_now(self) -> float:
        rss, cpu = _children_usage()
        self.children_rss_mb = max(self.children_rss_mb, rss)
        return time.process_time() + cpu

    def handle(self, msg: dict) -> dict:
        try:
            if msg["cmd"] == "setup":
                start_rss = _maxrss_mb()
                if self.spec.device == "cpu":  # accelerate would pick a GPU if it saw one
                    os.environ["CUDA_VISIBLE_DEVICES"] = ""
                torch.set_num_threads(self.spec.threads)
                work = Path(self.spec.work_dir) / self.variant
                if self.fresh:
                    shutil.rmtree(work, ignore_errors=True)  # a cold cache and a fresh run every time
                work.mkdir(parents=True, exist_ok=True)
                self.runner = VARIANTS[self.variant].make(self.spec, work)
                t0 = time.perf_counter()
                extra = self.runner.setup()
                setup_s = time.perf_counter() - t0
                self._cpu_now()
                if torch.cuda.is_initialized():  # the peak of the steps, not of loading
                    torch.cuda.reset_peak_memory_stats()
                return {"setup_s": setup_s, "start_rss_mb": start_rss, **extra, **self.runner.describe()}
            if msg["cmd"] == "run":
                t0, c0 = time.perf_counter(), self._cpu_now()
                loss = self.runner.run(msg["steps"])
                seconds = time.perf_counter() - t0
                return {"seconds": seconds, "cpu_seconds": self._cpu_now() - c0, "loss": loss}
            if msg["cmd"] == "quit":
                own = _maxrss_mb()
                gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None
                return {
                    "peak_gpu_mb": gpu,
                    "peak_rss_mb": own + self.children_rss_mb,
                    "own_peak_rss_mb": own,
                    "children_peak_rss_mb": self.children_rss_mb,
                }
            return {"error": f"unknown command {msg['cmd']!r}"}
        except Exception:
            return {"error": traceback.format_exc()}


def _worker_main(conn, variant: str, spec_dict: dict, log_path: str) -> None:
    """Entry point of a forked variant process: library output goes to a log file."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    _serve(conn, VariantServer(variant, BenchSpec(**spec_dict)))


def _serve(conn, server: VariantServer) -> None:
    """Answer commands until quit, an error, or the benchmark process is gone."""
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        reply = server.handle(msg)
        conn.send(reply)
        if msg["cmd"] == "quit" or "error" in reply:
            break
    conn.close()


class BenchError(RuntimeError):
    pass


class ForkWorker:
    """A variant in its own process (forked from the preloaded forkserver), driven over a pipe."""

    isolated = True
    _ctx = None

    @classmethod
    def context(cls):
        if cls._ctx is None:
            import multiprocessing as mp

            cls._ctx = mp.get_context("forkserver")
            cls._ctx.set_forkserver_preload(_PRELOAD)
        return cls._ctx

    def __init__(self, variant: str, spec: BenchSpec):
        ctx = self.context()
        self.variant = variant
        self.log = Path(spec.work_dir) / f"{variant}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, variant, asdict(spec), str(self.log)), daemon=True
        )
        self.proc.start()
        child.close()

    def ask(self, msg: dict) -> dict:
        self.conn.send(msg)
        try:
            reply = self.conn.recv()
        except EOFError:
            reply = {"error": f"process died (exit code {self.proc.exitcode})"}
        if "error" in reply:
            tail = self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""
            raise BenchError(f"variant ({self.variant}) failed: {reply['error']}\n--- log tail ---\n{tail}")
        return reply

    def close(self) -> None:
        self.conn.close()
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


class TorchrunWorker:
    """A multi-process variant: ``torchrun --standalone`` starts the ranks (``_rank_main``); each
    rank connects back to a local listener and answers the same commands as a ``ForkWorker``.

    Every command goes to every rank (DDP steps only finish together); a window's time is the
    slowest rank's, CPU seconds and peak RSS are summed over ranks.
    """

    isolated = True

    def __init__(self, variant: str, spec: BenchSpec):
        import json
        import subprocess
        from multiprocessing.connection import Listener

        n = VARIANTS[variant].processes
        self.variant = variant
        work = Path(spec.work_dir) / variant
        shutil.rmtree(work, ignore_errors=True)  # once, before any rank starts
        self.log = Path(spec.work_dir) / f"{variant}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        secret = os.urandom(16)
        self.listener = Listener(("127.0.0.1", 0), authkey=secret)
        rank_spec = replace(spec, threads=max(1, spec.threads // n))  # the cores are shared
        env = {
            **os.environ,
            "LORACRAFT_BENCH_ADDRESS": f"{self.listener.address[0]}:{self.listener.address[1]}",
            "LORACRAFT_BENCH_AUTHKEY": secret.hex(),
            "LORACRAFT_BENCH_VARIANT": variant,
            "LORACRAFT_BENCH_SPEC": json.dumps(asdict(rank_spec)),
            "OMP_NUM_THREADS": str(rank_spec.threads),
            # `bench` lives in scripts/, outside the installed package: the ranks import it from there.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH")])),
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                 "-m", "bench.train"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.conns = [None] * n
        for _ in range(n):  # each rank says which it is
            conn = self._accept()
            self.conns[conn.recv()["rank"]] = conn

    def _accept(self):
        import threading

        box: list = []
        thread = threading.Thread(target=lambda: box.append(self.listener.accept()), daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
            if self.proc.poll() is not None and not box:
                self._fail(f"torchrun exited with code {self.proc.returncode} before every rank connected")
        return box[0]

    def _fail(self, what: str):
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.is_file() else ""
        raise BenchError(f"variant ({self.variant}) failed: {what}\n--- log tail ---\n{tail}")

    def ask(self, msg: dict) -> dict:
        for conn in self.conns:
            conn.send(msg)
        replies = []
        for conn in self.conns:
            try:
                replies.append(conn.recv())
            except EOFError:
                replies.append({"error": f"a rank died (torchrun exit code {self.proc.poll()})"})
        errors = [r["error"] for r in replies if "error" in r]
        if errors:
            self._fail(errors[0])
        out = dict(replies[0])
        if msg["cmd"] == "run":
            out["seconds"] = max(r["seconds"] for r in replies)
            out["cpu_seconds"] = sum(r["cpu_seconds"] for r in replies)
        elif msg["cmd"] == "quit":
            for key in ("peak_rss_mb", "own_peak_rss_mb", "children_peak_rss_mb"):
                out[key] = sum(r[key] for r in replies)
        elif msg["cmd"] == "setup":
            out["start_rss_mb"] = sum(r["start_rss_mb"] for r in replies)
        return out

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None:
                conn.close()
        self.listener.close()
        try:
            self.proc.wait(timeout=60)
        except Exception:
            os.killpg(self.proc.pid, 9)  # its own session: the ranks go with it
            self.proc.wait()


def _rank_main() -> None:
    """One rank of a ``TorchrunWorker`` variant (``python -m bench.train`` under torchrun)."""
    import json
    from multiprocessing.connection import Client

    host, port = os.environ["LORACRAFT_BENCH_ADDRESS"].rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ["LORACRAFT_BENCH_AUTHKEY"]))
    conn.send({"rank": int(os.environ["RANK"])})
    spec = BenchSpec(**json.loads(os.environ["LORACRAFT_BENCH_SPEC"]))
    _serve(conn, VariantServer(os.environ["LORACRAFT_BENCH_VARIANT"], spec, fresh=False))


class InlineWorker:
    """A variant in this process (tests, debugging): same commands; RSS figures are the process's."""

    isolated = False

    def __init__(self, variant: str, spec: BenchSpec):
        import signal

        self.variant = variant
        self.server = VariantServer(variant, spec)
        # Process-wide state a variant's setup changes (threads; LoraTrainer: deterministic
        # algorithms, SIGINT/SIGTERM handlers): given back to the caller on close().
        self._threads = torch.get_num_threads()
        self._deterministic = torch.are_deterministic_algorithms_enabled()
        self._handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def ask(self, msg: dict) -> dict:
        reply = self.server.handle(msg)
        if "error" in reply:
            raise BenchError(f"variant ({self.variant}) failed: {reply['error']}")
        return reply

    def close(self) -> None:
        import signal

        self.server = None
        gc.collect()
        torch.set_num_threads(self._threads)
        torch.use_deterministic_algorithms(self._deterministic)
        for sig, handler in self._handlers.items():
            if handler is not None:  # None: installed outside Python, cannot be re-installed
                signal.signal(sig, handler)


# ----------------------------------------------------------------------------- measurement
@dataclass
class BenchConfig:
    """One benchmark run. ``quick()`` is the configuration of ``--quick`` and of the test."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    batch_size: int = 4
    rank: int = 4
    images: int = 32  # dataset size; one epoch = ceil(images / batch_size) steps
    warmup: int = 3  # steps per variant before timing, discarded
    window: int = 3  # steps per timed window (short: neighbouring windows see the same machine load)
    rounds: int = 10  # timed windows per variant (steps/s = median over them)
    threads: int = field(default_factory=torch.get_num_threads)
    device: str = "cpu"
    seed: int = 0
    center_crop: bool = True
    random_flip: bool = True
    num_workers: int = 0
    overrides: list[str] = field(default_factory=list)  # extra loracraft overrides for (b) and (c)
    isolate: bool = True  # one process per variant (needed for per-variant peak RSS)
    work_dir: str | None = None  # default: a temporary folder, removed afterwards

    @classmethod
    def quick(cls, **kw) -> BenchConfig:
        return replace(cls(models=["tiny"], variants=list("abcdf"), images=8, warmup=1, window=2, rounds=2), **kw)


def _summarize(
    variant: str, spec: BenchSpec, setup: dict, windows: list[dict], quit_: dict, isolated: bool
) -> dict:
    v = VARIANTS[variant]
    speeds = [w["steps"] / w["seconds"] for w in windows]
    steps_per_s = statistics.median(speeds)
    return {
        "label": v.label,
        "processes": v.processes,
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * spec.batch_size * v.processes,
        "ms_per_step": 1000.0 / steps_per_s,
        # CPU time of the variant's process (and its DataLoader workers, if any) per step: much
        # less sensitive to other load on the machine than wall time (with 1 thread it is the
        # work itself; with more it includes OpenMP spin-waiting).
        "cpu_ms_per_step": statistics.median(1000.0 * w["cpu_seconds"] / w["steps"] for w in windows),
        "window_steps_per_s": speeds,
        "setup_s": setup["setup_s"],
        "cache_s": setup.get("cache_s"),
        "cache_cpu_s": setup.get("cache_cpu_s"),
        "start_rss_mb": setup["start_rss_mb"] if isolated else None,
        "peak_rss_mb": quit_["peak_rss_mb"] if isolated else None,
        "children_peak_rss_mb": quit_["children_peak_rss_mb"] if isolated else None,
        "peak_gpu_mb": quit_.get("peak_gpu_mb"),  # torch.cuda.max_memory_allocated over the timed steps
        "settings": setup["settings"],
        "deterministic_algorithms": setup.get("deterministic_algorithms", False),
        # The JSON keeps a count and a digest of the ``name:shape`` list (hundreds of entries).
        "lora_tensors": len(setup["lora_modules"]),
        "lora_modules_sha256": hashlib.sha256("\n".join(setup["lora_modules"]).encode()).hexdigest(),
        "lora_params": setup["lora_params"],
        "unet_params": setup["unet_params"],
    }


#: The speed ratios (x)/(y) reported for every model (None where a variant was not measured).
RATIO_PAIRS = [("b", "a"), ("b", "d"), ("c", "a"), ("d", "a"), ("b", "c"), ("f", "b")]


def ratios(result: dict, spec: BenchSpec) -> dict:
    """The headline figures, from one model's per-variant results (None when not measured).

    This is the place to add a ratio line (e.g. the samples/s of 2 processes over 1).
    """
    v = result["variants"]
    pairs = [(x, y) for x, y in RATIO_PAIRS if x in v and y in v]
    # Speed ratio = ratio of the median steps/s (wall clock), the headline figure; two cross-checks:
    # "paired" = median over rounds of the ratio within a round (both windows ran back to back,
    # under nearly the same load), "cpu" = ratio of CPU time per step (load-insensitive).
    out: dict = {f"{x}/{y}": v[x]["steps_per_s"] / v[y]["steps_per_s"] for x, y in pairs}
    out["paired"] = {
        f"{x}/{y}": statistics.median(
            sx / sy for sx, sy in zip(v[x]["window_steps_per_s"], v[y]["window_steps_per_s"], strict=True)
        )
        for x, y in pairs
    }
    out["cpu"] = {f"{x}/{y}": v[y]["cpu_ms_per_step"] / v[x]["cpu_ms_per_step"] for x, y in pairs}
    for x, y in RATIO_PAIRS:
        out.setdefault(f"{x}/{y}", None)
    out["samples_e/samples_b"] = None
    if "b" in v and "e" in v:  # throughput of 2 processes over 1, the same cores
        n = v["e"]["processes"] / v["b"]["processes"]  # samples per step, per process batch alike
        out["samples_e/samples_b"] = v["e"]["samples_per_s"] / v["b"]["samples_per_s"]
        out["paired"]["samples_e/samples_b"] = statistics.median(
            n * se / sb for se, sb in zip(v["e"]["window_steps_per_s"], v["b"]["window_steps_per_s"], strict=True)
        )
    rss = [v.get(k, {}).get("peak_rss_mb") for k in ("b", "d")]
    out["rss_b/rss_d"] = rss[0] / rss[1] if all(rss) else None
    out["cache_cost_s"] = out["uncached_epoch_s"] = out["cache_cost_epoch_fraction"] = None
    if "b" in v and "c" in v:
        cost = v["b"]["cache_s"]
        out["cache_cost_source"] = "timed cache fill" if cost is not None else "setup(b) - setup(c)"
        if cost is None:
            cost = v["b"]["setup_s"] - v["c"]["setup_s"]
        epoch_steps = math.ceil(result["images"] / spec.batch_size)
        epoch_s = epoch_steps / v["c"]["steps_per_s"]
        out.update(cache_cost_s=cost, uncached_epoch_s=epoch_s, cache_cost_epoch_fraction=cost / epoch_s)
        if v["b"].get("cache_cpu_s") is not None:  # the same fraction in CPU time (load-insensitive)
            epoch_cpu_s = epoch_steps * v["c"]["cpu_ms_per_step"] / 1000.0
            out["cpu"]["cache_cost_epoch_fraction"] = v["b"]["cache_cpu_s"] / epoch_cpu_s
    return out


def checks(result: dict) -> dict:
    """Honesty checks: (a) and (b) train the same LoRA modules under the same step settings."""
    v = result["variants"]
    out: dict = {}
    if "a" in v and "b" in v:
        out["same_lora_modules_a_b"] = v["a"]["lora_modules_sha256"] == v["b"]["lora_modules_sha256"]
        sa, sb = v["a"]["settings"], v["b"]["settings"]
        out["settings_mismatch_a_b"] = {
            k: [sa.get(k), sb.get(k)] for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)
        }
    if "d" in v and "b" in v:
        out["same_lora_modules_d_b"] = v["d"]["lora_modules_sha256"] == v["b"]["lora_modules_sha256"]
    return out


def _ask_all(workers: dict, msg: dict) -> dict:
    return {k: w.ask(msg) for k, w in workers.items()}


def prepare_model(
    model: BenchModel, cfg: BenchConfig, root: Path, model_dir: str | Path | None = None
) -> BenchSpec:
    """Build ``model`` (unless ``model_dir`` holds it already) and its dataset under ``root``."""
    from loracraft.infer.testing import write_captioned_dataset

    mroot = root / model.name
    model_dir = Path(model_dir) if model_dir else mroot / "model"
    if not (model_dir / "model_index.json").is_file():
        model.builder(model_dir, seed=cfg.seed)
    data_dir = write_captioned_dataset(mroot / "data", n=cfg.images, px=model.image_px, seed=cfg.seed)
    mark_half_styled(data_dir, cfg.images)
    spec = BenchSpec(
        model=model.name,
        model_dir=str(model_dir),
        data_dir=str(data_dir),
        work_dir=str(mroot / "work"),
        resolution=model.resolution,
        batch_size=cfg.batch_size,
        rank=cfg.rank,
        seed=cfg.seed,
        threads=cfg.threads,
        device=cfg.device,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        num_workers=cfg.num_workers,
        overrides=list(cfg.overrides),
    )
    return spec


def measure_model(
    model: BenchModel,
    cfg: BenchConfig,
    root: Path,
    log: Callable[[str], None] = print,
    model_dir: str | Path | None = None,
) -> dict:
    """Build ``model`` and its dataset under ``root`` (``prepare_model``), and measure every
    variant of ``cfg`` on them.

    Variants run in processes started by multiprocessing's forkserver, which imports the
    caller's ``__main__`` module in each: scripts calling this need the usual
    ``if __name__ == "__main__":`` guard.
    """
    spec = prepare_model(model, cfg, root, model_dir)
    if "a" in cfg.variants:
        prepare_floor_inputs(spec)
    worker_cls = ForkWorker if cfg.isolate else InlineWorker
    multi = [k for k in cfg.variants if VARIANTS[k].processes > 1]
    if multi and not cfg.isolate:
        raise ValueError(f"variant(s) {multi} run several processes: they cannot run in-process")
    workers = {k: (TorchrunWorker if VARIANTS[k].processes > 1 else worker_cls)(k, spec) for k in cfg.variants}
    try:
        setups = {}
        for k, w in workers.items():  # one at a time: setup times are not contended
            log(f"  [{model.name}] setting up ({k}) {VARIANTS[k].label}")
            setups[k] = w.ask({"cmd": "setup"})
        log(f"  [{model.name}] warm-up: {cfg.warmup} steps each")
        _ask_all(workers, {"cmd": "run", "steps": cfg.warmup})
        windows: dict[str, list[dict]] = {k: [] for k in workers}
        keys = list(workers)
        for r in range(cfg.rounds):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotate: no variant always goes first
            for k in order:
                windows[k].append(
                    {"steps": cfg.window, **workers[k].ask({"cmd": "run", "steps": cfg.window})}
                )
            log(
                f"  [{model.name}] round {r + 1}/{cfg.rounds}: "
                + "  ".join(f"({k}) {cfg.window / windows[k][-1]['seconds']:.2f}" for k in keys)
                + " steps/s"
            )
        quits = _ask_all(workers, {"cmd": "quit"})
    finally:
        for w in workers.values():
            w.close()
    isolated = worker_cls.isolated
    result = {
        "model": model.name,
        "resolution": model.resolution,
        "image_px": model.image_px,
        "images": cfg.images,
        "isolated": isolated,
        "variants": {k: _summarize(k, spec, setups[k], windows[k], quits[k], isolated) for k in keys},
    }
    result["ratios"] = ratios(result, spec)
    result["checks"] = checks(result)
    return result


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Measure every model of ``cfg``; returns the JSON-able results (see ``format_report``)."""
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("HF_DATASETS_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(key, value)
    unknown = [m for m in cfg.models if m not in MODELS] + [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(
            f"unknown model/variant {unknown}; models: {list(MODELS)}, variants: {list(VARIANTS)}"
        )
    root = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="loracraft-bench-"))
    started = time.time()
    load_before = os.getloadavg()
    try:
        models = {}
        for name in cfg.models:
            log(f"model {name}")
            models[name] = measure_model(MODELS[name], cfg, root, log)
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "config": asdict(cfg),
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": torch.cuda.get_device_name(0) if cfg.device == "cuda" else None,
            "threads": cfg.threads,
            # OpenMP's wait policy decides how badly a 2-thread step suffers on a shared machine.
            "env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_", "MKL_"))},
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "wall_s": time.time() - started,
        },
        "models": models,
    }


# ----------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _ratio(q: dict, key: str) -> str:
    if q.get(key) is None:
        return "-"
    return f"{q[key]:.2f} (paired {q['paired'][key]:.2f}, CPU {q['cpu'][key]:.2f})"


def format_report(results: dict) -> str:
    """The printed table: one block per model, then its ratios and checks."""
    lines = []
    cfg = results["config"]
    for name, r in results["models"].items():
        any_v = next(iter(r["variants"].values()))
        s = any_v["settings"]
        lines.append(
            f"\n{name}: UNet {any_v['unet_params'] / 1e6:.2f} M params, LoRA {any_v['lora_params']:,} params "
            f"(rank {cfg['rank']}), {r['resolution']} px from {r['image_px']} px images, batch {cfg['batch_size']}, "
            f"{r['images']} images, {s['unet_dtype']}, {s['threads']} threads, attention {','.join(s['attention'])}"
        )
        gpu = any(v.get("peak_gpu_mb") is not None for v in r["variants"].values())
        lines.append(
            f"  {'variant':<52} {'steps/s':>8} {'ms/step':>8} {'CPU ms':>8} {'samples/s':>9} {'setup s':>8} "
            f"{'peak RSS MB':>11}" + (f" {'peak GPU MB':>11}" if gpu else "")
        )
        for k, v in r["variants"].items():
            lines.append(
                f"  ({k}) {v['label']:<48} {v['steps_per_s']:>8.2f} {v['ms_per_step']:>8.1f} "
                f"{v['cpu_ms_per_step']:>8.1f} {v['samples_per_s']:>9.1f} {v['setup_s']:>8.2f} "
                f"{_fmt(v['peak_rss_mb'], '.0f'):>11}" + (f" {_fmt(v.get('peak_gpu_mb'), '.0f'):>11}" if gpu else "")
            )
        q = r["ratios"]

        lines.append(
            f"  ratios: (b)/(a) {_ratio(q, 'b/a')}   (b)/(d) {_ratio(q, 'b/d')}   RSS(b)/RSS(d) {_fmt(q['rss_b/rss_d'])}"
        )
        lines.append(
            f"          (c)/(a) {_ratio(q, 'c/a')}   (d)/(a) {_ratio(q, 'd/a')}   (b)/(c) {_ratio(q, 'b/c')}"
        )
        if q.get("samples_e/samples_b") is not None:
            e, b = r["variants"]["e"], r["variants"]["b"]
            lines.append(
                f"  processes: 2 x {e['settings']['threads']} thread(s) {e['samples_per_s']:.1f} samples/s vs "
                f"1 x {b['settings']['threads']} thread(s) {b['samples_per_s']:.1f} samples/s -> "
                f"(e)/(b) {q['samples_e/samples_b']:.2f} (paired {q['paired']['samples_e/samples_b']:.2f})"
            )
        if q.get("f/b") is not None:
            lines.append(f"  preserve (base pass over half of each batch): (f)/(b) {_ratio(q, 'f/b')} in steps/s")
        if q.get("cache_cost_epoch_fraction") is not None:
            lines.append(
                f"  one-time caching cost: {q['cache_cost_s']:.2f} s = {q['cache_cost_epoch_fraction']:.2f} of one "
                f"uncached epoch ({q['uncached_epoch_s']:.2f} s; {q['cache_cost_source']}"
                + (
                    f"; in CPU time {q['cpu']['cache_cost_epoch_fraction']:.2f})"
                    if "cache_cost_epoch_fraction" in q["cpu"]
                    else ")"
                )
            )
        c = r["checks"]
        if c:
            bad = c.get("settings_mismatch_a_b")
            lines.append(
                f"  checks: same LoRA modules (a)=(b) {c.get('same_lora_modules_a_b')}, (d)=(b) "
                f"{c.get('same_lora_modules_d_b')}; step settings (a) vs (b): "
                + (", ".join(f"{k} {a} vs {b}" for k, (a, b) in bad.items()) if bad else "identical")
            )
    m = results["machine"]
    lines.append(
        f"\nmachine: {m['cpus']} CPUs ({m['cpu_capability']}), "
        + (f"GPU {m['gpu']}, " if m.get("gpu") else "")
        + f"torch {m['torch']}, load average "
        f"{m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f}, {m['wall_s']:.0f} s wall"
    )
    # Load before the run only: the average after it counts the benchmark's own processes.
    busiest = m["loadavg_before"][0]
    if busiest > 0.75 * (m["cpus"] or 1):
        threads = results["config"].get("threads", 1)
        hint = (
            ""
            if threads == 1 or m.get("env", {}).get("OMP_WAIT_POLICY")
            else (
                "; OpenMP threads spin-waiting for descheduled peers make multi-thread steps several times "
                "slower on a busy machine: compare with --threads 1 or OMP_WAIT_POLICY=PASSIVE"
            )
        )
        lines.append(
            f"note: the machine was busy (load {busiest:.1f} on {m['cpus']} CPUs): wall-clock figures are noisy, "
            f"trust the paired and CPU ratios more{hint}"
        )
    return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> None:
    from loracraft.infer.io import write_json_atomic

    write_json_atomic(Path(path), results)


if __name__ == "__main__":  # a rank of a multi-process variant, started by TorchrunWorker
    _rank_main()
