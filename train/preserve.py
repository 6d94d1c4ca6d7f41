"""Base-prediction preservation: OneTrainer's "prior prediction" regularisation.

kohya-style regularisation images (plain captions, trained on the noise like any other image)
only *discourage* the adapter from changing non-trigger prompts, through a loss whose noise
target is far from anything the adapter controls: on the toy base, 3 plain images per styled
one still let non-trigger generations drift 17% as much as trigger ones. Training those same
samples toward the base model's own prediction (the adapter switched off, same noisy latent,
same text) makes their loss exactly ``|adapter effect|^2`` where the adapter should have none,
which the optimizer can drive to zero. The cost is one no-grad UNet pass over the preserved
rows of each batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from loracraft.infer.errors import ConfigError


def preserved_rows(captions: Sequence[str], trigger: str, empty_captions: bool) -> torch.Tensor:
    """Which samples are preservation samples: caption without the trigger (dropped ones only if asked)."""
    return torch.tensor(
        [trigger not in c and (empty_captions or c != "") for c in captions], dtype=torch.bool
    )


def check_trigger(captions: Sequence[str], trigger: str, data_path: str) -> int:
    """How many captions lack the trigger; a trigger that selects all or none of the dataset is
    refused (one side would learn nothing)."""
    with_trigger = sum(trigger in c for c in captions)
    if with_trigger == 0:
        raise ConfigError(
            f"preserve.trigger {trigger!r} appears in no caption, {data_path}, so every sample would be preserved "
            "and nothing learned; set preserve.trigger to the text your styled captions share"
        )
    if with_trigger == len(captions):
        raise ConfigError(
            f"preserve.trigger {trigger!r} appears in every caption, {data_path}, so nothing is preserved; add "
            "regularisation images with captions without it, or set preserve=null"
        )
    return len(captions) - with_trigger


@contextmanager
def adapters_disabled(models: Sequence[torch.nn.Module | None]) -> Iterator[None]:
    """The base model: every peft adapter layer in ``models`` (None = skipped) off for the block.

    peft's own layer switch, as diffusers' ``disable_adapters`` uses; transformers' wrapper of it
    needs a newer peft than this project requires.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was_on = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer, on in zip(layers, was_on, strict=True):
            layer.enable_adapters(on)


def select_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of ``rows``: tensors indexed, lists filtered, nested dicts recursed."""
    keep = rows.tolist()
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value[rows.to(value.device)]
        elif isinstance(value, dict):
            out[key] = select_rows(value, rows)
        elif isinstance(value, list):
            out[key] = [v for v, k in zip(value, keep, strict=True) if k]
        else:
            out[key] = value
    return out


def preservation_weights(rows: torch.Tensor, weight: float, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-sample loss weights: ``weight`` on preserved rows (times min-SNR's, when used)."""
    base = weights if weights is not None else torch.ones(rows.shape[0])
    return torch.where(rows.to(base.device), base * weight, base)
