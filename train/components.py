"""Load the frozen parts of a diffusers Stable Diffusion model for training.

Each component comes from its own ``subfolder`` with the user's revision/variant, exactly
as the diffusers training scripts do, so a hub id and a local folder take the same path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loracraft.infer.errors import ConfigError, ModelError, ModelNotFound

PICKLE_EXTS = {".ckpt", ".pt", ".pth", ".bin"}


def check_base(base: str, config: str | None = None, allow_pickle: bool = False) -> None:
    """Fail fast (before any weights load) when ``base`` cannot be a Stable Diffusion model."""
    p = Path(base).expanduser()
    if p.is_file():  # diffusers' from_single_file, with a local config folder (no hub access)
        from loracraft.infer.models import check_single_file

        check_single_file(p, config, allow_pickle, config_flag="model.config", pickle_flag="model.allow_pickle=true")
        return
    if p.exists() and not (p / "model_index.json").is_file():
        raise ModelError(
            f"model.base is not a diffusers model (no model_index.json), {p}, "
            "point it at a folder saved with save_pretrained (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    if not p.exists() and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        raise ModelNotFound(f"model.base folder not found, {p}, check the path or give a hub id like org/name")


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object
    inference_scheduler: object = None
    #: SDXL only: the second tokenizer and ``CLIPTextModelWithProjection`` (None on SD1.x/2.x).
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None

    @property
    def family(self) -> str:
        """``"sdxl"`` (two text encoders, size micro-conditioning) or ``"sd"`` (SD1.x/2.x)."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [te for te in (self.text_encoder, self.text_encoder_2) if te is not None]

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor x UNet downsampling."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)


def load_components(
    base: str, revision: str | None = None, variant: str | None = None, config: str | None = None,
    allow_pickle: bool = False,
) -> Components:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_base(base, config, allow_pickle)
    if Path(base).expanduser().is_file():
        return _single_file_components(base, config, allow_pickle)
    kw = dict(revision=revision)
    tokenizer_2 = text_encoder_2 = None
    try:
        sdxl = base_family(base, revision) == "sdxl"
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", variant=variant, **kw)
        if sdxl:  # as train_text_to_image_lora_sdxl.py loads them
            tokenizer_2 = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                base, subfolder="text_encoder_2", variant=variant, **kw
            )
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", variant=variant, **kw)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", variant=variant, **kw)
        inference_scheduler = _pipeline_scheduler(base, kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        local = Path(base).expanduser().exists()
        raise ModelError(
            f"cannot load the base model, {base}, check model.base/revision/variant"
            f"{'' if local else ' and your network access or HF_HUB_OFFLINE cache'}: {first}"
        ) from e
    return _frozen(Components(
        tokenizer, text_encoder, vae, unet, noise_scheduler, inference_scheduler, tokenizer_2, text_encoder_2
    ))


def _frozen(c: Components) -> Components:
    for module in (*c.text_encoders, c.vae, c.unet):
        module.requires_grad_(False)
        module.float()  # fp16-stored weights (e.g. the toy base) are upcast; see freeze_and_cast
    return c


def _single_file_components(base: str, config: str, allow_pickle: bool) -> Components:
    """The parts of a single-file checkpoint, read by diffusers' ``from_single_file`` (the same
    loader as ``generate``); the schedulers come from the config folder, as a folder's would."""
    from diffusers import DDPMScheduler

    from loracraft.infer.models import load_base

    pipe = load_base(base, config=config, allow_pickle=allow_pickle)
    if getattr(pipe, "text_encoder", None) is None:
        from loracraft.infer.models import refiner_error

        raise refiner_error(base)
    return _frozen(Components(
        pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet,
        DDPMScheduler.from_pretrained(config, subfolder="scheduler"), _pipeline_scheduler(config, {}),
        getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None),
    ))


