"""The files a run shares: its adapter in the layouts people load, at the end and at every checkpoint.

A LoRA is written twice, from the same tensors:

* ``pytorch_lora_weights.safetensors`` - diffusers/PEFT layout with the trained alpha in its
  ``lora_adapter_metadata`` header, so plain ``pipe.load_lora_weights(folder)`` applies it exactly;
* ``<run name>.safetensors`` - kohya layout (per-module ``.alpha``, ``ss_*`` header), the single
  file A1111, ComfyUI and kohya's scripts load; they list LoRAs by file name, hence the run name.

A checkpoint folder gets the same pair (the kohya file named ``<run name>-step-NNNNNN.safetensors``,
so copies from several checkpoints stay apart in a LoRA folder). LoHa/LoKr have no diffusers
layout: they get one kohya/LyCORIS file, ``lycoris_weights.safetensors``, in every folder.

The header of these files travels with them when they are shared, so by default it holds training
facts and no machine details: the base model by its folder name or hub id (kohya writes the
basename too), no data path, output folder, prompts or config text. ``output.share_config`` adds
the full config; the local ``run.json`` always has it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loracraft.infer.formats import (
    FAMILY_METADATA_KEY,
    LORA_WEIGHT_NAME,
    convert_lora_file,
    save_diffusers_lora,
)
from loracraft.infer.formats.lycoris import save_lycoris
from loracraft.infer.io import write_json_atomic
from loracraft.infer.names import LYCORIS_WEIGHT_NAME
from loracraft.train.config import Config
from loracraft.train.loss import kohya_metadata
from loracraft.train.manifest import environment, git_commit, scrub, versions

MANIFEST_NAME = "run.json"


@dataclass(frozen=True)
class AdapterStates:
    """One adapter's tensors per component (PEFT names, no component prefix); None = not trained."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] | None = None
    text_encoder_2: dict[str, torch.Tensor] | None = None

    def flat(self) -> dict[str, torch.Tensor]:
        """One dict to hash; UNet-only adapters keep their historical (unprefixed) hash."""
        if self.text_encoder is None and self.text_encoder_2 is None:
            return self.unet
        flat = {f"unet.{k}": v for k, v in self.unet.items()}
        for prefix, state in (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2)):
            flat.update({f"{prefix}.{k}": v for k, v in (state or {}).items()})
        return flat


@dataclass(frozen=True)
class AdapterShape:
    """What the writers need besides the tensors: the adapter type and its ``LoraConfig``s."""

    type: str  # lora | loha | lokr
    rank: int
    alpha: float
    lora_config: dict | None = None  # LoraConfig.to_dict() of the UNet adapter (LoRA only)
    text_encoder_config: dict | None = None
    text_encoder_2_config: dict | None = None
    unet_config: dict | None = None  # the base UNet's config: its block layout numbers kohya's SDXL names


def run_name(run_dir: Path) -> str:
    """The run folder's own name (``runs/mystyle`` -> ``mystyle``), the stem of the shared single file."""
    return Path(run_dir).absolute().name


def single_file_name(name: str, step: int | None = None, ema: bool = False) -> str:
    """``<name>.safetensors``, ``<name>-step-000040.safetensors``, ``<name>-ema.safetensors``, ..."""
    return f"{name}{f'-step-{step:06d}' if step is not None else ''}{'-ema' if ema else ''}.safetensors"


def main_file(folder: Path, lora_type: str, ema: bool = False) -> Path:
    """The file that stands for the adapter in ``folder``: the diffusers one, or LoHa/LoKr's LyCORIS file."""
    name = LORA_WEIGHT_NAME if lora_type == "lora" else LYCORIS_WEIGHT_NAME
    return folder / (name.replace(".safetensors", "_ema.safetensors") if ema else name)


