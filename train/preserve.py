"""Base-prediction preservation: OneTrainer's "prior prediction" regularisation.

kohya-style regularisation images (plain captions, trained on the noise like any other image)
only *discourage* the adapter from changing non-trigger prompts, through a loss whose noise
target is far from anything the adapter controls: on the toy base, 3 plain images per styled
one still let non-trigger generations drift 17% as much as trigger ones. Training those same
samples toward the base model's own prediction (the adapter switched off, same noisy latent,
same text) makes their loss exactly ``|adapter effect|^2`` where the adapter should have none,
which the optimizer can drive to zero.

The base's prediction costs UNet work on the preserved rows. Where peft can switch the adapter
off per row (plain LoRA, no DoRA, no gradient checkpointing), those rows ride along in the
training pass with peft's mixed-batch ``adapter_names`` (``"__base__"``), their output detached
as the target: one UNet call instead of two, 0.88x a plain step's speed vs 0.77x for a
separate no-grad pass (``scripts/bench_preserve.py``, one thread), for the appended rows'
activations in memory. Otherwise a separate no-grad pass with the adapters disabled.
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


def per_row_switch_possible(lora_type: str, use_dora: bool, gradient_checkpointing: bool) -> bool:
    """Whether the preserved rows can share the training pass. peft switches adapters per row only
    for plain LoRA without DoRA; gradient checkpointing recomputes the forward during backward,
    after the per-row switch is gone."""
    return lora_type == "lora" and not use_dora and not gradient_checkpointing


@contextmanager
def adapters_per_row(model: torch.nn.Module, base_rows: Sequence[bool]) -> Iterator[None]:
    """Inside, every peft LoRA layer of ``model`` runs its adapter on the rows where ``base_rows``
    is False and skips it (the base model) where it is True: peft's mixed-batch ``adapter_names``
    with its ``"__base__"`` name, passed to each layer by a forward pre-hook."""
    from peft.tuners.lora import LoraLayer

    names_of: dict[str, list[str]] = {}  # one list per adapter name, shared by its layers

    def names(layer) -> list[str]:
        (name,) = layer.active_adapters  # training holds one adapter
        if name not in names_of:
            names_of[name] = ["__base__" if b else name for b in base_rows]
        return names_of[name]

    def pre(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names(module)}

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in model.modules() if isinstance(m, LoraLayer)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def concat_rows(a, b):
    """``a`` with ``b``'s rows appended: tensors on dim 0, dicts key by key (SDXL's added_cond_kwargs)."""
    if isinstance(a, dict):
        return {k: concat_rows(v, b[k]) for k, v in a.items()}
    return torch.cat([a, b.to(a.dtype)])


def predict_with_base(unet, plain_unet: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, kwargs: dict,
                      base_kwargs: dict, rows: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(the adapter's prediction for every row, the base's for rows)``. ``unet`` is what trains
    (perhaps DDP-wrapped), ``plain_unet`` the module inside; ``base_kwargs`` the conditioning of
    ``rows`` as the base sees it. ``per_row``: one pass, the preserved rows appended with their
    adapters off (:func:`adapters_per_row`); else a second, no-grad pass with adapters disabled."""
    on = rows.to(noisy.device)
    if per_row:
        n = noisy.shape[0]
        with adapters_per_row(plain_unet, [False] * n + [True] * int(on.sum())):
            out = unet(concat_rows(noisy, noisy[on]), concat_rows(timesteps, timesteps[on]),
                       **concat_rows(kwargs, base_kwargs)).sample
        return out[:n], out[n:].detach()
    pred = unet(noisy, timesteps, **kwargs).sample
    with torch.no_grad(), adapters_disabled([plain_unet]):
        return pred, plain_unet(noisy[on], timesteps[on], **base_kwargs).sample


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
