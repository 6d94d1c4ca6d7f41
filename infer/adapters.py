"""Attach LoRA adapters to a diffusers pipeline: load (either format), scale, stack, fuse, unload.

diffusers does the injection (``load_lora_into_unet`` / ``load_lora_into_text_encoder`` of the
pipeline's ``*LoraLoaderMixin``, i.e. what ``load_lora_weights`` runs) and the scaling
(``set_adapters``) and merging (``fuse_lora``). What it does not do, and this module adds:

* every file is read by :func:`loracraft.infer.formats.read_lora` first, so kohya and diffusers
  files go through one path, pickles are refused, and a damaged header is a one-line error;
* the adapter is checked against the base *before* injection
  (:func:`loracraft.infer.adapter_fit.check_fit`): a module the base lacks or a shape that does
  not fit raises :class:`AdapterError` naming the module and both shapes - diffusers would
  warn about unmatched keys and load nothing (a silent no-op);
* the ``LoraConfig`` handed to diffusers is built from the per-module (rank, alpha) we read,
  so alpha survives whatever layout the file used;
* ``unfuse`` restores the base weights bit for bit (PEFT's unmerge subtracts the delta back,
  which leaves rounding residue), so an image generated after a fuse/unfuse cycle is
  identical to one from a fresh process.

The pipeline remembers what was loaded (``loaded_adapters(pipe)``) so generated images can
record adapter paths, scales and hashes.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from loracraft.infer.adapter_fit import check_fit  # re-exported
from loracraft.infer.errors import AdapterError, UsageError
from loracraft.infer.formats import (
    LoraAdapter,
    build_lora_config,
    file_sha256,
    model_module_table,
    read_lora,
    resolve_adapter_file,
)
from loracraft.infer.formats.lycoris import is_lycoris_file
from loracraft.infer.prompts import parse_block_weights, parse_lora_spec  # re-exported: CLI spellings
from loracraft.infer.random_lora import build_random_lora  # re-exported

__all__ = [
    "LoadedAdapter",
    "parse_lora_arg",
    "parse_lora_spec",
    "parse_block_weights",
    "load_adapter",
    "load_adapters",
    "loaded_adapters",
    "set_scales",
    "fuse",
    "unfuse",
    "is_fused",
    "unload",
    "remove_adapter",
    "check_fit",
    "build_random_lora",
]

_LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_REGISTRY = "_loracraft_adapters"
_FUSED = "_loracraft_fused_backup"


@dataclass
class LoadedAdapter:
    """An adapter attached to a pipeline (what image metadata records)."""

    name: str
    path: Path
    scale: float
    sha256: str
    format: str
    components: tuple[str, ...]
    num_modules: int
    #: text-encoder weight when it differs from ``scale`` (``--lora PATH:UNET:TE``, ``<lora:N:TE:UNET>``).
    text_encoder_scale: float | None = None
    #: UNet block weights multiplying ``scale``: ``{"down": w, "mid": w, "up": w, "down.1": w, ...}``.
    blocks: dict[str, float] | None = None

    def record(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        d["components"] = list(self.components)
        return d


# --------------------------------------------------------------------------------------------
# Command-line spelling
# --------------------------------------------------------------------------------------------
def parse_lora_arg(text: str) -> tuple[str, float]:
    """Split ``PATH[:SCALE]`` (the scale is whatever follows the last colon, if it is a number).

    >>> parse_lora_arg("style.safetensors:0.7")
    ('style.safetensors', 0.7)
    >>> parse_lora_arg("C:/loras/style.safetensors")
    ('C:/loras/style.safetensors', 1.0)
    """
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _block_factor(blocks: dict[str, float], path: str) -> float:
    """The block weight for a UNet module path (the most specific key wins; others 1)."""
    m = re.match(r"^(down|up)_blocks\.(\d+)\.|^(mid)_block\.", path)
    if not m:
        return 1.0  # conv_in, time embedding, conv_out: outside the down/mid/up blocks
    if m.group(3):
        return blocks.get("mid", 1.0)
    part, index = m.group(1), m.group(2)
    return blocks.get(f"{part}.{index}", blocks.get(part, 1.0))


def _default_name(path: Path, taken: set[str]) -> str:
    p = Path(path)
    stem = p.parent.name if p.name == "pytorch_lora_weights.safetensors" else p.stem
    base = re.sub(r"[^0-9A-Za-z_-]+", "_", stem) or "lora"
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


# --------------------------------------------------------------------------------------------
# Registry kept on the pipeline
# --------------------------------------------------------------------------------------------
def _registry(pipe) -> dict[str, LoadedAdapter]:
    reg = getattr(pipe, _REGISTRY, None)
    if reg is None:
        reg = {}
        setattr(pipe, _REGISTRY, reg)
    return reg


def loaded_adapters(pipe) -> list[LoadedAdapter]:
    """Adapters loaded through loracraft, in load order, with their current scales."""
    return list(_registry(pipe).values())


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _module_tables(pipe) -> dict[str, dict[str, str]]:
    tables = {}
    for component in _LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module):
            tables[component] = model_module_table(model, te=component.startswith("text_encoder"))
    return tables


class _quiet_diffusers:
    """diffusers logs a warning per component an adapter has no weights for; we report ourselves."""

    def __enter__(self):
        self.logger = logging.getLogger("diffusers")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def _inject(pipe, adapter: LoraAdapter, mapping: dict[str, dict[str, str]], name: str) -> None:
    for component, mods in adapter.modules.items():
        model = getattr(pipe, component)
        paths = mapping[component]
        param = next(model.parameters())
        state: dict[str, torch.Tensor] = {}
        for path, mod in mods.items():
            mpath = paths[path]
            state[f"{component}.{mpath}.lora_A.weight"] = mod.down.to(param.dtype)
            state[f"{component}.{mpath}.lora_B.weight"] = mod.up.to(param.dtype)
            if mod.magnitude is not None:
                state[f"{component}.{mpath}.lora_magnitude_vector"] = mod.magnitude.to(param.dtype)
        config = build_lora_config(mods, paths=paths)
        metadata = {f"{component}.{k}": v for k, v in config.items()}
        if component == "unet":
            with _quiet_diffusers(), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipe.load_lora_into_unet(
                    state,
                    network_alphas=None,
                    unet=model,
                    adapter_name=name,
                    metadata=metadata,
                    _pipeline=pipe,
                )
        else:
            _inject_text_encoder(model, state, component, config, name)


def _inject_text_encoder(
    model, state: dict[str, torch.Tensor], component: str, config: dict, name: str
) -> None:
    """PEFT injection into a transformers text encoder.

    diffusers routes this through transformers' ``load_adapter``, which in transformers 5 demands
    peft>=0.22 and refuses to run otherwise; PEFT's own ``inject_adapter_in_model`` +
    ``set_peft_model_state_dict`` (what diffusers uses for the UNet) has no such gate.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    prefix = f"{component}."
    sd = {k.removeprefix(prefix): v for k, v in state.items()}
    with warnings.catch_warnings():
        # PEFT warns whenever a second adapter joins a model; stacking adapters is the point here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(LoraConfig(**config), model, adapter_name=name)
    result = set_peft_model_state_dict(model, sd, adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
    if unexpected:
        raise AdapterError(f"text encoder did not take LoRA weight {unexpected[0]}, {component}, report this")


def _verify_injected(pipe, adapter: LoraAdapter, mapping, name: str) -> None:
    """Every adapter module must now carry a LoRA layer named ``name`` (never a silent no-op)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component, paths in mapping.items():
        names = dict(getattr(pipe, component).named_modules())
        for mpath in paths.values():
            layer = names.get(mpath)
            if not isinstance(layer, BaseTunerLayer) or name not in getattr(layer, "lora_A", {}):
                raise AdapterError(
                    f"diffusers did not attach the adapter to {component}.{mpath}, {adapter.path}, "
                    "report this with the adapter file"
                )


def _delete_layers(pipe, name: str) -> None:
    """Delete adapter ``name`` from every PEFT layer and config of every LoRA component; other
    adapters stay, including ones loracraft did not load (a trainer's own)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in _LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for layer in model.modules():
            if isinstance(layer, BaseTunerLayer) and name in getattr(layer, "lora_A", {}):
                layer.delete_adapter(name)
        (getattr(model, "peft_config", None) or {}).pop(name, None)


def _remove_adapter(pipe, name: str) -> None:
    """Best-effort cleanup after a failed load: whatever of ``name`` was injected goes."""
    try:
        _delete_layers(pipe, name)
    except Exception:  # noqa: BLE001 - the load's own error is the one to report
        pass


def load_adapter(
    pipe,
    path: str | Path,
    *,
    name: str | None = None,
    scale: float = 1.0,
    allow_pickle: bool = False,
    activate: bool = True,
    text_encoder_scale: float | None = None,
    blocks: dict[str, float] | None = None,
) -> LoadedAdapter:
    """Load one LoRA file (diffusers or kohya layout) or LoHa/LoKr file (kohya/LyCORIS layout, via
    :mod:`loracraft.infer.formats.lycoris`) onto ``pipe`` under ``name``.

    Args:
        pipe: a diffusers Stable Diffusion pipeline (SD1/SD2/SDXL).
        path: adapter file or folder.
        name: adapter name (default: derived from the file name, made unique).
        scale: its weight in :func:`set_scales` (1.0 = as trained).
        text_encoder_scale: a different weight for its text-encoder part (``None``: ``scale``).
        blocks: UNet block weights multiplying ``scale`` (see :func:`parse_block_weights`).
        allow_pickle: permit ``.ckpt/.pt/.bin`` files.
        activate: apply the scales of all loaded adapters right away.

    Raises:
        AdapterError: missing/corrupt/pickled file, unknown layout, or an adapter that does not
            fit the base (missing modules, shape mismatch).
    """
    if is_fused(pipe):
        raise UsageError(
            "cannot load an adapter while adapters are fused, load_adapter, call unfuse(pipe) first"
        )
    reg = _registry(pipe)
    file = resolve_adapter_file(path)
    name = name or _default_name(file, set(reg))
    if name in reg:
        raise UsageError(f"adapter name {name!r} is already loaded, {file}, pick another name")
    if is_lycoris_file(file):
        loaded = _load_lycoris(pipe, file, name, scale, activate=False)
        loaded.text_encoder_scale, loaded.blocks = text_encoder_scale, blocks
        if activate:
            set_scales(pipe)
        return loaded
    layers = getattr(getattr(pipe, "unet", None), "config", {}).get("layers_per_block", 2)
    adapter = read_lora(
        file,
        allow_pickle=allow_pickle,
        module_names=_module_tables(pipe),
        unet_layers_per_block=layers if isinstance(layers, int) else 2,
    )
    mapping = check_fit(pipe, adapter, where=str(file))
    try:
        _inject(pipe, adapter, mapping, name)
        _verify_injected(pipe, adapter, mapping, name)
    except AdapterError:
        _remove_adapter(pipe, name)
        raise
    except Exception as e:
        _remove_adapter(pipe, name)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(
            f"diffusers could not load the adapter ({first}), {file}, check it fits this base"
        ) from e
    loaded = LoadedAdapter(
        name=name,
        path=file.resolve(),
        scale=float(scale),
        sha256=file_sha256(file),
        format=adapter.source_format,
        components=tuple(adapter.modules),
        num_modules=adapter.num_modules,
        text_encoder_scale=None if text_encoder_scale is None else float(text_encoder_scale),
        blocks=dict(blocks) if blocks else None,
    )
    reg[name] = loaded
    if activate:
        set_scales(pipe)
    return loaded


def _load_lycoris(pipe, file: Path, name: str, scale: float, activate: bool) -> LoadedAdapter:
    """LoHa/LoKr (kohya/LyCORIS layout) through peft's own layers; see ``loracraft.infer.formats.lycoris``."""
    from loracraft.infer.formats.lycoris import load_lycoris

    adapter = load_lycoris(pipe, file, name)
    loaded = LoadedAdapter(
        name=name,
        path=file.resolve(),
        scale=float(scale),
        sha256=file_sha256(file),
        format=f"lycoris-{adapter.kind}",
        components=("unet",),
        num_modules=len(adapter.modules),
    )
    _registry(pipe)[name] = loaded
    if activate:
        set_scales(pipe)
    return loaded


def load_adapters(
    pipe,
    specs: Sequence[str | Path | tuple[str | Path, float]],
    *,
    allow_pickle: bool = False,
) -> list[LoadedAdapter]:
    """Load several adapters; each spec is a path, ``"PATH:UNET[:TE]"``, ``(path, scale)`` or
    ``(path, unet, te)``.

    All are loaded (and checked) before scales are applied; the first failing file aborts.
    """
    out = []
    for spec in specs:
        if isinstance(spec, tuple):
            path, scale, te = (*spec, None)[:3]
        else:
            path, scale, te = parse_lora_spec(str(spec))
        out.append(
            load_adapter(
                pipe, path, scale=scale, allow_pickle=allow_pickle, activate=False, text_encoder_scale=te
            )
        )
    set_scales(pipe)
    return out


# --------------------------------------------------------------------------------------------
# Scaling, fusing, unloading
# --------------------------------------------------------------------------------------------
def set_scales(pipe, scales: dict[str, float] | Sequence[float] | None = None) -> None:
    """Set adapter weights (``scales`` by name or in load order; ``None`` re-applies the stored ones).

    Every loaded adapter stays active; weight 0 switches one off exactly (its term is
    multiplied by 0.0, so the output equals the base bit for bit).
    """
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder
    from diffusers.models.modeling_utils import ModelMixin

    reg = _registry(pipe)
    if scales is not None:
        if is_fused(pipe):
            raise UsageError(
                "cannot change scales while adapters are fused, set_scales, call unfuse(pipe) first"
            )
        if not isinstance(scales, dict):
            scales = list(scales)
            if len(scales) != len(reg):
                raise UsageError(
                    f"{len(scales)} scales for {len(reg)} adapters, set_scales, give one per adapter"
                )
            scales = dict(zip(reg, scales, strict=True))
        unknown = sorted(set(scales) - set(reg))
        if unknown:
            raise UsageError(
                f"unknown adapter {unknown[0]!r}, set_scales, loaded: {', '.join(reg) or 'none'}"
            )
        for n, s in scales.items():
            reg[n].scale = float(s)
    for component in _LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        present = [n for n in reg if n in (getattr(model, "peft_config", None) or {})]
        if not present:
            continue
        if component == "unet":
            weights = [reg[n].scale for n in present]
        else:
            weights = [
                reg[n].scale if reg[n].text_encoder_scale is None else reg[n].text_encoder_scale
                for n in present
            ]
        if isinstance(model, ModelMixin):
            model.set_adapters(present, weights)
        else:
            set_adapters_for_text_encoder(present, model, weights)
        if component == "unet":
            _apply_blocks(model, [reg[n] for n in present if reg[n].blocks])


def _apply_blocks(unet: torch.nn.Module, adapters: list[LoadedAdapter]) -> None:
    """Per-block weights through peft's own ``set_scale`` on every adapter layer.

    diffusers' block-scale dicts reach only attention blocks (its other layers fall back to
    weight 1, ignoring the adapter's scale), so conv/resnet LoRA layers would escape them.
    """
    if not adapters:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for path, module in unet.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "set_scale"):
            continue
        for a in adapters:
            if a.name in getattr(module, "scaling", {}) or a.name in getattr(module, "active_adapters", []):
                module.set_scale(a.name, a.scale * _block_factor(a.blocks, path))


def is_fused(pipe) -> bool:
    return getattr(pipe, _FUSED, None) is not None


def _tuner_layers(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in _LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module):
            for path, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield component, path, module


def fuse(pipe) -> None:
    """Merge all loaded adapters, at their current scales, into the base weights.

    After merging, the PEFT wrapper layers are lifted out of the module tree (kept aside for
    :func:`unfuse`), so a fused pipeline runs exactly the base model's modules: no per-layer
    Python overhead remains (PEFT's merged forward would still pass through every wrapper).
    """
    reg = _registry(pipe)
    if not reg:
        raise UsageError("no adapters to fuse, fuse, load one with load_adapter first")
    if is_fused(pipe):
        return
    layers = {(component, path): module for component, path, module in _tuner_layers(pipe)}
    backup = {key: module.get_base_layer().weight.detach().clone() for key, module in layers.items()}
    components = sorted({c for c, _ in layers})
    set_scales(pipe)
    pipe.fuse_lora(components=components, lora_scale=1.0, adapter_names=list(reg))
    for (component, path), module in layers.items():
        _replace_module(getattr(pipe, component), path, module.get_base_layer())
    setattr(pipe, _FUSED, {"backup": backup, "layers": layers})


def _replace_module(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def unfuse(pipe) -> None:
    """Undo :func:`fuse`: put the LoRA layers back and restore the base weights exactly."""
    state = getattr(pipe, _FUSED, None)
    if state is None:
        return
    layers = state["layers"]
    for (component, path), module in layers.items():
        _replace_module(getattr(pipe, component), path, module)
    pipe.unfuse_lora(components=sorted({c for c, _ in layers}))
    with torch.no_grad():
        for key, weight in state["backup"].items():
            layers[key].get_base_layer().weight.copy_(weight)
    setattr(pipe, _FUSED, None)


def remove_adapter(pipe, name: str) -> None:
    """Take one adapter out of the pipeline (unfusing first); every other adapter stays as it was,
    including ones loracraft did not load (a trainer's own adapter in the models it is training)."""
    if name not in _registry(pipe):
        raise UsageError(f"unknown adapter {name!r}, remove_adapter, loaded: {', '.join(_registry(pipe)) or 'none'}")
    unfuse(pipe)
    del _registry(pipe)[name]
    _delete_layers(pipe, name)


def unload(pipe) -> None:
    """Remove every adapter (unfusing first), leaving the pipeline as loaded from disk."""
    unfuse(pipe)
    pipe.unload_lora_weights()
    _registry(pipe).clear()