def write_adapter(
    folder: Path, name: str, states: AdapterStates, shape: AdapterShape, metadata: dict[str, str],
    step: int | None = None, ema: bool = False,
) -> list[Path]:
    """Write one adapter in every layout it has (see the module doc); returns the files written."""
    if shape.type != "lora":
        lycoris = main_file(folder, shape.type, ema)
        return [save_lycoris(lycoris, states.unet, shape.type, shape.rank, shape.alpha, metadata)]
    diffusers = save_diffusers_lora(
        main_file(folder, shape.type, ema), states.unet, shape.lora_config, metadata,
        text_encoder_state=states.text_encoder, text_encoder_lora_config=shape.text_encoder_config,
        text_encoder_2_state=states.text_encoder_2, text_encoder_2_lora_config=shape.text_encoder_2_config,
        unet_config=shape.unet_config,
    )
    # Read back from the file just written: the kohya file holds exactly what diffusers loads.
    return [diffusers, convert_lora_file(diffusers, folder / single_file_name(name, step, ema), to="kohya")]


def export(
    folder: Path, name: str, variants: dict[bool, AdapterStates], shape: AdapterShape, metadata: dict[str, str],
    step: int | None = None,
) -> list[Path]:
    """Every variant (``{is_ema: states}``) in every layout, into ``folder``."""
    written = []
    for ema, states in variants.items():
        written += write_adapter(folder, name, states, shape, metadata, step=step, ema=ema)
    return written


def base_model_name(base: str) -> str:
    """How the header names the base: a local folder or file by its name (as kohya's ``ss_sd_model_name``),
    a hub id as is - never the machine's path."""
    path = Path(base).expanduser()
    local = path.is_absolute() or path.exists() or base.startswith((".", "~"))
    return path.name if local else base


def adapter_metadata(
    cfg: Config, *, family: str, step: int, num_images: int, num_reg_images: int, dataset_fingerprint: str,
) -> dict[str, str]:
    """The header of every shared file: kohya's ``ss_*`` training facts, no paths, no free text."""
    meta = {
        "loracraft_dataset_fingerprint": dataset_fingerprint,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.lora.rank),
        "ss_network_alpha": str(cfg.lora.alpha),
        "ss_sd_model_name": base_model_name(cfg.model.base),
        "ss_resolution": f"({cfg.data.resolution}, {cfg.data.resolution})",
        "ss_max_train_steps": str(cfg.train.max_steps),
        "ss_steps": str(step),
        "ss_learning_rate": str(cfg.train.lr),
        "ss_seed": str(cfg.train.seed),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": str(num_reg_images),
        "ss_training_comment": "trained with loracraft",
        FAMILY_METADATA_KEY: family,
        **({"ss_base_model_version": "sdxl_base_v1-0"} if family == "sdxl" else {}),
        **kohya_metadata(cfg),  # noise / timestep / loss controls that are on
    }
    if cfg.output.share_config:
        meta["loracraft_config"] = json.dumps(scrub(cfg.dump()), sort_keys=True)
    return meta


def write_manifest(
    run_dir: Path, cfg: Config, *, status: str, step: int, num_processes: int, dataset_fingerprint: str,
    base_fingerprint: str, started: float, weights_sha256: str | None = None,
    rank_weights_sha256: list[str] | None = None, adapter: str | None = None,
) -> Path:
    """``run.json``: the full (secret-scrubbed) config and everything needed to redo the run; stays local."""
    manifest = {
        "status": status,
        "config": scrub(cfg.dump()),
        "config_training": cfg.training_relevant(),
        "seed": cfg.train.seed,
        "steps": step,
        "versions": versions(),
        "git_commit": git_commit(),
        "environment": environment(),
        "num_processes": num_processes,
        "dataset_fingerprint": dataset_fingerprint,
        "base_fingerprint": base_fingerprint,
        "weights_sha256": weights_sha256,
        "rank_weights_sha256": rank_weights_sha256,
        "wall_time_s": round(time.time() - started, 3),
        "adapter": adapter,
    }
    path = Path(run_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


__all__ = [
    "AdapterShape", "AdapterStates", "adapter_metadata", "base_model_name", "export",
    "main_file", "run_name", "single_file_name", "write_adapter", "write_manifest",
]