def rank_limit(model: torch.nn.Module, targets: list[str]) -> tuple[int, str] | None:
    """(smallest side, layer name) over the layers ``targets`` selects, peft's way (the module
    name or its dotted suffix); None when nothing matches (peft reports that itself)."""
    best = None
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(module, torch.nn.Linear):
            side = min(module.in_features, module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            side = min(module.in_channels // module.groups * k, module.out_channels)
        else:
            continue
        if best is None or side < best[0]:
            best = (side, name)
    return best


def check_rank(c: Components, lora, base: str) -> None:
    """LoRA's update B @ A has rank <= min(in, out) of its layer, so a larger rank only adds
    parameters (rank=1000000 allocated ~23 GB before the first step). Checked on the loaded
    model, before the adapter is injected; ``lora`` is the config's ``lora`` section."""
    if lora.type == "lokr":  # LoKr's rank factors a Kronecker block, not the layer
        return
    checks = [("lora.rank", lora.rank, c.unet, lora.target_modules())]
    if lora.text_encoder is not None:
        checks += [("lora.text_encoder.rank", lora.text_encoder.rank, te, lora.text_encoder.targets) for te in c.text_encoders]
    problems = []
    for key, rank, model, targets in checks:
        limit = rank_limit(model, targets)
        if limit is not None and rank > limit[0]:
            problems.append(
                f"{key}={rank} exceeds {limit[0]}, the smaller side of the targeted layer {limit[1]} of {base}, "
                f"use {key} <= {limit[0]}"
            )
    if problems:
        raise ConfigError(problems[0], problems)


def base_family(base: str, revision: str | None = None) -> str:
    """``"sdxl"`` or ``"sd"`` from the base's ``model_index.json`` (local folder or hub cache),
    the field diffusers itself dispatches pipelines on."""
    from diffusers import DiffusionPipeline

    from loracraft.infer.models import SDXL_PIPELINES, is_refiner_index, refiner_error

    index = DiffusionPipeline.load_config(base, revision=revision)
    if is_refiner_index(index):
        raise refiner_error(base)
    return "sdxl" if index.get("_class_name") in SDXL_PIPELINES else "sd"


def _pipeline_scheduler(base: str, kw: dict):
    """The scheduler class the base ships for inference (PNDM for SD1.5), as validation uses it."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(base, subfolder="scheduler", **kw)
    cls = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    return cls.from_config(config)


def freeze_and_cast(c: Components, weight_dtype: torch.dtype) -> None:
    """Frozen parts run in the weight dtype; the LoRA parameters added later stay fp32."""
    for module in (*c.text_encoders, c.vae, c.unet):
        module.requires_grad_(False)
        module.eval()
    for module in (*c.text_encoders, c.unet):
        if any(p.dtype != weight_dtype for p in module.parameters()):
            # Only when needed: diffusers' ModelMixin.to warns on every dtype argument, even a no-op
            # one ("modules ... should be kept in float32: []").
            module.to(dtype=weight_dtype)
    # The VAE stays fp32: fp16 VAEs overflow to NaN latents (SDXL especially) and it runs once per image.


def fingerprint_base(base: str) -> str:
    """Cheap identity of a local base: file names, sizes and the first/last MiB of each file.

    Hashing every byte of a 4 GB model on each run is too slow; the sampled bytes include the
    tensor data, so two fine-tunes of one architecture still differ. Hub ids are fingerprinted
    by their name (and revision, in the manifest).
    """
    import hashlib

    p = Path(base).expanduser()
    if not p.exists():
        return "hub:" + base
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p).as_posix() if f != p else f.name}|{size}|".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), 2)
                h.update(fh.read())
    return h.hexdigest()


def inference_pipeline(c: Components, unet: torch.nn.Module, scheduler=None):
    """A diffusers text-to-image pipeline of the base's family built from the loaded parts
    (validation and DreamBooth class images generate with the weights in memory, no reload).

    ``scheduler`` defaults to the base's inference scheduler itself."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(
        vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet,
        scheduler=scheduler if scheduler is not None else c.inference_scheduler,
    )
    if c.family == "sdxl":
        return StableDiffusionXLPipeline(
            **common, text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2,
            add_watermarker=False,
        )
    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


@contextlib.contextmanager
def reused_pipeline(c: Components, unet: torch.nn.Module) -> Iterator[object | None]:
    """The base already in memory, for the report's scale sweep to load the exported file into
    (reading the base from disk again cost 14.5 s and +264 MB RSS on the SD1.5-shaped model).
    ``None`` when the cache moved a part the sweep needs off to the meta device (no validation
    prompts). The sweep's adapter replaces the training adapter while it runs; after, the
    training adapter is the active one again, as the models were before."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from loracraft.train.validation import eval_mode

    parts = [c.vae.decoder, getattr(c.vae, "post_quant_conv", None), *c.text_encoders]
    if any(p.is_meta for m in filter(None, parts) for p in m.parameters()):
        yield None
        return
    models = [unet, *c.text_encoders]
    active = {layer: layer.active_adapters for m in models for layer in m.modules() if isinstance(layer, BaseTunerLayer)}
    pipe = inference_pipeline(c, unet)
    pipe.set_progress_bar_config(disable=True)
    try:
        with eval_mode(*models):
            yield pipe
    finally:
        for layer, names in active.items():
            layer.set_adapter(names)


def load_for_training(cfg, device) -> tuple[Components, torch.dtype]:
    """The base's parts frozen, cast to the weight dtype (train.mixed_precision) and on ``device``;
    the weight dtype is returned too: diffusers' `unet.dtype` walks every module (~10 ms per call on SD1.5)."""
    from loracraft.train.loss import with_zero_terminal_snr

    m = cfg.model
    c = load_components(m.base, m.revision, m.variant, m.config, m.allow_pickle)
    if m.prediction_type:
        c.noise_scheduler.register_to_config(prediction_type=m.prediction_type)
    if cfg.train.zero_terminal_snr:
        c.noise_scheduler = with_zero_terminal_snr(c.noise_scheduler)
    multiple = c.size_multiple
    sides = [("data.resolution", cfg.data.resolution)] + [  # and every concept's own
        (f"data.concepts[{i}].resolution", k.resolution) for i, k in enumerate(cfg.data.concepts) if k.resolution
    ]
    for key, side in sides:
        if side % multiple:
            raise ConfigError(
                f"{key}={side} is not a multiple of {multiple} "
                f"(VAE factor x UNet downsampling of {m.base}), config, use e.g. "
                f"{max(multiple, side // multiple * multiple)}"
            )
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        cfg.train.mixed_precision
    ]
    freeze_and_cast(c, weight_dtype)
    for module in (c.unet, c.vae, *c.text_encoders):
        module.to(device)
    if cfg.train.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
    return c, weight_dtype
