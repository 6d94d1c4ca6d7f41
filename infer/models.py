"""Load a base Stable Diffusion model: a diffusers folder, a hub id, or a single checkpoint file.

Every failure becomes one :class:`ModelError` line (what, where, how to fix) instead of the
stack of diffusers/huggingface_hub exceptions a wrong path produces. The pipeline remembers
how it was loaded (:func:`base_info`) so generated images can record it and be regenerated.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loracraft.infer.errors import ModelError, ModelNotFound, UsageError
from loracraft.infer.formats import LORA_WEIGHT_NAME, PICKLE_SUFFIXES

__all__ = [
    "BaseInfo",
    "load_base",
    "base_info",
    "parse_dtype",
    "vae_scale_factor",
    "unet_downsample_factor",
    "size_multiple",
    "model_family",
    "folder_family",
    "pipeline_class",
]

_INFO_ATTR = "_loracraft_base"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
#: ``owner/name`` as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class BaseInfo:
    """How a base was loaded: enough to load it again identically."""

    base: str
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    config: str | None = None

    def record(self) -> dict:
        return asdict(self)


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"fp16"``/``"float16"``/``torch.float16``... -> ``torch.dtype`` (``None`` = float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}, --dtype, use one of float32, float16, bfloat16") from None


#: Pipeline classes (model_index.json ``_class_name``) of the SDXL family; every other Stable
#: Diffusion class is SD1.x/2.x ("sd"). Img2img/inpaint variants share components and LoRA keys.
SDXL_PIPELINES = (
    "StableDiffusionXLPipeline",
    "StableDiffusionXLImg2ImgPipeline",
    "StableDiffusionXLInpaintPipeline",
)


def refiner_error(base: str) -> ModelError:
    """The SDXL refiner has no first text encoder and only works as img2img after the SDXL base."""
    return ModelError(
        f"this is an SDXL refiner (no first text encoder; it only refines the base's images), {base}, use "
        "the SDXL base model (e.g. stabilityai/stable-diffusion-xl-base-1.0) for training and generation"
    )


def is_refiner_index(index: dict) -> bool:
    """``model_index.json`` of an SDXL refiner: ``text_encoder`` null, ``text_encoder_2`` present."""
    te, te2 = index.get("text_encoder"), index.get("text_encoder_2")
    return (not te or te[0] is None) and bool(te2) and te2[0] is not None


def folder_family(path: str | Path) -> str:
    """``"sdxl"`` or ``"sd"`` from a diffusers folder's ``model_index.json`` ``_class_name``.

    The class name is what diffusers itself dispatches on (``DiffusionPipeline.from_pretrained``),
    so we read the same field instead of guessing from component shapes.
    """
    import json

    index = Path(path) / "model_index.json"
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as e:
        raise ModelError(
            f"cannot read model_index.json ({_first_line(e)}), {index}, re-save the model with save_pretrained"
        ) from e
    return "sdxl" if name in SDXL_PIPELINES else "sd"


def model_family(pipe) -> str:
    """``"sdxl"`` for SDXL pipelines (two text encoders, micro-conditioning), else ``"sd"``."""
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"


def pipeline_class(family: str):
    """The text-to-image pipeline class of a family (``from_single_file`` needs the concrete class)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _load_folder(path: Path, *, variant, dtype, revision):
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        hint = "pass the folder that holds model_index.json"
        if (path / LORA_WEIGHT_NAME).is_file():
            hint = "this folder holds a LoRA adapter: pass it with --lora and give the base model to --base"
        elif (path / "unet" / "config.json").is_file():
            hint = "add model_index.json (save the pipeline with save_pretrained)"
        raise ModelError(f"not a diffusers model folder (no model_index.json), {path}, {hint}")
    try:
        return DiffusionPipeline.from_pretrained(str(path), dtype=dtype, variant=variant, revision=revision)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        fix = (
            "check the variant exists (e.g. *.fp16.safetensors)"
            if variant
            else "re-save or re-download the model"
        )
        raise ModelError(f"cannot load diffusers model ({_first_line(e)}), {path}, {fix}") from e


def check_single_file(
    path: Path, config, allow_pickle: bool, config_flag: str = "--base-config", pickle_flag: str = "--allow-pickle"
) -> Path:
    """Everything about a single-file checkpoint that can be refused before reading it; returns
    its config folder. The flags name the option the user has (generate's, or the config's keys)."""
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(
            f"refusing to load a pickle checkpoint (loading it can run arbitrary code), {path}, "
            f"convert it to .safetensors or pass {pickle_flag} if you trust its source",
            exit_code=2,
        )
    if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
        raise ModelError(
            f"not a model checkpoint (expected a folder, .safetensors or .ckpt), {path}, pass a diffusers "
            "folder, a single-file .safetensors checkpoint, or a hub id"
        )
    if config is None:
        raise ModelError(
            f"a single-file checkpoint needs its diffusers config folder (no hub access to fetch it), {path}, "
            f"pass {config_flag} DIR (a diffusers folder of the same architecture, weights not needed)",
            exit_code=2,
        )
    config = Path(config).expanduser()
    if not config.exists():
        raise ModelNotFound(f"{config_flag} folder not found, {config}, check the path")
    if not (config / "model_index.json").is_file():
        raise ModelError(
            f"{config_flag} is not a diffusers folder (no model_index.json), {config}, pass the config folder "
            "of the same architecture"
        )
    return config


