"""The layout-independent adapter: per component, per module ``down``, ``up``, ``alpha`` (and DoRA magnitude)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: Our own header key naming the model family an adapter was trained on.
FAMILY_METADATA_KEY = "loracraft.model_family"
#: Values of kohya's ``ss_base_model_version`` header for SDXL (sd-scripts ``train_network.py``).
_SDXL_VERSION_PREFIX = "sdxl"
_MULTI_LAYER_TRANSFORMER = re.compile(r"\.transformer_blocks\.[1-9]")


def most_common(values: Iterable):
    """The most frequent value (first seen wins a tie): the default a config or ``ss_*`` header states."""
    return Counter(values).most_common(1)[0][0]


@dataclass
class LoraModule:
    """One adapted layer: ``W' = W + (alpha / rank) * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    #: DoRA (Liu et al. 2024) per-output-row magnitude, PEFT's ``lora_magnitude_vector`` (shape [out]).
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraAdapter:
    """An adapter independent of its file layout.

    Attributes:
        modules: ``{component: {module path: LoraModule}}``; component is ``unet``,
            ``text_encoder`` or ``text_encoder_2``; paths use diffusers/transformers naming with
            dots (text encoder paths start with ``text_model.`` as in kohya files).
        configs: the ``LoraConfig`` dicts found in a diffusers header, per component (kept so a
            round trip writes them back unchanged when they still describe the weights).
        metadata: every other header entry (``ss_*`` keys, training facts).
        source_format: ``"diffusers"`` or ``"kohya"``.
    """

    modules: dict[str, dict[str, LoraModule]]
    configs: dict[str, dict] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "diffusers"
    path: Path | None = None

    def items(self):
        for component, mods in self.modules.items():
            for name, mod in mods.items():
                yield component, name, mod

    @property
    def num_modules(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def tensors_sha256(self) -> str:
        """Hash of names, ranks, alphas and bytes: equal iff two adapters act identically."""
        from loracraft.infer.formats.files import tensors_sha256

        tensors: dict[str, torch.Tensor] = {}
        for component, name, mod in self.items():
            tensors[f"{component}.{name}.down"] = mod.down
            tensors[f"{component}.{name}.up"] = mod.up
            tensors[f"{component}.{name}.alpha"] = torch.tensor([float(mod.alpha)], dtype=torch.float64)
            if mod.magnitude is not None:
                tensors[f"{component}.{name}.magnitude"] = mod.magnitude
        return tensors_sha256(tensors)


def adapter_family(adapter: LoraAdapter) -> str | None:
    """``"sdxl"``, ``"sd"`` (SD1.x/2.x) or ``None`` when nothing tells (see :func:`family_evidence`)."""
    return family_evidence(adapter)[0]


def family_evidence(adapter: LoraAdapter) -> tuple[str | None, str]:
    """(family, why we think so) of an adapter.

    Evidence, most explicit first: our ``loracraft.model_family`` header, kohya's
    ``ss_base_model_version``, a second text encoder (only SDXL has one), and UNet modules in a
    second transformer layer of a block (SD1/SD2 have one layer per block; SDXL has 2 and 10).
    """
    meta = adapter.metadata
    if meta.get(FAMILY_METADATA_KEY) in ("sd", "sdxl"):
        return meta[FAMILY_METADATA_KEY], f"header {FAMILY_METADATA_KEY}={meta[FAMILY_METADATA_KEY]}"
    version = str(meta.get("ss_base_model_version", ""))
    if version:
        family = "sdxl" if version.startswith(_SDXL_VERSION_PREFIX) else "sd"
        return family, f"header ss_base_model_version={version}"
    if "text_encoder_2" in adapter.modules:
        return "sdxl", "it has text_encoder_2 weights"
    if any(_MULTI_LAYER_TRANSFORMER.search(path) for path in adapter.modules.get("unet", {})):
        return "sdxl", "its UNet modules include a second transformer layer"
    return None, ""