def _load_single_file(path: Path, *, config, dtype, allow_pickle):
    config = check_single_file(path, config, allow_pickle)
    # An SDXL checkpoint must be read by the XL class: the SD1 class has no second text encoder.
    cls = pipeline_class(folder_family(config))
    try:
        return cls.from_single_file(
            str(path), config=str(config), dtype=dtype, local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 - diffusers raises many types for a bad checkpoint
        raise ModelError(
            f"cannot load single-file checkpoint ({_first_line(e)}), {path}, check it is a Stable Diffusion "
            "checkpoint matching --base-config"
        ) from e


def _load_hub(repo_id: str, *, revision, variant, dtype):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(repo_id, revision=revision, variant=variant, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise ModelError(
            f"cannot load hub model {repo_id}{'@' + revision if revision else ''} ({_first_line(e)}), --base, "
            "check the id and your network/HF_HUB_OFFLINE cache, or pass a local diffusers folder"
        ) from e


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """Hide diffusers'/transformers' per-component loading bars unless progress was asked for."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    if not show:
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def load_base(
    base: str | Path,
    *,
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    config: str | Path | None = None,
    allow_pickle: bool = False,
    attention_slicing: bool = False,
    progress: bool = False,
):
    """Load a base model as a diffusers pipeline.

    Args:
        base: a diffusers folder (with ``model_index.json``), a hub id ``owner/name``, or a
            single-file ``.safetensors`` checkpoint (``.ckpt`` only with ``allow_pickle``).
        revision: hub branch/tag/commit (hub ids only).
        variant: weight variant, e.g. ``"fp16"`` for ``*.fp16.safetensors``.
        torch_dtype: ``float32`` (default), ``float16`` or ``bfloat16``.
        device: where to put the pipeline.
        config: for single-file checkpoints, a diffusers folder of the same architecture
            (``from_single_file(config=...)``; nothing is fetched from the hub).
        allow_pickle: permit pickle checkpoints, which can run code when loaded.
        attention_slicing: compute attention in slices (less memory, slower). PyTorch 2's
            scaled-dot-product attention is diffusers' default otherwise.
        progress: show diffusers' per-step progress bars.

    Raises:
        ModelError: the path does not exist, is not a model, or fails to load.
    """
    dtype = parse_dtype(torch_dtype)
    text = str(base)
    path = Path(text).expanduser()
    with _loading_bars(progress):
        if path.is_dir():
            pipe = _load_folder(path, variant=variant, dtype=dtype, revision=revision)
        elif path.is_file():
            pipe = _load_single_file(path, config=config, dtype=dtype, allow_pickle=allow_pickle)
        elif _HUB_ID.match(text) and not text.startswith((".", "~")):
            pipe = _load_hub(text, revision=revision, variant=variant, dtype=dtype)
        else:
            raise ModelNotFound(
                f"base model not found, {text}, pass an existing diffusers folder, a .safetensors checkpoint "
                "or a hub id like runwayml/stable-diffusion-v1-5"
            )
    if not hasattr(pipe, "unet") or not hasattr(pipe, "vae"):
        raise ModelError(
            f"not a Stable Diffusion pipeline ({type(pipe).__name__} has no unet/vae), {text}, "
            "pass a Stable Diffusion 1.x/2.x/XL model"
        )
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "text_encoder", None) is None:
        raise refiner_error(text)
    try:
        pipe = pipe.to(device)
    except (RuntimeError, AssertionError) as e:
        raise UsageError(f"cannot move the model to {device} ({_first_line(e)}), --device, use cpu") from e
    if attention_slicing:
        pipe.enable_attention_slicing()
    pipe.set_progress_bar_config(disable=not progress)
    is_path = path.exists()
    info = BaseInfo(
        base=str(path.resolve()) if is_path else text,
        revision=revision,
        variant=variant,
        dtype=_dtype_name(dtype),
        device=str(device),
        config=str(Path(config).resolve()) if config is not None else None,
    )
    setattr(pipe, _INFO_ATTR, info)
    return pipe


def base_info(pipe) -> BaseInfo | None:
    """How ``pipe`` was loaded, if :func:`load_base` loaded it."""
    return getattr(pipe, _INFO_ATTR, None)


def vae_scale_factor(pipe) -> int:
    """Pixels per latent: 2 ** (number of VAE blocks - 1)."""
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def unet_downsample_factor(pipe) -> int:
    """Latent pixels per coarsest UNet feature: every down block but the last halves the size."""
    return 2 ** (len(pipe.unet.config.down_block_types) - 1)


def size_multiple(pipe) -> int:
    """The multiple an image side must be: VAE factor x UNet downsampling (8 x 8 = 64 for SD1.5)."""
    return vae_scale_factor(pipe) * unet_downsample_factor(pipe)
